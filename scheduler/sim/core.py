"""The simulated engine's continuous-batching core, shared by real-time serving and discrete-event replay.

It is a state machine over explicit times: submit(request, now) and advance(now) return the time
at which the current segment ends, and the caller (an asyncio task in real time, the event heap in
virtual time) calls advance() then. A segment is either one mixed iteration (decode tokens of the
running requests plus chunks of prompts being prefilled, vLLM v1 style) or a run of k decode-only
iterations up to the next completion, the KV cache filling up, or max_segment_seconds. Decode
runs are advanced in one step: every running request gains one token per iteration, so a global
iteration counter n gives each request's progress (generated = gen_at_join + n - join_iter), a
heap of finish iterations gives the next completion, and iteration time grows linearly with the
context, so a run's duration is an arithmetic series. An arrival in the middle of a run cuts it
at the end of the iteration in flight (where vLLM's scheduler would admit it).

KV cache: admission reserves the whole prompt; decoding adds one token per running request per
iteration; when the next iteration would not fit, the most recently joined request is preempted
(recompute mode: it goes back to the front of the queue and prefills prompt + generated again).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from scheduler.sim.physics import IterationWork, OperatingPoint, cost_at, idle_power_watts, iteration_work, operating_point, work_parts
from scheduler.sim.profiles import ModelProfile

#: share of GPU memory vLLM may use (gpu_memory_utilization) and what it keeps for activations
GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES = 1.0e9
#: time constant of the exponentially weighted arrival rate a replica publishes for placement
ARRIVAL_RATE_WINDOW_SECONDS = 30.0
#: extra sequences at which the decode step time is probed for its per-sequence slope
_SLOPE_PROBE_SEQUENCES = 32
#: per-batch clocks: time for a clock change to take effect. Assumed, not measured: NVML clock locks apply
#: in milliseconds to tens of milliseconds depending on the GPU and the target clock (Velicka et al.,
#: "Methodology for GPU Frequency Switching Latency Measurement", arXiv 2502.20075); the batch stalls for
#: this long at each change (docs/benchmarks.md shows the effect of 4x this value)
CLOCK_SWITCH_SECONDS = 0.02
#: per-batch clocks: prompts remembered for the arrival reserve (its 95th percentile)
RECENT_PROMPTS = 200
#: per-batch clocks: candidate clocks are the GPU's supported clocks at about this spacing
BATCH_CLOCK_SPACING_MHZ = 60.0
#: per-batch clocks: keep the current clock when it costs at most this much more than the best candidate
#: (each change stalls the batch, so near-ties are not worth one)
BATCH_CLOCK_KEEP_FRACTION = 0.03


@dataclass(eq=False)
class SimRequest:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    model_id: str = ""
    first_token_s: float | None = None
    finish_s: float | None = None
    state: str = "new"  # waiting, prefill, running, done
    preemptions: int = 0
    #: free-form slot for the driver (asyncio event, trace row index, SLO)
    tag: object = None
    # progress bookkeeping (see module docstring)
    _seq: int = 0
    _prefill_len: int = 0
    _prefilled: int = 0
    _gen_join: int = 0
    _join_iter: int = 0
    _finish_iter: int = 0

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_seconds(self) -> float | None:
        if self.first_token_s is None or self.finish_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass
class Segment:
    start_s: float
    iterations: int
    first_seconds: float
    slope_seconds: float  # per-iteration growth of the iteration time within a decode run
    first_joules: list[float]
    slope_joules: list[float]
    prefill_chunks: list[tuple[SimRequest, int]] = field(default_factory=list)
    capped: bool = False
    clock_mhz: float = 0.0
    start_energy_joules: list[float] = field(default_factory=list)
    #: when the segment was planned: a clock change (per-batch clocks) stalls it from here to start_s
    planned_s: float | None = None
    stall_joules: list[float] = field(default_factory=list)

    def seconds(self, j: int) -> float:
        return j * self.first_seconds + self.slope_seconds * j * (j - 1) / 2.0

    def joules(self, gpu: int, j: int) -> float:
        return j * self.first_joules[gpu] + self.slope_joules[gpu] * j * (j - 1) / 2.0

    @property
    def end_s(self) -> float:
        return self.start_s + self.seconds(self.iterations)

    def iterations_within(self, tau: float) -> int:
        """Smallest j >= 1 with seconds(j) >= tau (the iteration in flight at tau completes)."""
        if tau <= 0:
            return 1
        a, b = self.slope_seconds / 2.0, self.first_seconds - self.slope_seconds / 2.0
        if abs(a) < 1e-15:
            j = math.ceil(tau / b) if b > 0 else 1
        else:
            j = math.ceil((-b + math.sqrt(max(b * b + 4 * a * tau, 0.0))) / (2 * a))
        while j > 1 and self.seconds(j - 1) >= tau:
            j -= 1
        while self.seconds(j) < tau and j < self.iterations:
            j += 1
        return max(1, min(j, self.iterations))


class CoreListener:
    """Callbacks from the core; the default does nothing."""

    def on_first_token(self, req: SimRequest, now: float) -> None: ...

    def on_finish(self, req: SimRequest, now: float) -> None: ...

    def on_segment_end(self, now: float) -> None: ...


class BatchCore:
    """Continuous batching of one replica on its simulated GPUs (see module docstring)."""

    def __init__(
        self,
        model: ModelProfile,
        gpus: Sequence,  # SimulatedGpu; typed loosely to avoid an import cycle
        *,
        max_num_seqs: int = 256,
        max_batched_tokens: int = 8192,
        max_segment_seconds: float = 0.25,
        kv_capacity_tokens: int | None = None,
        listener: CoreListener | None = None,
    ):
        if len(gpus) != model.num_gpus:
            raise ValueError(f"{model.key} needs {model.num_gpus} GPU(s), got {len(gpus)}")
        self.model = model
        self.gpus = list(gpus)
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_segment_seconds = max_segment_seconds
        self.kv_capacity_tokens = kv_capacity_tokens or self.default_kv_capacity(model, self.gpus[0].profile.memory_bytes)
        self.listener = listener or CoreListener()
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []
        self.running: dict[int, SimRequest] = {}
        self._heap: list[tuple[int, int, SimRequest]] = []
        self._seq = itertools.count()
        self.iteration = 0  # decode iterations completed (global counter n)
        self._dec_base = 0  # sum over running of prompt + gen_join - join_iter
        self._kv_prefill = 0  # KV reserved by requests still prefilling
        self.segment: Segment | None = None
        self.completed = 0
        self.preemptions = 0
        self.tokens_generated = 0
        # decayed counts of submitted requests and their prompt tokens (arrival_rates)
        self._arrivals = 0.0
        self._arrival_prompt_tokens = 0.0
        self._arrivals_at: float | None = None
        #: SLO-aware batching (set_slo_batching): prefill chunk per decode-batch bucket, and the TTFT target
        self._slo_chunks: list[tuple[int, int]] | None = None
        self._slo_ttft_seconds: float | None = None
        self._slo_prefill_tokens_per_second = 0.0
        #: per-batch clocks (set_batch_clocks): None when off
        self._batch_clocks: dict | None = None
        self._clock_now_mhz: float | None = None  # the clock the engine last set (None: not managing it)
        self.clock_switches = 0
        self._recent_prompts: deque[int] = deque(maxlen=RECENT_PROMPTS)
        self._reserve_cache: dict = {}
        for g in self.gpus:
            g.attach_model(True)

    # --- per-batch clocks ------------------------------------------------------------------------
    def set_batch_clocks(self, ttft_seconds: float, tpot_seconds: float, *, headroom_fraction: float = 0.25,
                         switch_seconds: float = CLOCK_SWITCH_SECONDS) -> None:
        """Choose the SM clock for every batch from the deadlines of the work in it, and drop it between batches.

        Each segment runs at the clock that costs the least energy (the segment's own plus the idle
        energy a faster one would draw until the slowest candidate finishes) among those that keep
        (1 - headroom) of the SLO: every queued prompt prefilled by its TTFT deadline (arrival +
        TTFT target), at the rate this batch prefills at that clock, and a batch with running
        sequences within the TPOT target (or, when even the top clock misses it, at the top clock).
        Prefill is compute-bound, so its time grows about as 1 / clock: the check uses the same
        iteration model as the batches (scheduler.sim.physics), never a shortcut. The top clock is
        the governor's lock or the maximum; with nothing to run the GPUs drop to their lowest clock.
        Each change stalls the batch for switch_seconds at idle power. Placement and routing still
        predict at the top clock (what the replica can do when a deadline needs it).
        """
        if not 0.0 <= headroom_fraction < 1.0:
            raise ValueError(f"headroom_fraction must be in [0, 1), got {headroom_fraction!r}")
        if switch_seconds < 0:
            raise ValueError(f"switch_seconds must be >= 0, got {switch_seconds!r}")
        g = self.gpus[0]
        supported = sorted(set(float(f) for f in g.clock_constraints().supported_mhz))
        step = max(1, round(BATCH_CLOCK_SPACING_MHZ / max(g.profile.sm_clock_step_mhz, 1.0)))
        grid = supported[::step]
        if grid[-1] != supported[-1]:
            grid.append(supported[-1])
        self._batch_clocks = {"ttft": ttft_seconds * (1.0 - headroom_fraction), "tpot": tpot_seconds * (1.0 - headroom_fraction),
                              "switch": switch_seconds, "grid": np.array(grid), "idle_mhz": supported[0]}
        self._go_idle_clock(None)

    def _go_idle_clock(self, now: float | None) -> None:
        bc = self._batch_clocks
        if bc is None:
            return
        if self._clock_now_mhz != bc["idle_mhz"]:
            if self._clock_now_mhz is not None:
                self.clock_switches += 1
            self._clock_now_mhz = bc["idle_mhz"]
            for g in self.gpus:
                g.set_idle_clock_mhz(bc["idle_mhz"], at_s=now)

    def _top_clock_mhz(self) -> float:
        return min(g.max_clock_mhz_allowed() for g in self.gpus)

    def _choose_clock(self, work: IterationWork, now: float, *, decoding: bool, prefill_tokens: int,
                      queue: Sequence[tuple[float | None, int]], iterations: int = 1) -> float:
        """The clock for one segment (see set_batch_clocks). queue: (arrival_s, or None without a TTFT deadline; prompt tokens left) in prefill order."""
        bc = self._batch_clocks
        assert bc is not None
        top = self._top_clock_mhz()
        g0 = self.gpus[0]
        prof, fit = g0.profile, self.model.fit
        grid = bc["grid"][bc["grid"] <= top + 1e-9]
        if grid.size == 0 or grid[-1] < top - 1e-9:
            grid = np.append(grid, top)
        # the power limit caps the clock as the driver would: no candidate runs faster than the capped top
        s_cap = operating_point(prof, fit, work, g0.power_limit_watts(), top).clock_mhz / prof.sm_clock_max_mhz
        s = np.minimum(grid / prof.sm_clock_max_mhz, s_cap)
        t_over, t_mem, t_comp = work_parts(prof, fit, work)
        sec, joules = cost_at(s, prof, fit, t_over, t_mem, t_comp)
        switch = np.where(np.abs(grid - (self._clock_now_mhz or -1.0)) < 1e-9, 0.0, bc["switch"])
        ok = np.ones(grid.shape, dtype=bool)
        # a decode run of several iterations pays one clock change for all of them (at most a segment's worth):
        # the per-iteration comparisons below spread the change's time and energy over them
        k = max(1, min(iterations, int(self.max_segment_seconds / max(float(sec[-1]), 1e-9))))
        # a request that arrives while this batch runs waits for it, then prefills at the top clock: the batch
        # leaves it that much of the TTFT target, for a prompt as long as the 95th percentile of recent ones
        reserve = self._arrival_reserve_seconds(top)
        ok &= sec + switch <= max(bc["ttft"] - reserve, float(sec[-1]))
        if decoding and self.running:
            # TPOT is a mean over a request's tokens: each running request may spend per remaining token what
            # its target (x its tokens) leaves after the time it has already decoded, prefills of others included
            allow = min((bc["tpot"] * (r.output_tokens - 1) - (now - (r.first_token_s or now))) / max(r.output_tokens - self.generated(r), 1)
                        for r in self.running.values())
            ok &= sec + switch / k <= max(allow, float(sec[-1]))
        if queue:
            if self.waiting and not prefill_tokens:
                return top  # a queue that cannot be admitted yet: finish what runs as fast as allowed
            rate = prefill_tokens / sec  # tokens per second of this batch at each candidate
            cum = 0
            for arrival, left in queue:
                cum += left
                if arrival is None:
                    continue
                # a prompt finishing in this batch is done at its end; later ones at this batch's rate
                t_done = switch + (sec if cum <= prefill_tokens else cum / rate)
                budget = arrival + bc["ttft"] - now
                if t_done[-1] > budget:
                    continue  # late even at the top clock: no clock saves it, do not let it pin the rest
                ok &= t_done <= budget
        if not ok.any():
            return float(grid[-1])
        idle_w = idle_power_watts(prof, model_loaded=True, max_clock_mhz=bc["idle_mhz"])
        cost = joules + idle_w * (float(sec.max()) - sec) + switch / k * idle_power_watts(prof, model_loaded=True, max_clock_mhz=top)
        cost = np.where(ok, cost, np.inf)
        best = int(np.argmin(cost))
        cur = np.flatnonzero(switch == 0.0)
        if cur.size and ok[cur[0]] and cost[cur[0]] <= (1.0 + BATCH_CLOCK_KEEP_FRACTION) * cost[best]:
            best = int(cur[0])
        return float(grid[best])

    def _arrival_reserve_seconds(self, top: float) -> float:
        """Prefill time at the top clock of a prompt at the 95th percentile of this replica's recent prompts."""
        if not self._recent_prompts:
            return 0.0
        ordered = sorted(self._recent_prompts)
        tokens = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        key = (tokens, top)
        if self._reserve_cache.get("key") != key:
            w = iteration_work(self.model, decode_tokens=0, decode_context_tokens=0, prefill_tokens=tokens,
                               prefill_attention_pairs=tokens * tokens / 2.0, prefill_sequences=1)
            self._reserve_cache = {"key": key, "seconds": self.operating_point(w, top)[0]}
        return self._reserve_cache["seconds"]

    def _set_batch_clock(self, mhz: float, now: float) -> float:
        """Apply a segment's clock; returns the stall (seconds) the change costs."""
        if self._clock_now_mhz is not None and abs(mhz - self._clock_now_mhz) < 1e-9:
            return 0.0
        first = self._clock_now_mhz is None
        self._clock_now_mhz = mhz
        if first:
            return 0.0
        self.clock_switches += 1
        return self._batch_clocks["switch"] if self._batch_clocks else 0.0

    # --- SLO-aware batching ----------------------------------------------------------------------
    def set_slo_batching(self, ttft_seconds: float, tpot_seconds: float, *, headroom_fraction: float = 0.2,
                         context_tokens_per_sequence: int = 1024) -> None:
        """Size prefill chunks and the running batch from the SLO instead of fixed engine options.

        A mixed iteration (decode + prefill chunk) is one TPOT for every running request, so the
        chunk is the largest that keeps it within (1 - headroom) x the TPOT target at the current
        decode batch; max_num_seqs becomes the largest batch whose decode step fits the same target.
        With nothing decoding the chunk is max_batched_tokens (no TPOT to protect). When the prompts
        queued here would take longer than half the TTFT target to prefill at the chunk used beside a
        batch of 16, the chunk goes back to max_batched_tokens (TTFT is then the binding target).
        Times are worked out once, at the GPUs' current settings, per decode-batch bucket of
        powers of two with context_tokens_per_sequence tokens each.
        """
        target = tpot_seconds * (1.0 - headroom_fraction)
        chunks: list[tuple[int, int]] = []
        n, best_seqs = 0, 1
        while n <= self.max_num_seqs:
            ctx = n * context_tokens_per_sequence
            t_dec = self.operating_point(iteration_work(self.model, decode_tokens=n, decode_context_tokens=ctx))[0] if n else 0.0
            if n and t_dec <= target:
                best_seqs = n
            lo, hi = 64, self.max_batched_tokens
            if n == 0:
                lo = hi  # nothing decoding: no TPOT to protect, prefill at full size
            elif t_dec > target:
                hi = lo
            while hi - lo > 64:
                mid = (lo + hi) // 2
                w = iteration_work(self.model, decode_tokens=n, decode_context_tokens=ctx, prefill_tokens=mid,
                                   prefill_attention_pairs=mid * mid / 2.0, prefill_sequences=1)
                if self.operating_point(w)[0] <= target:
                    lo = mid
                else:
                    hi = mid
            chunks.append((n, lo))
            n = 1 if n == 0 else n * 2
        self._slo_chunks = chunks
        self._slo_ttft_seconds = ttft_seconds
        self.max_num_seqs = max(best_seqs, 1)
        # prefill rate at the chunk used beside a typical running batch, for the queue test in _chunk_budget
        n, chunk = next(((n, c) for n, c in chunks if n >= 16), chunks[-1])
        w = iteration_work(self.model, decode_tokens=n, decode_context_tokens=n * context_tokens_per_sequence, prefill_tokens=chunk,
                           prefill_attention_pairs=chunk * chunk / 2.0, prefill_sequences=1)
        wd = iteration_work(self.model, decode_tokens=n, decode_context_tokens=n * context_tokens_per_sequence)
        self._slo_prefill_tokens_per_second = chunk / max(self.operating_point(w)[0] - self.operating_point(wd)[0], 1e-9)

    def _chunk_budget(self, n_run: int) -> int:
        if self._slo_chunks is None:
            return self.max_batched_tokens
        queued = self.queued_prefill_tokens
        if self._slo_ttft_seconds is not None and queued > 0.5 * self._slo_ttft_seconds * self._slo_prefill_tokens_per_second:
            return self.max_batched_tokens
        for n, chunk in self._slo_chunks:
            if n >= n_run:
                return chunk
        return self._slo_chunks[-1][1]

    @staticmethod
    def default_kv_capacity(model: ModelProfile, memory_bytes: float) -> int:
        per_gpu = memory_bytes * GPU_MEMORY_UTILIZATION - model.weights_bytes / model.num_gpus - ACTIVATION_RESERVE_BYTES
        return max(1, int(per_gpu * model.num_gpus / model.kv_bytes_per_token))

    # --- queries -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill: the waiting queue plus the unprefilled rest of prompts in flight."""
        return sum(r._prefill_len for r in self.waiting) + sum(r._prefill_len - r._prefilled for r in self.prefilling)

    def arrival_rates(self, now: float) -> tuple[float, float]:
        """(requests/s, prompt tokens/s) submitted here, exponentially weighted over ARRIVAL_RATE_WINDOW_SECONDS."""
        if self._arrivals_at is None:
            return 0.0, 0.0
        decay = math.exp(-max(now - self._arrivals_at, 0.0) / ARRIVAL_RATE_WINDOW_SECONDS) / ARRIVAL_RATE_WINDOW_SECONDS
        return self._arrivals * decay, self._arrival_prompt_tokens * decay

    @property
    def kv_used_tokens(self) -> int:
        return self._kv_prefill + self._dec_base + len(self.running) * self.iteration

    def generated(self, req: SimRequest) -> int:
        if req.state == "running":
            return req._gen_join + self.iteration - req._join_iter
        if req.state == "done":
            return req.output_tokens
        return req._gen_join

    @property
    def idle(self) -> bool:
        return self.segment is None

    def operating_point(self, work: IterationWork, clock_mhz: float | None = None) -> tuple[float, list[float], bool, float]:
        """(seconds, joules per GPU, capped, clock) of one iteration across the replica's GPUs (clock_mhz: a lower cap)."""
        points: list[OperatingPoint] = []
        cache: dict[tuple, OperatingPoint] = {}
        for g in self.gpus:
            key = g.control_key()
            op = cache.get(key)
            if op is None:
                top = g.max_clock_mhz_allowed() if clock_mhz is None else min(clock_mhz, g.max_clock_mhz_allowed())
                op = operating_point(g.profile, self.model.fit, work, g.power_limit_watts(), top)
                cache[key] = op
            points.append(op)
        seconds = max(p.seconds for p in points)
        joules = [p.joules + g.idle_power_watts() * (seconds - p.seconds) for p, g in zip(points, self.gpus)]
        slow = max(points, key=lambda p: p.seconds)
        return seconds, joules, any(p.capped for p in points), slow.clock_mhz

    # --- driving -------------------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float) -> float | None:
        if self._arrivals_at is not None:
            decay = math.exp(-max(now - self._arrivals_at, 0.0) / ARRIVAL_RATE_WINDOW_SECONDS)
            self._arrivals *= decay
            self._arrival_prompt_tokens *= decay
        self._arrivals += 1.0
        self._arrival_prompt_tokens += req.prompt_tokens
        self._arrivals_at = now
        if self._batch_clocks is not None:
            self._recent_prompts.append(req.prompt_tokens)
        req._seq = next(self._seq)
        req._prefill_len = req.prompt_tokens
        req.state = "waiting"
        self.waiting.append(req)
        if self.segment is None:
            return self._plan(now)
        return self._truncate(now)

    def advance(self, now: float) -> float | None:
        """Finish the segment that ends at `now` and plan the next; returns its end (None: idle)."""
        seg = self.segment
        if seg is None:
            return self._plan(now)
        self.segment = None
        self.iteration += seg.iterations
        self.tokens_generated += seg.iterations * len(self.running)
        for req, chunk in seg.prefill_chunks:
            req._prefilled += chunk
            if req._prefilled >= req._prefill_len:
                self._kv_prefill -= req._prefill_len
                self.prefilling.remove(req)
                req._gen_join += 1
                self.tokens_generated += 1
                if req.first_token_s is None:
                    req.first_token_s = now
                    self.listener.on_first_token(req, now)
                if req._gen_join >= req.output_tokens:
                    self._finish(req, now)
                else:
                    self._join(req)
        heap = self._heap
        while heap and heap[0][0] <= self.iteration:
            it, _, req = heapq.heappop(heap)
            if req.state == "running" and req._finish_iter == it:
                self._leave(req)
                self._finish(req, now)
        self.listener.on_segment_end(now)
        return self._plan(now)

    def cancel(self, req: SimRequest, now: float) -> None:
        """Drop a request (client went away); its KV is freed at once."""
        if req.state == "waiting":
            self.waiting.remove(req)
        elif req.state == "prefill":
            if self.segment is not None and any(r is req for r, _ in self.segment.prefill_chunks):
                return  # finishes with this iteration; the caller ignores the rest
            self.prefilling.remove(req)
            self._kv_prefill -= req._prefill_len
        elif req.state == "running":
            self._leave(req)
        req.state = "done"

    # --- internals -----------------------------------------------------------------------------
    def _join(self, req: SimRequest) -> None:
        req.state = "running"
        req._join_iter = self.iteration
        req._finish_iter = self.iteration + (req.output_tokens - req._gen_join)
        self.running[req._seq] = req
        self._dec_base += req.prompt_tokens + req._gen_join - req._join_iter
        heapq.heappush(self._heap, (req._finish_iter, req._seq, req))

    def _leave(self, req: SimRequest) -> None:
        req._gen_join = self.generated(req)
        self._dec_base -= req.prompt_tokens + (req._gen_join - (self.iteration - req._join_iter)) - req._join_iter
        del self.running[req._seq]
        req.state = "left"

    def _finish(self, req: SimRequest, now: float) -> None:
        req.state = "done"
        req.finish_s = now
        self.completed += 1
        self.listener.on_finish(req, now)

    def _preempt_newest(self) -> None:
        seq = next(reversed(self.running))
        req = self.running[seq]
        self._leave(req)
        req.state = "waiting"
        req.preemptions += 1
        self.preemptions += 1
        req._prefill_len = req.prompt_tokens + req._gen_join
        req._prefilled = 0
        self.waiting.appendleft(req)

    def _admit(self) -> None:
        free = self.kv_capacity_tokens - self.kv_used_tokens
        while self.waiting and self.num_running < self.max_num_seqs:
            req = self.waiting[0]
            need = req._prefill_len + 1
            if need > free and self.num_running > 0:
                break
            self.waiting.popleft()
            req.state = "prefill"
            req._prefilled = 0
            self.prefilling.append(req)
            self._kv_prefill += req._prefill_len
            free -= req._prefill_len

    def _plan(self, now: float) -> float | None:
        self._admit()
        n_run = len(self.running)
        if self.prefilling:
            budget = max(self._chunk_budget(n_run) - n_run, 1)
            chunks: list[tuple[SimRequest, int]] = []
            pairs = 0.0
            tokens = 0
            for req in self.prefilling:
                if budget <= 0:
                    break
                c = min(req._prefill_len - req._prefilled, budget)
                chunks.append((req, c))
                pairs += c * (req._prefilled + c / 2.0)
                tokens += c
                budget -= c
            work = iteration_work(
                self.model, decode_tokens=n_run, decode_context_tokens=self._dec_base + n_run * self.iteration,
                prefill_tokens=tokens, prefill_attention_pairs=pairs, prefill_sequences=len(chunks),
            )
            cap = None
            if self._batch_clocks is not None:
                # a preempted request prefills again but has had its first token: it has no TTFT deadline left
                queue = [(r.arrival_s if r.first_token_s is None else None, r._prefill_len - r._prefilled) for r in self.prefilling]
                queue += [(r.arrival_s if r.first_token_s is None else None, r._prefill_len) for r in self.waiting]
                cap = self._choose_clock(work, now, decoding=n_run > 0, prefill_tokens=tokens, queue=queue)
            seconds, joules, capped, clock = self.operating_point(work, cap)
            seg = Segment(now, 1, seconds, 0.0, joules, [0.0] * len(joules), chunks, capped, clock)
            return self._start(seg, now, cap)
        if n_run == 0:
            for g in self.gpus:
                g.set_idle(at_s=now)
            self._go_idle_clock(now)
            return None
        # a decode run: up to the next completion and while the KV cache has room
        k = self._heap_top() - self.iteration
        room = (self.kv_capacity_tokens - self.kv_used_tokens) // n_run
        if room <= 0:
            self._preempt_newest()
            return self._plan(now)
        k = max(1, min(k, room))
        ctx0 = self._dec_base + n_run * self.iteration
        w0 = iteration_work(self.model, decode_tokens=n_run, decode_context_tokens=ctx0)
        cap = None
        if self._batch_clocks is not None:
            # the run's last iteration is its slowest (the context grows): the TPOT check uses it
            w_end = iteration_work(self.model, decode_tokens=n_run, decode_context_tokens=ctx0 + n_run * (k - 1)) if k > 1 else w0
            queue = [(r.arrival_s if r.first_token_s is None else None, r._prefill_len) for r in self.waiting]
            cap = self._choose_clock(w_end, now, decoding=True, prefill_tokens=0, queue=queue, iterations=k)
        t0, e0, capped, clock = self.operating_point(w0, cap)
        if k > 1:
            w1 = iteration_work(self.model, decode_tokens=n_run, decode_context_tokens=ctx0 + n_run * (k - 1))
            t1, e1, capped1, _ = self.operating_point(w1, cap)
            dt = (t1 - t0) / (k - 1)
            de = [(b - a) / (k - 1) for a, b in zip(e0, e1)]
            capped = capped or capped1
        else:
            dt, de = 0.0, [0.0] * len(e0)
        seg = Segment(now, k, t0, dt, e0, de, [], capped, clock)
        if seg.seconds(k) > self.max_segment_seconds and k > 1:
            seg.iterations = seg.iterations_within(self.max_segment_seconds)
        return self._start(seg, now, cap)

    def _heap_top(self) -> int:
        heap = self._heap
        while heap:
            it, _, req = heap[0]
            if req.state == "running" and req._finish_iter == it:
                return it
            heapq.heappop(heap)
        raise RuntimeError("running requests without a finish entry")  # pragma: no cover

    def _start(self, seg: Segment, now: float, clock_mhz: float | None = None) -> float:
        self.segment = seg
        seg.planned_s = now
        if clock_mhz is not None:
            stall = self._set_batch_clock(clock_mhz, now)
            if stall > 0:
                # the clock change takes effect after `stall`: the GPUs wait at the idle power of the faster clock
                seg.start_s = now + stall
                top = max(clock_mhz, min(g.idle_clock_mhz() for g in self.gpus))
                seg.stall_joules = [stall * idle_power_watts(g.profile, model_loaded=True, max_clock_mhz=min(top, g.max_clock_mhz_allowed()))
                                    for g in self.gpus]
        seg.start_energy_joules = [g.energy_joules_at(now) for g in self.gpus]
        self._apply_power(seg, now)
        return seg.end_s

    def _apply_power(self, seg: Segment, now: float) -> None:
        """Hold each GPU at the segment's mean power from now until the segment ends."""
        end = seg.end_s
        planned = seg.start_s if seg.planned_s is None else seg.planned_s
        total = end - planned
        for i, g in enumerate(self.gpus):
            joules = seg.joules(i, seg.iterations) + (seg.stall_joules[i] if seg.stall_joules else 0.0)
            if now > planned:  # re-planned mid-segment: what was drawn so far stays drawn
                joules -= g.energy_joules_at(now) - seg.start_energy_joules[i]
                total = end - now
            power = joules / total if total > 0 else g.idle_power_watts()
            g.set_busy(power_watts=max(power, 0.0), clock_mhz=seg.clock_mhz, capped=seg.capped, at_s=now)

    def _truncate(self, now: float) -> float:
        seg = self.segment
        assert seg is not None
        if seg.iterations > 1 and now < seg.end_s:
            j = seg.iterations_within(now - seg.start_s)
            if j < seg.iterations:
                seg.iterations = j
                self._apply_power(seg, now)
        return seg.end_s

    def replan_after_settings_change(self, now: float) -> float | None:
        """A power limit or clock lock changed: cut the run at the iteration in flight."""
        if self.segment is None:
            for g in self.gpus:
                g.set_idle(at_s=now)
            return None
        return self._truncate(now)

    # --- predictions for placement and the governor ---------------------------------------------
    def predict(self, extra_decode: int = 1, prefill_tokens: int = 1024) -> dict[str, float]:
        n = len(self.running) + extra_decode
        ctx = self._dec_base + len(self.running) * self.iteration + extra_decode * prefill_tokens
        wd = iteration_work(self.model, decode_tokens=n, decode_context_tokens=ctx)
        td, ed, _, _ = self.operating_point(wd)
        wp = iteration_work(
            self.model, decode_tokens=n, decode_context_tokens=ctx, prefill_tokens=prefill_tokens,
            prefill_attention_pairs=prefill_tokens * prefill_tokens / 2.0, prefill_sequences=1,
        )
        tp, ep, _, _ = self.operating_point(wp)
        extra_s = max(tp - td, 1e-9)
        # how the decode step grows with the batch (placement predicts TPOT at the batch a request will see)
        k = _SLOPE_PROBE_SEQUENCES
        per_seq_ctx = ctx / n if n else float(prefill_tokens)
        wk = iteration_work(self.model, decode_tokens=n + k, decode_context_tokens=ctx + k * per_seq_ctx)
        tk, _, _, _ = self.operating_point(wk)
        return {
            "decode_seconds_per_token": td,
            "decode_seconds_per_token_per_sequence": max(tk - td, 0.0) / k,
            "prefill_tokens_per_second": prefill_tokens / extra_s,
            "joules_per_decode_token": sum(ed) / n,
            "joules_per_prefill_token": max(sum(ep) - sum(ed), 0.0) / prefill_tokens,
        }


Clock = Callable[[], float]


class RecentLatencies:
    """Sliding window of finished requests' TTFT and TPOT, for the p99s in ReplicaStats."""

    def __init__(self, size: int = 256):
        self.ttft: deque[float] = deque(maxlen=size)
        self.tpot: deque[float] = deque(maxlen=size)
        self._p99: dict[str, float | None] | None = None

    def p99(self) -> dict[str, float | None]:
        if self._p99 is None:
            self._p99 = {"ttft_p99_seconds": self._pct99(self.ttft), "tpot_p99_seconds": self._pct99(self.tpot)}
        return self._p99

    def add(self, req: SimRequest) -> None:
        self._p99 = None
        if req.ttft_seconds is not None:
            self.ttft.append(req.ttft_seconds)
        if req.tpot_seconds is not None:
            self.tpot.append(req.tpot_seconds)

    @staticmethod
    def _pct99(values: deque[float]) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def replica_stats(core: BatchCore, model_id: str, replica_id: str, recent: RecentLatencies, now: float | None = None) -> dict:
    """ReplicaStats (scheduler/engines/base.py) for a simulated replica at this instant (`now`, for the arrival rate)."""
    pred = core.predict()
    stats = {
        "model_id": model_id,
        "replica_id": replica_id,
        "device_ids": [g.device_id for g in core.gpus],
        "node": core.gpus[0].node,
        "running": core.num_running,
        "waiting": core.num_waiting,
        "kv_cache_free_fraction": max(0.0, 1.0 - core.kv_used_tokens / core.kv_capacity_tokens),
        "power_watts": sum(g.power_watts() for g in core.gpus),
        "idle_power_watts": sum(g.idle_power_watts() for g in core.gpus),
        "requests_completed": core.completed,
        "queued_prefill_tokens": core.queued_prefill_tokens,
        **pred,
    }
    if now is not None:
        rate, prompt_rate = core.arrival_rates(now)
        stats["arrival_rate_per_second"] = rate
        stats["arrival_prompt_tokens_per_second"] = prompt_rate
    for key, p in recent.p99().items():
        if p is not None:
            stats[key] = p
    return stats

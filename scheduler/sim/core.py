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

from scheduler.sim.physics import IterationWork, OperatingPoint, iteration_work, operating_point
from scheduler.sim.profiles import ModelProfile

#: share of GPU memory vLLM may use (gpu_memory_utilization) and what it keeps for activations
GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES = 1.0e9
#: time constant of the exponentially weighted arrival rate a replica publishes for placement
ARRIVAL_RATE_WINDOW_SECONDS = 30.0
#: extra sequences at which the decode step time is probed for its per-sequence slope
_SLOPE_PROBE_SEQUENCES = 32


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
        for g in self.gpus:
            g.attach_model(True)

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

    def operating_point(self, work: IterationWork) -> tuple[float, list[float], bool, float]:
        """(seconds, joules per GPU, capped, clock) of one iteration across the replica's GPUs."""
        points: list[OperatingPoint] = []
        cache: dict[tuple, OperatingPoint] = {}
        for g in self.gpus:
            key = g.control_key()
            op = cache.get(key)
            if op is None:
                op = operating_point(g.profile, self.model.fit, work, g.power_limit_watts(), g.max_clock_mhz_allowed())
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
            seconds, joules, capped, clock = self.operating_point(work)
            seg = Segment(now, 1, seconds, 0.0, joules, [0.0] * len(joules), chunks, capped, clock)
            return self._start(seg, now)
        if n_run == 0:
            for g in self.gpus:
                g.set_idle(at_s=now)
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
        t0, e0, capped, clock = self.operating_point(w0)
        if k > 1:
            w1 = iteration_work(self.model, decode_tokens=n_run, decode_context_tokens=ctx0 + n_run * (k - 1))
            t1, e1, capped1, _ = self.operating_point(w1)
            dt = (t1 - t0) / (k - 1)
            de = [(b - a) / (k - 1) for a, b in zip(e0, e1)]
            capped = capped or capped1
        else:
            dt, de = 0.0, [0.0] * len(e0)
        seg = Segment(now, k, t0, dt, e0, de, [], capped, clock)
        if seg.seconds(k) > self.max_segment_seconds and k > 1:
            seg.iterations = seg.iterations_within(self.max_segment_seconds)
        return self._start(seg, now)

    def _heap_top(self) -> int:
        heap = self._heap
        while heap:
            it, _, req = heap[0]
            if req.state == "running" and req._finish_iter == it:
                return it
            heapq.heappop(heap)
        raise RuntimeError("running requests without a finish entry")  # pragma: no cover

    def _start(self, seg: Segment, now: float) -> float:
        self.segment = seg
        seg.start_energy_joules = [g.energy_joules_at(now) for g in self.gpus]
        self._apply_power(seg, now)
        return seg.end_s

    def _apply_power(self, seg: Segment, now: float) -> None:
        """Hold each GPU at the segment's mean power from now until the segment ends."""
        end = seg.end_s
        total = seg.seconds(seg.iterations)
        for i, g in enumerate(self.gpus):
            joules = seg.joules(i, seg.iterations)
            if now > seg.start_s:  # re-planned mid-segment: what was drawn so far stays drawn
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

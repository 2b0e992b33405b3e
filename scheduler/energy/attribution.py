"""Share each device's metered joules among the requests that ran on it (DESIGN.md, Energy accounting).

Inputs, all timestamped by the caller on one clock (time.time() seconds on the node):
- start(request_id, device_id, t_s) when a request begins on a device;
- progress(request_id, prefill_tokens_done, decode_tokens_done, t_s) with CUMULATIVE counts, every
  ~100 ms from the replica, fire-and-forget, possibly late or out of order;
- on_interval(device_id, t0_s, t1_s, energy_joules) from the device meter;
- finish(request_id, t_s, ...) once covered_until(device_id) >= t_s, returning a RequestEnergy.

Rules (docs/energy.md says the same in prose):
- A request's work curve W(t) is piecewise linear through (start, 0) and its reports, flat after
  the last report; work = decode tokens + prefill tokens x prefill_token_weight. Its work in an
  interval is W(t1) - W(t0), clipped to [start, finish].
- An interval's joules go to the requests active on the device in it, in proportion to their work
  in it; if none of them reported work there, in equal shares; if none was active, to the idle pool.
  When requests covered only part of an interval (one started or ended inside it, and nothing ran
  in the rest), only that busy fraction (by time) is shared; the rest is idle.
- Intervals wait settle_delay_seconds (of meter time) before they are settled, so late progress
  reports still count. A request that finishes takes its share of the unsettled intervals at once
  (with the data known then); the rest of each such interval goes, at settlement, to the others.
- Idle joules: a request finishing at t on a device is charged
      idle_metered(t - window, t) x its_work / work_finished(t - window, t)
  (window = idle_amortization_seconds; work_finished counts every request that finished on the
  device in the window, itself included), capped by the idle energy of that window not yet handed
  out, taken oldest first. Idle energy older than the window is never charged: it stays in the
  unassigned idle pool. Under steady traffic a request pays about idle_power / finish_rate x
  (its work / mean work), slightly less (conservative), and never more than the window held.
- Start-up: an Attributor made with starting_up=True keeps the idle energy metered before
  mark_ready(t) (models loading, the service not yet answering) in a start-up bucket of its own: it
  never enters the idle pool, so no request is charged for it. The first request to start marks
  the service ready if nothing did before.
- Conservation (exact up to float rounding): metered = per-request dynamic + per-request idle
  + idle pool (unassigned, including expired) + start-up + unsettled intervals. balance() reports each term.

Pure Python, no I/O, one lock: safe to call from the meter thread, Ray actor methods and asyncio.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestEnergy:
    """The energy one finished request is charged with."""

    request_id: str
    device_id: str
    dynamic_joules: float
    idle_joules: float
    #: weighted tokens (decode + prefill x prefill_token_weight) the attribution used
    work_tokens: float
    start_s: float
    finish_s: float
    #: False when the device never reported a meter interval: the joules are 0 and mean "unknown"
    metered: bool
    #: False when finish() ran before the meter covered finish_s: the tail was not charged
    complete: bool

    @property
    def joules(self) -> float:
        return self.dynamic_joules + self.idle_joules


@dataclass(frozen=True)
class EnergyBalance:
    """Where every metered joule of a device (or of all devices) went; terms sum to metered_joules."""

    metered_joules: float
    #: dynamic joules paid to requests (finished and still running)
    dynamic_joules: float
    #: idle joules paid to finished requests
    idle_assigned_joules: float
    #: idle joules not (yet) handed to any request, expired ones included
    idle_pool_joules: float
    #: joules of intervals still waiting for settlement
    unsettled_joules: float
    #: idle joules metered before the service was ready (start-up energy, charged to no request)
    startup_joules: float = 0.0

    @property
    def accounted_joules(self) -> float:
        return self.dynamic_joules + self.idle_assigned_joules + self.idle_pool_joules + self.unsettled_joules + self.startup_joules


@dataclass
class _Request:
    request_id: str
    device_id: str
    start_s: float
    #: work curve: sorted times and weighted cumulative work at those times (starts at (start_s, 0))
    times: list[float]
    works: list[float]
    finish_s: float | None = None
    dynamic_joules: float = 0.0

    def work_at(self, t: float) -> float:
        if t <= self.times[0]:
            return self.works[0]
        i = bisect.bisect_right(self.times, t)
        if i >= len(self.times):
            return self.works[-1]
        ta, tb = self.times[i - 1], self.times[i]
        wa, wb = self.works[i - 1], self.works[i]
        if tb <= ta:
            return wb
        return wa + (wb - wa) * (t - ta) / (tb - ta)

    def work_between(self, t0: float, t1: float) -> float:
        end = t1 if self.finish_s is None else min(t1, self.finish_s)
        begin = max(t0, self.start_s)
        if end <= begin:
            return 0.0
        return max(0.0, self.work_at(end) - self.work_at(begin))

    def span_in(self, t0: float, t1: float) -> tuple[float, float]:
        return (max(t0, self.start_s), t1 if self.finish_s is None else min(t1, self.finish_s))

    def active_in(self, t0: float, t1: float) -> bool:
        return self.start_s < t1 and (self.finish_s is None or self.finish_s > t0)

    def add_point(self, t: float, work: float) -> None:
        if t < self.times[0]:
            # a report stamped before start (clock skew): treat it as at start
            t = self.times[0]
        times, works = self.times, self.works
        if t >= times[-1]:  # the usual case: reports arrive in order
            times.append(t)
            works.append(max(work, works[-1]))
            return
        i = bisect.bisect_right(times, t)
        times.insert(i, t)
        # cumulative counts never go down: a late report cannot exceed what later ones said,
        # nor fall below what earlier ones said
        works.insert(i, min(max(work, works[i - 1]), works[i]))

    def prune_before(self, t: float) -> None:
        """Drop points no interval at or after t can need (keep the last one at or before t)."""
        i = bisect.bisect_right(self.times, t) - 1
        if i > 0:
            del self.times[:i]
            del self.works[:i]


@dataclass
class _Interval:
    t0_s: float
    t1_s: float
    joules: float
    remaining_joules: float
    #: request_id -> work it was credited with when it was paid early (it finished)
    paid_work: dict[str, float] = field(default_factory=dict)
    #: the part of the interval each early-paid request was running, (from_s, to_s)
    paid_spans: list[tuple[float, float]] = field(default_factory=list)

    def busy_joules(self, spans: list[tuple[float, float]]) -> float:
        """Joules of the part of the interval covered by at least one request's span."""
        length = self.t1_s - self.t0_s
        if any(b - a >= length for a, b in spans):
            return self.joules  # the usual case: someone ran throughout
        covered, end = 0.0, self.t0_s
        for a, b in sorted(spans):
            if b > end:
                covered += b - max(a, end)
                end = b
        return self.joules * min(1.0, covered / length)


@dataclass
class _Device:
    device_id: str
    covered_until_s: float | None = None
    pending: list[_Interval] = field(default_factory=list)
    active: dict[str, _Request] = field(default_factory=dict)
    #: [t1_s, idle joules metered, idle joules not yet handed out], oldest first
    idle_pool: deque[list[float]] = field(default_factory=deque)
    #: (finish_s, work) of requests that finished recently, for idle amortisation
    finished_work: deque[tuple[float, float]] = field(default_factory=deque)
    finished_work_sum: float = 0.0
    metered_joules: float = 0.0
    dynamic_joules: float = 0.0
    idle_assigned_joules: float = 0.0
    idle_expired_joules: float = 0.0
    startup_joules: float = 0.0


class Attributor:
    """Turns meter intervals and request progress into per-request joules (see module docstring)."""

    def __init__(
        self,
        *,
        prefill_token_weight: float = 0.25,
        idle_amortization_seconds: float = 60.0,
        settle_delay_seconds: float = 0.5,
        stale_request_seconds: float = 3600.0,
        starting_up: bool = False,
    ):
        if prefill_token_weight <= 0 or idle_amortization_seconds <= 0 or settle_delay_seconds < 0:
            raise ValueError("prefill_token_weight and idle_amortization_seconds must be > 0, settle_delay_seconds >= 0")
        self.prefill_token_weight = prefill_token_weight
        self.idle_amortization_seconds = idle_amortization_seconds
        self.settle_delay_seconds = settle_delay_seconds
        self.stale_request_seconds = stale_request_seconds
        self._lock = threading.RLock()
        self._devices: dict[str, _Device] = {}
        self._requests: dict[str, _Request] = {}
        #: requests dropped because they never finished within stale_request_seconds
        self.stale_requests_dropped = 0
        #: idle energy metered before this time is start-up energy; None: still starting up
        self._ready_s: float | None = None if starting_up else float("-inf")

    # --- inputs -----------------------------------------------------------------------------

    def register_device(self, device_id: str) -> None:
        """Declare that a meter feeds this device (optional: the first interval does it too)."""
        with self._lock:
            self._device(device_id)

    def mark_ready(self, t_s: float) -> None:
        """The service is ready from t_s on: idle energy metered before it is start-up energy. Only the first call counts."""
        with self._lock:
            if self._ready_s is None:
                self._ready_s = t_s

    def start(self, request_id: str, device_id: str, t_s: float) -> None:
        with self._lock:
            if self._ready_s is None:
                self._ready_s = t_s  # a request is being served: the service is ready at the latest now
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} was already started")
            req = _Request(request_id, device_id, t_s, [t_s], [0.0])
            self._requests[request_id] = req
            self._devices.setdefault(device_id, _Device(device_id)).active[request_id] = req

    def progress(self, request_id: str, prefill_tokens_done: int, decode_tokens_done: int, t_s: float) -> None:
        """Record cumulative work at t_s. Unknown (finished, dropped) requests are ignored: reports are late."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.finish_s is not None:
                return
            req.add_point(t_s, self._work(prefill_tokens_done, decode_tokens_done))

    def on_interval(self, device_id: str, t0_s: float, t1_s: float, energy_joules: float) -> None:
        """A meter interval: energy_joules metered on device_id between t0_s and t1_s."""
        if not (t1_s > t0_s) or energy_joules < 0:
            raise ValueError(f"bad interval [{t0_s}, {t1_s}] with {energy_joules} J")
        with self._lock:
            dev = self._device(device_id)
            iv = _Interval(t0_s, t1_s, energy_joules, energy_joules)
            if dev.pending and dev.pending[-1].t1_s > t1_s:
                keys = [p.t1_s for p in dev.pending]
                dev.pending.insert(bisect.bisect_right(keys, t1_s), iv)
            else:
                dev.pending.append(iv)
            dev.metered_joules += energy_joules
            if dev.covered_until_s is None or t1_s > dev.covered_until_s:
                dev.covered_until_s = t1_s
            self._settle(dev, dev.covered_until_s - self.settle_delay_seconds)
            self._drop_stale(dev, dev.covered_until_s)

    def finish(
        self,
        request_id: str,
        t_s: float,
        *,
        prefill_tokens_done: int | None = None,
        decode_tokens_done: int | None = None,
    ) -> RequestEnergy:
        """End a request at t_s and return its energy. Final counts, if given, act as a last report.

        Call it once covered_until(device) >= t_s (or use finish_when_covered); earlier, the part of
        the request after covered_until is not charged and complete is False.
        """
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                raise KeyError(f"request {request_id!r} is not running (never started or already finished)")
            if prefill_tokens_done is not None or decode_tokens_done is not None:
                req.add_point(t_s, self._work(prefill_tokens_done or 0, decode_tokens_done or 0))
            req.finish_s = t_s
            dev = self._devices[req.device_id]
            metered = dev.covered_until_s is not None
            complete = metered and dev.covered_until_s >= t_s  # type: ignore[operator]
            for iv in dev.pending:
                if req.active_in(iv.t0_s, iv.t1_s):
                    self._pay_early(dev, iv, req)
            dev.active.pop(request_id, None)
            work = req.works[-1]
            idle = self._take_idle(dev, t_s, work)
            return RequestEnergy(
                request_id=request_id,
                device_id=req.device_id,
                dynamic_joules=req.dynamic_joules,
                idle_joules=idle,
                work_tokens=work,
                start_s=req.start_s,
                finish_s=t_s,
                metered=metered,
                complete=complete,
            )

    def discard(self, request_id: str) -> None:
        """Forget a request without charging it (it never ran); its shares go to the others or idle."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is not None:
                dev = self._devices[req.device_id]
                dev.dynamic_joules -= req.dynamic_joules
                # what it was already paid goes back as idle energy so conservation holds
                if req.dynamic_joules > 0:
                    self._add_idle(dev, dev.covered_until_s or req.start_s, req.dynamic_joules)
                dev.active.pop(request_id, None)

    async def finish_when_covered(
        self,
        request_id: str,
        t_s: float,
        *,
        timeout_seconds: float = 2.0,
        poll_seconds: float = 0.02,
        prefill_tokens_done: int | None = None,
        decode_tokens_done: int | None = None,
    ) -> RequestEnergy:
        """Wait (without blocking the event loop) until the meter covers t_s, then finish."""
        device_id = self.device_of(request_id)
        deadline = time.monotonic() + timeout_seconds
        while device_id is not None:
            covered = self.covered_until(device_id)
            if covered is None or covered >= t_s or time.monotonic() >= deadline:
                break
            await asyncio.sleep(poll_seconds)
        return self.finish(request_id, t_s, prefill_tokens_done=prefill_tokens_done, decode_tokens_done=decode_tokens_done)

    # --- queries ----------------------------------------------------------------------------

    def covered_until(self, device_id: str) -> float | None:
        """End of the newest interval metered on the device; None if no meter has reported."""
        with self._lock:
            dev = self._devices.get(device_id)
            return None if dev is None else dev.covered_until_s

    def device_of(self, request_id: str) -> str | None:
        with self._lock:
            req = self._requests.get(request_id)
            return None if req is None else req.device_id

    def running(self, device_id: str | None = None) -> int:
        with self._lock:
            if device_id is None:
                return len(self._requests)
            dev = self._devices.get(device_id)
            return 0 if dev is None else len(dev.active)

    @property
    def ready_s(self) -> float | None:
        """When the service became ready (-inf when made without starting_up); None while starting up."""
        return self._ready_s

    def startup_joules(self, device_id: str) -> float:
        """Start-up energy of a device so far (idle energy settled before the ready time)."""
        with self._lock:
            dev = self._devices.get(device_id)
            return 0.0 if dev is None else dev.startup_joules

    def startup_settled(self, device_id: str) -> bool:
        """True once every interval before the ready time is settled: startup_joules is final."""
        with self._lock:
            dev = self._devices.get(device_id)
            if self._ready_s is None or dev is None or dev.covered_until_s is None:
                return False
            return not dev.pending or dev.pending[0].t0_s >= self._ready_s

    def balance(self, device_id: str | None = None) -> EnergyBalance:
        """Where the metered joules went, for one device or all of them."""
        with self._lock:
            devs = list(self._devices.values()) if device_id is None else [self._devices[device_id]]
            return EnergyBalance(
                metered_joules=sum(d.metered_joules for d in devs),
                dynamic_joules=sum(d.dynamic_joules for d in devs),
                idle_assigned_joules=sum(d.idle_assigned_joules for d in devs),
                idle_pool_joules=sum(d.idle_expired_joules + sum(e[2] for e in d.idle_pool) for d in devs),
                unsettled_joules=sum(iv.remaining_joules for d in devs for iv in d.pending),
                startup_joules=sum(d.startup_joules for d in devs),
            )

    def memory_items(self) -> int:
        """Number of retained records (requests, report points, intervals, idle entries): for tests."""
        with self._lock:
            n = sum(len(r.times) for r in self._requests.values())
            for d in self._devices.values():
                n += len(d.pending) + len(d.idle_pool) + len(d.finished_work)
            return n

    # --- internals (lock held) --------------------------------------------------------------

    def _work(self, prefill_tokens: int, decode_tokens: int) -> float:
        return max(0, decode_tokens) + max(0, prefill_tokens) * self.prefill_token_weight

    def _device(self, device_id: str) -> _Device:
        dev = self._devices.get(device_id)
        if dev is None:
            dev = self._devices[device_id] = _Device(device_id)
        return dev

    def _participants(self, dev: _Device, iv: _Interval) -> list[_Request]:
        return [r for r in dev.active.values() if r.request_id not in iv.paid_work and r.active_in(iv.t0_s, iv.t1_s)]

    def _pay(self, dev: _Device, req: _Request, joules: float) -> None:
        req.dynamic_joules += joules
        dev.dynamic_joules += joules

    def _pay_early(self, dev: _Device, iv: _Interval, req: _Request) -> None:
        """Pay a finishing request its share of an unsettled interval, from what is known now."""
        others = [r for r in self._participants(dev, iv) if r is not req]
        own_span = req.span_in(iv.t0_s, iv.t1_s)
        busy = iv.busy_joules(iv.paid_spans + [own_span] + [r.span_in(iv.t0_s, iv.t1_s) for r in others])
        work = req.work_between(iv.t0_s, iv.t1_s)
        if not others:
            # the last one running takes what is left of the busy part; the rest becomes idle later
            share = busy - (iv.joules - iv.remaining_joules)
        else:
            total = work + sum(iv.paid_work.values()) + sum(r.work_between(iv.t0_s, iv.t1_s) for r in others)
            if total > 0:
                share = busy * work / total
            else:
                share = busy / (1 + len(iv.paid_work) + len(others))
        share = max(0.0, min(share, iv.remaining_joules))
        iv.paid_work[req.request_id] = work
        iv.paid_spans.append(own_span)
        iv.remaining_joules -= share
        self._pay(dev, req, share)

    def _settle(self, dev: _Device, up_to_s: float) -> None:
        """Settle every pending interval that ends at or before up_to_s."""
        n = 0
        for iv in dev.pending:
            if iv.t1_s > up_to_s:
                break
            n += 1
            parts = self._participants(dev, iv)
            if parts:
                # only the part of the interval when something ran is busy; the rest is idle
                busy = iv.busy_joules(iv.paid_spans + [r.span_in(iv.t0_s, iv.t1_s) for r in parts])
                to_share = max(0.0, min(iv.remaining_joules, busy - (iv.joules - iv.remaining_joules)))
                works = [r.work_between(iv.t0_s, iv.t1_s) for r in parts]
                total = sum(works)
                left = to_share
                for i, r in enumerate(parts):
                    if i == len(parts) - 1:
                        share = left  # the last takes the rounding remainder: conservation is exact
                    elif total > 0:
                        share = to_share * works[i] / total
                    else:
                        share = to_share / len(parts)
                    share = min(share, left)
                    left -= share
                    self._pay(dev, r, share)
                iv.remaining_joules -= to_share
            if iv.remaining_joules > 0:
                self._add_idle(dev, iv.t1_s, iv.remaining_joules, t0_s=iv.t0_s)
                iv.remaining_joules = 0.0
        if n:
            del dev.pending[:n]
            # nothing earlier than the oldest unsettled interval will be asked of a work curve again
            horizon = dev.pending[0].t0_s if dev.pending else up_to_s
            for r in dev.active.values():
                r.prune_before(horizon)

    def _add_idle(self, dev: _Device, t_s: float, joules: float, t0_s: float | None = None) -> None:
        ready = self._ready_s
        if ready is None or t_s <= ready:
            dev.startup_joules += joules
            return
        if t0_s is not None and t0_s < ready:
            # the interval spans the ready time: the part before it is start-up energy
            before = joules * (ready - t0_s) / (t_s - t0_s)
            dev.startup_joules += before
            joules -= before
        # entries are [time, joules metered, joules not yet handed out]; one entry per second of
        # idle keeps the pool short at 10 Hz metering
        last = dev.idle_pool[-1] if dev.idle_pool else None
        if last is not None and 0.0 <= t_s - last[0] < 1.0:
            last[0] = t_s
            last[1] += joules
            last[2] += joules
        else:
            dev.idle_pool.append([t_s, joules, joules])

    def _take_idle(self, dev: _Device, t_s: float, work: float) -> float:
        """Hand a finishing request its idle share (rule in the module docstring and docs/energy.md)."""
        window_start = t_s - self.idle_amortization_seconds
        while dev.idle_pool and dev.idle_pool[0][0] < window_start:
            dev.idle_expired_joules += dev.idle_pool.popleft()[2]
        while dev.finished_work and dev.finished_work[0][0] < window_start:
            dev.finished_work_sum -= dev.finished_work.popleft()[1]
        dev.finished_work.append((t_s, work))
        dev.finished_work_sum += work
        if len(dev.finished_work) == 1:
            dev.finished_work_sum = work  # drop accumulated float drift whenever the window empties
        total_work = dev.finished_work_sum
        fraction = work / total_work if total_work > 0 else 1.0 / len(dev.finished_work)
        in_window = [e for e in dev.idle_pool if e[0] <= t_s]  # idle metered after it ended is not its cost
        metered = sum(e[1] for e in in_window)
        want = metered * fraction
        taken = 0.0
        # oldest first, so what is left to expire is the most recent idle energy
        for e in in_window:
            if taken >= want:
                break
            part = min(e[2], want - taken)
            e[2] -= part
            taken += part
        dev.idle_assigned_joules += taken
        return taken

    def _drop_stale(self, dev: _Device, now_s: float) -> None:
        limit = now_s - self.stale_request_seconds
        stale = [rid for rid, r in dev.active.items() if r.start_s < limit]
        for rid in stale:
            # keep what they were paid inside dynamic_joules: it is still accounted for
            req = self._requests.pop(rid)
            dev.active.pop(rid)
            dev.dynamic_joules -= req.dynamic_joules
            dev.idle_expired_joules += req.dynamic_joules
            self.stale_requests_dropped += 1

"""Admission by the SLO: refuse a request at once when no adequate model can start it within its TTFT target.

Placement (routing/placement.py) predicts a replica's TTFT from the stats the replica publishes,
but a request can also wait before any replica sees it: in Ray Serve's queue once every replica
holds max_ongoing_requests. Those waits are visible only to the gateway, so StartQueue measures
them: per model, the requests handed to Serve that have not started yet (pending) and the rate at
which requests start. By Little's law a new request would wait about pending / start rate before
its replica starts it; the replica's own queue (placement's queue_seconds) comes on top.

admit() walks the routing decision's adequate models in preference order and keeps the first
whose predicted start wait is within the limit: the request's TTFT target for "interactive",
batch_wait_factor x that target for "batch" (batch work accepts queueing, not unbounded queueing).
When none qualifies the gateway answers 503 no_capacity with Retry-After instead of queueing.
The placement margin decides where a request goes; admission refuses only on the unmargined
prediction, so a request that would probably make it is never refused.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

#: start events older than this no longer count toward a model's start rate
RATE_WINDOW_SECONDS = 5.0
#: Retry-After bounds (seconds) for a refused request
MIN_RETRY_AFTER_SECONDS = 1
MAX_RETRY_AFTER_SECONDS = 60


@dataclass
class _ModelQueue:
    pending: dict[int, float] = field(default_factory=dict)  # token -> dispatch time
    starts: deque[float] = field(default_factory=deque)  # start times within the window
    first_seen: float | None = None  # the first dispatch: before a full window, the rate is over less time


class StartQueue:
    """Requests dispatched to each model but not yet started, and how fast that model starts them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_seconds: float = RATE_WINDOW_SECONDS):
        self._clock = clock
        self._window = window_seconds
        self._models: dict[str, _ModelQueue] = {}
        self._next = 0

    def _q(self, model: str) -> _ModelQueue:
        return self._models.setdefault(model, _ModelQueue())

    def dispatched(self, model: str) -> int:
        q, now = self._q(model), self._clock()
        if q.first_seen is None:
            q.first_seen = now
        self._next += 1
        q.pending[self._next] = now
        return self._next

    def started(self, model: str, token: int) -> None:
        q = self._q(model)
        if q.pending.pop(token, None) is not None:
            q.starts.append(self._clock())

    def abandoned(self, model: str, token: int) -> None:
        self._q(model).pending.pop(token, None)

    @contextmanager
    def track(self, model: str) -> Iterator[Callable[[], None]]:
        """`with starts.track(model) as started: ...; started()`; leaving without started() abandons."""
        token = self.dispatched(model)
        try:
            yield lambda: self.started(model, token)
        finally:
            self.abandoned(model, token)

    def pending(self, model: str) -> int:
        return len(self._q(model).pending)

    def start_rate_per_second(self, model: str) -> float | None:
        """Starts per second over the recent window; None before the model has been busy at all."""
        q, now = self._q(model), self._clock()
        while q.starts and q.starts[0] < now - self._window:
            q.starts.popleft()
        if q.first_seen is None:
            return None
        # a model first used 1 s ago has had 1 s to start requests, not the whole window
        return len(q.starts) / min(self._window, max(now - q.first_seen, 1e-3))

    def predicted_wait_seconds(self, model: str) -> float:
        """How long a request dispatched now would wait before a replica starts it."""
        q = self._q(model)
        if not q.pending:
            return 0.0
        now = self._clock()
        oldest_age = now - min(q.pending.values())
        rate = self.start_rate_per_second(model)
        if not rate:
            return oldest_age  # nothing started lately: at least as long as the oldest has waited
        return len(q.pending) / rate  # the requests ahead of this one start at `rate` (Little's law)


@dataclass(frozen=True)
class Admission:
    model: str | None  # the model to run, or None: refuse
    wait_seconds: float  # the predicted start wait of that model (or the least of all, when refused)
    limit_seconds: float
    reason: str
    retry_after_seconds: int | None = None


def wait_limit_seconds(ttft_slo_seconds: float, priority: str, batch_wait_factor: float) -> float:
    return ttft_slo_seconds * (batch_wait_factor if priority == "batch" else 1.0)


def admit(candidates: list[tuple[str, float | None]], starts: StartQueue, limit_seconds: float) -> Admission:
    """The first candidate (model, replica queue seconds or None) that can start within the limit.

    candidates come in routing preference order (the chosen model, then its fallbacks).
    """
    waits: list[tuple[str, float]] = []
    for model, replica_queue_s in candidates:
        wait = starts.predicted_wait_seconds(model) + (replica_queue_s or 0.0)
        if wait <= limit_seconds:
            return Admission(model, wait, limit_seconds, f"predicted start wait {wait * 1000:.0f} ms")
        waits.append((model, wait))
    least = min((w for _, w in waits), default=math.inf)
    # come back once the queue ahead has drained: a shorter hint brings refused clients back into a
    # still-full queue, and under a crowd of them the refusals alone would keep the gateway busy
    retry = int(min(max(math.ceil(least), MIN_RETRY_AFTER_SECONDS), MAX_RETRY_AFTER_SECONDS)) \
        if math.isfinite(least) else MIN_RETRY_AFTER_SECONDS
    detail = ", ".join(f"{m} {w:.1f} s" for m, w in waits)
    return Admission(None, least, limit_seconds,
                     f"no adequate model can start the request within {limit_seconds * 1000:.0f} ms (predicted start waits: {detail})",
                     retry_after_seconds=retry)

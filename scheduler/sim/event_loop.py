"""Virtual time for replays: a clock the simulated devices read and a heap of timed callbacks."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class EventLoop:
    """A heap of (time, sequence, callback, argument); callbacks run in time order, ties FIFO."""

    def __init__(self, clock: VirtualClock):
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def run(self) -> None:
        heap, clock, pop = self._heap, self.clock, heapq.heappop
        while heap:
            t, _, fn, arg = pop(heap)
            clock.now = t
            fn(arg)

    def __len__(self) -> int:
        return len(self._heap)

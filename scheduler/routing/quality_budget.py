"""A quality budget: min_quality held as an average of predicted quality over a window of requests, not as a wall per request.

With the per-request wall (the default), a request goes to a model only if that model's predicted
quality reaches min_quality. With a budget, the target is the mean predicted quality of the recent
requests as served. For two models, predicted quality is a = P(small adequate) on the small model
and 1 on the large one, so the mean is the expected share of requests answered as well as the
large model would have: the budget spends the allowed shortfall on the requests whose predicted
gain from the large model (1 - a) is smallest.

threshold(): the lowest adequacy threshold t such that, over the window of recent adequacies,
sending every request with a >= t to the small model keeps the mean at the target plus any debt
(how far the served mean has fallen below the target, repaid by tightening the threshold).
shed_threshold(): the same at target - overload_allowance, without debt: when no adequate model
can meet the SLO, route() may shed a request to a smaller model that can, if its predicted quality
reaches this threshold; the debt it leaves is repaid afterwards. Shedding stops while the served
mean is below target - overload_allowance.
"""

from __future__ import annotations

from collections import deque

import numpy as np

#: requests seen before the budget departs from the per-request wall
MIN_WINDOW_REQUESTS = 50
#: the threshold is recomputed every this many requests (a sort of the window each time)
RECOMPUTE_EVERY = 16


class QualityBudget:
    """Window state of one quality budget (one per router; see the module docstring)."""

    def __init__(self, target: float, *, window_requests: int = 1000, overload_allowance: float = 0.02,
                 initial_threshold: float | None = None):
        """initial_threshold: the per-request wall used until the window holds MIN_WINDOW_REQUESTS (default: target)."""
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"quality budget target must be between 0 and 1, got {target!r}")
        if window_requests < MIN_WINDOW_REQUESTS:
            raise ValueError(f"window_requests must be at least {MIN_WINDOW_REQUESTS}, got {window_requests!r}")
        if not 0.0 <= overload_allowance < 1.0:
            raise ValueError(f"overload_allowance must be in [0, 1), got {overload_allowance!r}")
        self.target = target
        self.overload_allowance = overload_allowance
        self.initial_threshold = target if initial_threshold is None else initial_threshold
        self._adequacy: deque[float] = deque(maxlen=window_requests)
        self._served: deque[float] = deque(maxlen=window_requests)
        self._served_sum = 0.0
        self._since = RECOMPUTE_EVERY
        self._cached: tuple[float, float] = (self.initial_threshold, self.initial_threshold)
        self.shed = 0

    @property
    def served_mean(self) -> float | None:
        return self._served_sum / len(self._served) if self._served else None

    @staticmethod
    def _threshold_for(adequacies: np.ndarray, goal: float) -> float:
        if goal >= 1.0:
            return float("inf")
        a = np.sort(adequacies)[::-1]
        # sending the top k small costs sum(1 - a) over them; allowed: n x (1 - goal)
        cost = np.cumsum(1.0 - a)
        allowed = len(a) * (1.0 - goal)
        k = int(np.searchsorted(cost, allowed, side="right"))
        if k >= len(a):  # the whole window fits: what is left covers one more request of gain up to the rest
            return max(0.0, 1.0 - (allowed - float(cost[-1])))
        return float(a[k - 1]) if k >= 1 else float("inf")

    def _refresh(self) -> tuple[float, float]:
        if len(self._adequacy) < MIN_WINDOW_REQUESTS:
            return self.initial_threshold, self.initial_threshold
        if self._since >= RECOMPUTE_EVERY:
            self._since = 0
            a = np.fromiter(self._adequacy, float, len(self._adequacy))
            mean = self.served_mean
            debt = max(0.0, self.target - mean) if mean is not None else 0.0
            floor = self.target - self.overload_allowance
            # no shedding once the served mean has already fallen below what overload may cost
            shed = self._threshold_for(a, floor) if mean is None or mean >= floor else float("inf")
            self._cached = (self._threshold_for(a, min(1.0, self.target + debt)), shed)
        return self._cached

    def threshold(self) -> float:
        """Predicted quality a model needs for this request in normal operation."""
        return self._refresh()[0]

    def shed_threshold(self) -> float:
        """Predicted quality a smaller model needs to take this request when no adequate model meets the SLO."""
        return self._refresh()[1]

    def record(self, adequacy: float | None, served_quality: float | None) -> None:
        """After a decision: the request's adequacy and the predicted quality of the model that serves it."""
        if adequacy is not None:
            self._adequacy.append(float(adequacy))
            self._since += 1
        if served_quality is not None:
            if len(self._served) == self._served.maxlen:
                self._served_sum -= self._served[0]
            self._served.append(float(served_quality))
            self._served_sum += float(served_quality)

    def amend_last(self, served_quality: float | None) -> None:
        """Correct the last record() once its request was admitted elsewhere (served_quality: the predicted
        quality of the model that serves it) or refused (None: the record goes, as if it never came)."""
        if not self._served:
            return
        self._served_sum -= self._served.pop()
        if served_quality is None:
            if self._adequacy:
                self._adequacy.pop()
                self._since = max(0, self._since - 1)
            return
        self._served.append(float(served_quality))
        self._served_sum += float(served_quality)

    def state(self) -> dict[str, float | int | None]:
        t, s = self._cached
        return {"target": self.target, "served_mean": self.served_mean, "threshold": t, "shed_threshold": s,
                "window": len(self._adequacy), "shed": self.shed}

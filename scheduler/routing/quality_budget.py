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

Ranking (rank=): "gain" spends the shortfall on the requests of smallest predicted gain, whatever they
cost. "gain-per-joule" spends it where each unit of quality given up saves the most energy: each
request carries a weight, the energy the small model saves on it (route() gives the size prior's
joules for its prompt and output tokens), and the budget keeps a bound r on gain per joule saved:
a request goes small when (1 - a) <= r x weight, i.e. a >= 1 - r x weight. That is the Lagrangian
solution of "least energy at this mean quality": a long request goes small at a lower adequacy
than a short one, because it saves more. With equal weights both rankings give the same threshold.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

#: requests seen before the budget departs from the per-request wall
MIN_WINDOW_REQUESTS = 50
#: the threshold is recomputed every this many requests (a sort of the window each time)
RECOMPUTE_EVERY = 16
#: how the budget picks the requests that give up quality (see the module docstring)
RANKS = ("gain", "gain-per-joule")


class QualityBudget:
    """Window state of one quality budget (one per router; see the module docstring)."""

    def __init__(self, target: float, *, window_requests: int = 1000, overload_allowance: float = 0.02,
                 initial_threshold: float | None = None, rank: str = "gain", prompt_token_weight: float | None = None):
        """initial_threshold: the per-request wall used until the window holds MIN_WINDOW_REQUESTS (default: target).
        prompt_token_weight: under rank gain-per-joule, the joules of a prompt token as a fraction of an output
        token's in each request's weight (None: the size prior's fraction, routing.placement)."""
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"quality budget target must be between 0 and 1, got {target!r}")
        if window_requests < MIN_WINDOW_REQUESTS:
            raise ValueError(f"window_requests must be at least {MIN_WINDOW_REQUESTS}, got {window_requests!r}")
        if not 0.0 <= overload_allowance < 1.0:
            raise ValueError(f"overload_allowance must be in [0, 1), got {overload_allowance!r}")
        if rank not in RANKS:
            raise ValueError(f"quality budget rank must be one of {', '.join(RANKS)}, got {rank!r}")
        if prompt_token_weight is not None and not (0.0 <= prompt_token_weight and math.isfinite(prompt_token_weight)):
            raise ValueError(f"prompt_token_weight must be a finite number >= 0, got {prompt_token_weight!r}")
        self.prompt_token_weight = prompt_token_weight
        self.target = target
        self.rank = rank
        self.overload_allowance = overload_allowance
        self.initial_threshold = target if initial_threshold is None else initial_threshold
        self._adequacy: deque[float] = deque(maxlen=window_requests)
        #: each windowed request's weight (gain-per-joule: joules the small model saves; gain: 1)
        self._weight: deque[float] = deque(maxlen=window_requests)
        self._served: deque[float] = deque(maxlen=window_requests)
        self._served_sum = 0.0
        self._since = RECOMPUTE_EVERY
        self._cached: tuple[float, float] = (self.initial_threshold, self.initial_threshold)
        #: gain-per-joule: the bounds r (normal, shed) on gain per joule saved and the window's mean weight at
        #: the same recompute; None until the window fills
        self._bounds: tuple[float, float] | None = None
        self._mean_weight = 1.0
        self.shed = 0

    @property
    def weighted(self) -> bool:
        """Whether route() must pass each request's weight (rank gain-per-joule)."""
        return self.rank == "gain-per-joule"

    @property
    def served_mean(self) -> float | None:
        return self._served_sum / len(self._served) if self._served else None

    @staticmethod
    def served_mean_under_wall(adequacies: np.ndarray, wall: float) -> float:
        """The window mean a per-request wall gives (a on the small model when a >= wall, else 1 on the large):
        the target that routes like that wall in steady state."""
        a = np.asarray(adequacies, dtype=np.float64)
        return float(np.mean(np.where(a >= wall, a, 1.0)))

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

    @staticmethod
    def _bound_for(adequacies: np.ndarray, weights: np.ndarray, goal: float) -> float:
        """The largest gain per unit weight r such that sending small every request with 1 - a <= r x weight
        keeps the window's mean predicted quality at goal (-inf: none may go small)."""
        if goal >= 1.0:
            return -math.inf
        gain = 1.0 - adequacies
        ratio = gain / np.maximum(weights, 1e-12)
        order = np.argsort(ratio, kind="stable")
        cost = np.cumsum(gain[order])
        allowed = len(gain) * (1.0 - goal)
        k = int(np.searchsorted(cost, allowed, side="right"))
        if k >= len(gain):  # the whole window fits
            return math.inf
        return float(ratio[order[k - 1]]) if k >= 1 else -math.inf

    def _refresh(self) -> tuple[float, float]:
        """(normal, shed) thresholds under rank gain; under gain-per-joule the bounds in self._bounds instead."""
        if len(self._adequacy) < MIN_WINDOW_REQUESTS:
            return self.initial_threshold, self.initial_threshold
        if self._since >= RECOMPUTE_EVERY:
            self._since = 0
            a = np.fromiter(self._adequacy, float, len(self._adequacy))
            mean = self.served_mean
            debt = max(0.0, self.target - mean) if mean is not None else 0.0
            floor = self.target - self.overload_allowance
            # no shedding once the served mean has already fallen below what overload may cost
            may_shed = mean is None or mean >= floor
            goal = min(1.0, self.target + debt)
            if self.weighted:
                w = np.fromiter(self._weight, float, len(self._weight))
                self._bounds = (self._bound_for(a, w, goal), self._bound_for(a, w, floor) if may_shed else -math.inf)
                self._mean_weight = float(w.mean())
            else:
                self._cached = (self._threshold_for(a, goal), self._threshold_for(a, floor) if may_shed else float("inf"))
        return self._cached

    def _per_request(self, bound: float, weight: float | None) -> float:
        """A request's threshold under the bound r on gain per joule (weight None: the window's mean weight)."""
        if bound == -math.inf:
            return math.inf
        if bound == math.inf:
            return 0.0
        w = self._mean_weight if weight is None else weight
        return 1.0 - bound * max(float(w), 0.0)

    def threshold(self, weight: float | None = None) -> float:
        """Predicted quality a model needs for this request in normal operation (weight: the request's, for
        rank gain-per-joule, whose threshold without one is that of the window's mean weight; rank gain ignores it)."""
        cached = self._refresh()
        return cached[0] if self._bounds is None else self._per_request(self._bounds[0], weight)

    def shed_threshold(self, weight: float | None = None) -> float:
        """Predicted quality a smaller model needs to take this request when no adequate model meets the SLO."""
        cached = self._refresh()
        return cached[1] if self._bounds is None else self._per_request(self._bounds[1], weight)

    def record(self, adequacy: float | None, served_quality: float | None, weight: float | None = None) -> None:
        """After a decision: the request's adequacy, the predicted quality of the model that serves it, and
        its weight (rank gain-per-joule; 1 when not given)."""
        if adequacy is not None:
            self._adequacy.append(float(adequacy))
            self._weight.append(1.0 if weight is None else float(weight))
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
                self._weight.pop()
                self._since = max(0, self._since - 1)
            return
        self._served.append(float(served_quality))
        self._served_sum += float(served_quality)

    def state(self) -> dict[str, float | int | str | None]:
        """The budget's figures as of its last recompute; with rank gain-per-joule, threshold is the one a
        request of the window's mean weight meets, and gain_per_joule_bound the bound r itself."""
        t, s = self._cached
        if self._bounds is not None:
            t, s = self._per_request(self._bounds[0], None), self._per_request(self._bounds[1], None)
        state: dict[str, float | int | str | None] = {
            "target": self.target, "served_mean": self.served_mean, "threshold": t, "shed_threshold": s,
            "window": len(self._adequacy), "shed": self.shed, "rank": self.rank}
        if self._bounds is not None:
            state["gain_per_joule_bound"] = self._bounds[0]
        return state

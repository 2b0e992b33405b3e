"""RouteLLM's router metrics: the strong-share/accuracy curve, PGR, APGR and CPT(x).

A router gives each prompt a score (higher = more in need of the strong model). Sweeping the
threshold from "always weak" to "always strong" sends the top-k prompts to the strong model for
k = 0..N; every k is one point of the curve, so no threshold grid hides part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: numpy 2 renamed trapz; the package supports numpy >= 1.26
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


@dataclass
class RoutingCurve:
    strong_share: np.ndarray  # k / N, k = 0..N
    accuracy: np.ndarray
    #: the score at or above which a prompt goes to the strong model for each point (inf: none)
    thresholds: np.ndarray
    weak_accuracy: float
    strong_accuracy: float

    @property
    def pgr(self) -> np.ndarray:
        gap = self.strong_accuracy - self.weak_accuracy
        if gap <= 0:
            raise ValueError("the strong model is not more accurate than the weak one on this data; PGR is undefined")
        return (self.accuracy - self.weak_accuracy) / gap

    def apgr(self) -> float:
        """Area under PGR against strong-call share (random router: 0.5)."""
        return float(_trapezoid(self.pgr, self.strong_share))

    def cpt(self, target_pgr: float) -> float:
        """Smallest strong-call share whose PGR reaches target_pgr (linear between curve points)."""
        pgr = self.pgr
        hit = np.nonzero(pgr >= target_pgr - 1e-12)[0]
        if len(hit) == 0:
            return 1.0
        k = int(hit[0])
        if k == 0:
            return 0.0
        x0, x1, y0, y1 = self.strong_share[k - 1], self.strong_share[k], pgr[k - 1], pgr[k]
        return float(x0 + (target_pgr - y0) * (x1 - x0) / (y1 - y0)) if y1 != y0 else float(x1)

    def summary(self) -> dict[str, float]:
        return {"apgr": self.apgr(), "cpt50": self.cpt(0.5), "cpt80": self.cpt(0.8)}


def routing_curve(scores: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray) -> RoutingCurve:
    scores = np.asarray(scores, dtype=np.float64)
    weak = np.asarray(weak_correct, dtype=np.float64)
    strong = np.asarray(strong_correct, dtype=np.float64)
    n = len(scores)
    if n == 0:
        raise ValueError("no rows to evaluate")
    # stable order: ties keep file order, so the curve is reproducible
    order = np.argsort(-scores, kind="stable")
    gain = (strong - weak)[order]
    acc = (weak.sum() + np.concatenate([[0.0], np.cumsum(gain)])) / n
    share = np.arange(n + 1) / n
    thresholds = np.concatenate([[np.inf], scores[order]])
    return RoutingCurve(share, acc, thresholds, float(weak.mean()), float(strong.mean()))


def random_router_summary(weak_correct: np.ndarray, strong_correct: np.ndarray, seeds: int = 200) -> dict[str, float]:
    """Mean metrics of a router that scores prompts uniformly at random (expected APGR 0.5, CPT(50%) 50%)."""
    rng = np.random.default_rng(12345)
    rows = [routing_curve(rng.random(len(weak_correct)), weak_correct, strong_correct).summary() for _ in range(seeds)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def oracle_summary(weak_correct: np.ndarray, strong_correct: np.ndarray) -> dict[str, float]:
    """The best possible router: strong only where strong is right and weak is wrong."""
    need = ((np.asarray(strong_correct) == 1) & (np.asarray(weak_correct) == 0)).astype(float)
    return routing_curve(need, weak_correct, strong_correct).summary()

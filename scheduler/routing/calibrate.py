"""Threshold calibration: from labelled data, the quality target that meets an operator's goal.

Goals: recover a share of the strong model's quality (target PGR, e.g. 0.95) or send a share of
traffic to the strong model (e.g. 0.3). With two models, a request goes to the large one exactly
when the predictor's adequacy is below routing.default_min_quality, so that one number is the
threshold; with N models the same target applies along the quality rule of select.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.routing.adequacy import GAIN_FLOOR, AdequacyPredictor
from scheduler.routing.data import RoutingData
from scheduler.routing.metrics import routing_curve


@dataclass
class Calibration:
    min_quality: float
    strong_share: float
    pgr: float
    accuracy: float
    rows: int
    goal: str

    def yaml_snippet(self, source: str) -> str:
        return (
            "routing:\n"
            f"  # calibrated by `wattlane route-calibrate` on {source} ({self.rows} rows): {self.goal}\n"
            f"  # -> strong-model share {self.strong_share:.1%}, PGR {self.pgr:.3f}, accuracy {self.accuracy:.1%}\n"
            f"  default_min_quality: {self.min_quality:.4f}\n"
        )


def calibrate(
    predictor: AdequacyPredictor, data: RoutingData, *, target_pgr: float | None = None, strong_share: float | None = None
) -> Calibration:
    if (target_pgr is None) == (strong_share is None):
        raise ValueError("give exactly one of target_pgr or strong_share")
    need = predictor.strong_needed_many(data.prompts)
    curve = routing_curve(need, data.weak_correct, data.strong_correct)
    n = len(data)
    if target_pgr is not None:
        if not 0.0 <= target_pgr <= 1.0:
            raise ValueError("target PGR must be between 0 and 1")
        pgr = curve.pgr
        hits = np.nonzero(pgr >= target_pgr - 1e-12)[0]
        k = int(hits[0]) if len(hits) else n
        goal = f"target PGR {target_pgr:g}"
    else:
        if not 0.0 <= strong_share <= 1.0:  # type: ignore[operator]
            raise ValueError("strong share must be between 0 and 1")
        k = int(round(strong_share * n))  # type: ignore[operator]
        goal = f"strong share {strong_share:g}"
    # the top-k prompts by expected strong-model gain go to the strong model: put the adequacy threshold halfway
    # between the k-th and (k+1)-th prompt, so that exactly those k fall below it
    # adequacy = 1 - max(score, GAIN_FLOOR) (adequacy.py): prompts the weak model is expected to do as well on read alike
    adequacy_sorted = 1.0 - np.clip(np.sort(need)[::-1], GAIN_FLOOR, 1.0)
    if k <= 0:
        threshold = 0.0
    elif k >= n:
        threshold = 1.0
    else:
        threshold = float((adequacy_sorted[k - 1] + adequacy_sorted[k]) / 2.0)
    return Calibration(threshold, k / n, float(curve.pgr[k]), float(curve.accuracy[k]), n, goal)

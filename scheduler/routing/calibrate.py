"""Threshold calibration: from labelled data, the quality target that meets an operator's goal.

Goals: recover a share of the strong model's quality (target PGR, e.g. 0.95), retain a share of the
strong model's accuracy (target retained, e.g. 0.96: routed accuracy / always-strong accuracy, the
bench's "quality retained"), or send a share of traffic to the strong model (e.g. 0.3). With two
models, a request goes to the large one exactly when the predictor's adequacy is below
routing.default_min_quality, so that one number is the threshold; with N models the same target
applies along the quality rule of select.py.

calibrate() scores the rows it is given with the shipped predictor. calibrate_training() calibrates
on the training part without touching the held-out rows: the shipped predictor has seen every
training row (its own scores there are over-confident: at 0.8888 it "retains" 103% of the strong
model's accuracy), so each training row is scored by a model fitted, with the shipped C, on the
other folds of train.cv_folds (out-of-fold scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.routing.adequacy import GAIN_FLOOR, AdequacyPredictor
from scheduler.routing.data import RoutingData
from scheduler.routing.metrics import routing_curve
from scheduler.routing.quality_budget import QualityBudget


@dataclass
class Calibration:
    min_quality: float
    strong_share: float
    pgr: float
    accuracy: float
    rows: int
    goal: str
    #: accuracy / the strong model's accuracy on the same rows
    retained: float | None = None
    #: the routing.quality_budget target that routes like this threshold on these rows: the mean predicted
    #: quality of the requests as served (adequacy on the small model, 1 on the large), two models
    budget_target: float | None = None

    def yaml_snippet(self, source: str) -> str:
        return (
            "routing:\n"
            f"  # calibrated by `wattlane route-calibrate` on {source} ({self.rows} rows): {self.goal}\n"
            f"  # -> strong-model share {self.strong_share:.1%}, PGR {self.pgr:.3f}, accuracy {self.accuracy:.1%}"
            + (f" ({self.retained:.1%} of the strong model's)" if self.retained is not None else "") + "\n"
            f"  default_min_quality: {self.min_quality:.4f}\n"
            + ("  # or hold it as a mean over the recent requests (docs/routing.md, Quality budget):\n"
               f"  # quality_budget: {{target: {self.budget_target:.4f}}}\n" if self.budget_target is not None else "")
        )


def calibrate(
    predictor: AdequacyPredictor, data: RoutingData, *, target_pgr: float | None = None, strong_share: float | None = None,
    target_retained: float | None = None,
) -> Calibration:
    need = predictor.strong_needed_many(data.prompts)
    return calibrate_scores(need, data.weak_correct, data.strong_correct, target_pgr=target_pgr, strong_share=strong_share,
                            target_retained=target_retained)


def calibrate_scores(
    need: np.ndarray, weak_correct: np.ndarray, strong_correct: np.ndarray, *, target_pgr: float | None = None,
    strong_share: float | None = None, target_retained: float | None = None,
) -> Calibration:
    """calibrate() on routing scores already computed (expected strong-model gain per row)."""
    if sum(v is not None for v in (target_pgr, strong_share, target_retained)) != 1:
        raise ValueError("give exactly one of target_pgr, strong_share or target_retained")
    need = np.asarray(need, dtype=np.float64)
    curve = routing_curve(need, weak_correct, strong_correct)
    n = len(need)
    if target_retained is not None:
        if not 0.0 <= target_retained <= 1.0:
            raise ValueError("target retained must be between 0 and 1")
        hits = np.nonzero(curve.accuracy >= target_retained * curve.strong_accuracy - 1e-12)[0]
        k = int(hits[0]) if len(hits) else n
        goal = f"target retained {target_retained:g} of the strong model's accuracy"
    elif target_pgr is not None:
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
    budget_target = QualityBudget.served_mean_under_wall(adequacy_sorted, threshold) if n else None
    return Calibration(threshold, k / n, float(curve.pgr[k]), float(curve.accuracy[k]), n, goal,
                       float(curve.accuracy[k] / curve.strong_accuracy) if curve.strong_accuracy > 0 else None,
                       budget_target)


def out_of_fold_training_scores(predictor: AdequacyPredictor):
    """(training part, out-of-fold expected gain per training row): each row scored by the two heads fitted, with the
    predictor's C, on the other folds of train.cv_folds. Needs scikit-learn; about 12 s on 2 cores."""
    from scheduler.routing.features import featurize_many
    from scheduler.routing.train import cv_folds, fit_matrix_many, split_data

    train = split_data().train
    c = predictor.metadata.get("C")
    if c is None:
        raise ValueError("the artefact records no C")
    x = featurize_many(train.prompts)
    folds = cv_folds(train)
    heads = fit_matrix_many([(x[fit_idx], train.strong_correct[fit_idx], train.weak_correct[fit_idx])
                             for fit_idx, _ in folds], float(c))
    need = np.zeros(len(train))
    for (_, val_idx), fold_heads in zip(folds, heads):
        need[val_idx] = fold_heads.gain(x[val_idx])
    return train, need


def calibrate_training(
    predictor: AdequacyPredictor, *, target_pgr: float | None = None, strong_share: float | None = None,
    target_retained: float | None = None,
) -> Calibration:
    """calibrate() on the training part with out-of-fold scores (no held-out row is read)."""
    train, need = out_of_fold_training_scores(predictor)
    return calibrate_scores(need, train.weak_correct, train.strong_correct, target_pgr=target_pgr,
                            strong_share=strong_share, target_retained=target_retained)

"""Train the adequacy predictor on the repository's routing data and write the shipped artefact and held-out prompts.

    python -m scheduler.routing.train            # CV-chosen C, trained on the training split (what ships)
    python -m scheduler.routing.train --all-data # train on every row (no held-out evaluation possible)

Steps, all deterministic: load data/routing (MMLU + GSM8K), remove duplicate questions (data.dedupe),
split 75/25 stratified (seed 0), choose the L2 constant C by 5-fold stratified cross-validation on the
training part only (mean validation APGR over a small grid), fit the two heads (P(strong correct) and
P(weak correct), see adequacy.py) on the whole training part, choose the TF-IDF baseline's C on the same
folds (baseline.py; recorded in the metadata so the comparison can be refitted quickly), and write
scheduler/routing/artefacts/adequacy.npz and the held-out rows to scheduler/data/routing-held-out.csv.gz
(the prompts `wattlane simulate --model auto` draws from). Running it again reproduces both files
(weights to float16 rounding; tests/unit/routing/test_train_reproduces_artefact.py checks).

Needs scikit-learn and scipy (pip install -e '.[train]'); inference needs neither.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler import datafiles
from scheduler.routing import data as routing_data
from scheduler.routing.adequacy import DEFAULT_ARTEFACT, FORMAT_VERSION
from scheduler.routing.features import HASH_BITS, N_FEATURES, featurize_many
from scheduler.routing.metrics import routing_curve

SPLIT_SEED = 0
TEST_FRACTION = 0.25
#: candidate inverse L2 strengths; cross-validation picks one
C_GRID = (0.25, 0.5, 1.0)
CV_FOLDS = 5
CV_SEED = 0
MAX_ITER = 3000
#: how the artefact stores weights (save())
WEIGHT_DTYPE = np.float16
DEFAULT_HELD_OUT = datafiles.REPOSITORY_DIR / "scheduler" / "data" / datafiles.HELD_OUT_PROMPTS


@dataclass
class Split:
    train: routing_data.RoutingData
    test: routing_data.RoutingData
    dedupe: routing_data.DedupeReport


def split_data(data: routing_data.RoutingData | None = None) -> Split:
    """The deduplicated routing data cut into the training and held-out parts every tool shares."""
    full, report = routing_data.dedupe(data if data is not None else routing_data.load_training_data())
    train_idx, test_idx = routing_data.stratified_split(full, TEST_FRACTION, SPLIT_SEED)
    return Split(full.subset(train_idx), full.subset(test_idx), report)


def _fit_matrix(x, labels: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=MAX_ITER)
    model.fit(x, labels)
    return model


@dataclass
class Heads:
    """The two logistic heads of the predictor: P(strong correct) and P(weak correct)."""

    weights_strong: np.ndarray
    intercept_strong: float
    weights_weak: np.ndarray
    intercept_weak: float

    def gain(self, x) -> np.ndarray:
        """Expected accuracy gain of the strong model for each row of a feature matrix."""
        zs = x @ self.weights_strong.astype(np.float64) + self.intercept_strong
        zw = x @ self.weights_weak.astype(np.float64) + self.intercept_weak
        return 1.0 / (1.0 + np.exp(-zs)) - 1.0 / (1.0 + np.exp(-zw))


def fit_matrix(x, strong_correct: np.ndarray, weak_correct: np.ndarray, c: float) -> Heads:
    """The two heads fitted on a feature matrix with L2 constant c."""
    return fit_matrix_many([(x, strong_correct, weak_correct)], c)[0]


def fit_matrix_many(fits: list[tuple[object, np.ndarray, np.ndarray]], c: float, n_jobs: int = -1) -> list[Heads]:
    """fit_matrix on each (x, strong_correct, weak_correct), every head a process of its own (n_jobs at once; -1:
    one per core). The fits are independent and single-threaded: on 2 cores the out-of-fold scores take 12 s
    instead of 28 s one after another, with the same weights to rounding (each fit is deterministic)."""
    from joblib import Parallel, delayed

    models = Parallel(n_jobs=n_jobs)(delayed(_fit_matrix)(x, labels, c)
                                     for x, strong, weak in fits for labels in (strong, weak))
    return [Heads(ms.coef_[0].astype(np.float32), float(ms.intercept_[0]), mw.coef_[0].astype(np.float32),
                  float(mw.intercept_[0])) for ms, mw in zip(models[0::2], models[1::2])]


def fit(data: routing_data.RoutingData, c: float) -> Heads:
    return fit_matrix(featurize_many(data.prompts), data.strong_correct, data.weak_correct, c)


def _cv_strata(data: routing_data.RoutingData) -> np.ndarray:
    # the (dataset, weak, strong) outcome keeps each fold's weak/strong accuracy close to the whole, so PGR is defined
    keys = [f"{d}:{w}{s}" for d, w, s in zip(data.dataset, data.weak_correct, data.strong_correct)]
    return np.unique(keys, return_inverse=True)[1]


def cv_folds(train: routing_data.RoutingData, folds: int = CV_FOLDS, seed: int = CV_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, validation rows) of each fold: stratified, shuffled with a fixed seed."""
    from sklearn.model_selection import StratifiedKFold

    strata = _cv_strata(train)
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata))


def cross_validate(train: routing_data.RoutingData, grid=C_GRID, folds: int = CV_FOLDS, seed: int = CV_SEED) -> dict:
    """Mean validation APGR for each C over stratified folds of the training part; the best C wins (ties: smaller C)."""
    x = featurize_many(train.prompts)
    split = cv_folds(train, folds, seed)
    scores: dict[float, list[float]] = {}
    for c in grid:
        heads = fit_matrix_many([(x[fit_idx], train.strong_correct[fit_idx], train.weak_correct[fit_idx])
                                 for fit_idx, _ in split], c)
        scores[c] = [routing_curve(h.gain(x[val_idx]), train.weak_correct[val_idx], train.strong_correct[val_idx]).apgr()
                     for h, (_, val_idx) in zip(heads, split)]
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    best = max(grid, key=lambda c: (round(means[c], 6), -c))
    return {
        "folds": folds, "seed": seed, "metric": "mean validation APGR (RouteLLM)", "grid": list(grid),
        "mean_apgr": {str(c): round(m, 5) for c, m in means.items()},
        "fold_apgr": {str(c): [round(s, 5) for s in v] for c, v in scores.items()},
        "best_c": best,
    }


def cross_validate_baseline(train: routing_data.RoutingData, grid=None, folds: int = CV_FOLDS, seed: int = CV_SEED) -> dict:
    """The TF-IDF baseline's C, chosen exactly as the predictor's: mean validation APGR on the same folds."""
    from scheduler.routing.baseline import BASELINE_C_GRID, fit_baseline

    grid = grid or BASELINE_C_GRID
    scores: dict[float, list[float]] = {c: [] for c in grid}
    for fit_idx, val_idx in cv_folds(train, folds, seed):
        part, val = train.subset(fit_idx), train.subset(val_idx)
        for c in grid:
            s = fit_baseline(part, c).scores(val.prompts)
            scores[c].append(routing_curve(s, val.weak_correct, val.strong_correct).apgr())
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    best = max(grid, key=lambda c: (round(means[c], 6), -c))
    return {"folds": folds, "seed": seed, "grid": list(grid), "mean_apgr": {str(c): round(m, 5) for c, m in means.items()},
            "best_c": best}


def save(path: Path, heads: Heads, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")
    # weights as float16: two heads in float32 made the artefact 1.4 MB and the wheel pass its 2 MB limit; the rounding
    # (at most 3e-4 per weight for weights below 2) moves a prompt's gain by far less than the curve's resolution
    np.savez_compressed(
        tmp, weights_strong=heads.weights_strong.astype(WEIGHT_DTYPE), intercept_strong=np.float64(heads.intercept_strong),
        weights_weak=heads.weights_weak.astype(WEIGHT_DTYPE), intercept_weak=np.float64(heads.intercept_weak),
        metadata=np.str_(json.dumps(metadata)),
    )
    tmp.replace(path)


def train(*, all_data: bool = False, c: float | None = None, grid=C_GRID) -> tuple[Heads, dict, Split]:
    """Everything main() does but writing: (heads, metadata, split)."""
    split = split_data()
    cv = None
    if c is None:
        cv = cross_validate(split.train, grid)
        c = cv["best_c"]
    rows = routing_data.concat([split.train, split.test]) if all_data else split.train
    heads = fit(rows, c)
    baseline_cv = cross_validate_baseline(split.train)
    meta = {
        "format_version": FORMAT_VERSION,
        "label": "two heads: strong_correct and weak_correct; routing score = P(strong correct) - P(weak correct)",
        "model": "two logistic regressions (sklearn, L2, lbfgs), expected strong-model gain",
        "C": c,
        "cross_validation": cv or "C given on the command line",
        "baseline": {"model": "TF-IDF word 1-2-grams (sublinear tf) + logistic regression on strong_needed (baseline.py)",
                     "C": baseline_cv["best_c"], "cross_validation": baseline_cv},
        "hash_bits": HASH_BITS,
        "n_features": N_FEATURES,
        "train_rows": len(rows),
        "dedupe": split.dedupe.as_dict(),
        "split": "all rows" if all_data else f"stratified_split(test_fraction={TEST_FRACTION}, seed={SPLIT_SEED}) train part",
        "data": "data/routing mmlu.csv.gz + gsm8k.csv.gz (RouteLLM responses; weak Mixtral-8x7B, strong GPT-4-1106)",
        "weak_model": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "strong_model": "gpt-4-1106-preview",
    }
    return heads, meta, split


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_ARTEFACT)
    ap.add_argument("--held-out-out", type=Path, default=DEFAULT_HELD_OUT, help="where the held-out rows go")
    ap.add_argument("--c", type=float, default=None, help="inverse L2 strength (default: chosen by cross-validation)")
    ap.add_argument("--all-data", action="store_true", help="train on every row instead of the training split")
    args = ap.parse_args(argv)

    started = time.time()
    try:
        heads, meta, split = train(all_data=args.all_data, c=args.c)
    except routing_data.RoutingDataError as exc:
        print(f"error: {exc}")
        return 2
    save(args.out, heads, meta)
    if not args.all_data:  # an all-data model has seen these rows: leave the shipped held-out file alone
        routing_data.write_csv(split.test, args.held_out_out)
    cv = meta["cross_validation"]
    if isinstance(cv, dict):
        print("cross-validation (mean APGR): " + ", ".join(f"C={c} {m:.4f}" for c, m in cv["mean_apgr"].items()))
    bcv = meta["baseline"]["cross_validation"]
    print("baseline cross-validation (mean APGR): " + ", ".join(f"C={c} {m:.4f}" for c, m in bcv["mean_apgr"].items()))
    print(f"dedupe: {meta['dedupe']}")
    print(f"wrote {args.out} (C={meta['C']}, {meta['train_rows']} rows) and {args.held_out_out} ({len(split.test)} rows) "
          f"in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

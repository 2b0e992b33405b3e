"""Train the adequacy predictor on the shared routing data and write the shipped artefact.

    python -m scheduler.routing.train            # train on the training split (the shipped artefact)
    python -m scheduler.routing.train --all-data # train on every row (no held-out evaluation possible)

Needs scikit-learn and scipy (pip install -e '.[train]'); inference needs neither.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scheduler.routing import data as routing_data
from scheduler.routing.adequacy import DEFAULT_ARTEFACT, FORMAT_VERSION
from scheduler.routing.features import HASH_BITS, N_FEATURES, featurize_many

#: chosen by 5-fold cross-validation on the training split (APGR flat for C in 1..3; see docs/routing.md)
DEFAULT_C = 2.0
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def fit(prompts: list[str], labels: np.ndarray, c: float = DEFAULT_C) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    x = featurize_many(prompts)
    model = LogisticRegression(C=c, max_iter=3000)
    model.fit(x, labels)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


def save(path: Path, weights: np.ndarray, intercept: float, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez_compressed(tmp, weights=weights, intercept=np.float64(intercept), metadata=np.str_(json.dumps(metadata)))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_ARTEFACT)
    ap.add_argument("--c", type=float, default=DEFAULT_C, help="inverse L2 regularisation strength")
    ap.add_argument("--all-data", action="store_true", help="train on every row instead of the training split")
    args = ap.parse_args(argv)

    data = routing_data.load_shared()
    train_idx, test_idx = routing_data.stratified_split(data, TEST_FRACTION, SPLIT_SEED)
    if args.all_data:
        train_idx = np.arange(len(data))
    train = data.subset(train_idx)
    started = time.time()
    weights, intercept = fit(train.prompts, train.strong_needed, args.c)
    meta = {
        "format_version": FORMAT_VERSION,
        "label": "strong_correct == 1 and weak_correct == 0 (strong needed)",
        "model": "logistic regression (sklearn, L2)",
        "C": args.c,
        "hash_bits": HASH_BITS,
        "n_features": N_FEATURES,
        "train_rows": int(len(train_idx)),
        "split": "all rows" if args.all_data else f"stratified_split(test_fraction={TEST_FRACTION}, seed={SPLIT_SEED}) train part",
        "data": "shared/routing mmlu.csv + gsm8k.csv (RouteLLM responses; weak Mixtral-8x7B, strong GPT-4-1106)",
        "weak_model": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "strong_model": "gpt-4-1106-preview",
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save(args.out, weights, intercept, meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) from {len(train_idx)} rows in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The shipped predictor and held-out prompts are what `python -m scheduler.routing.train` makes from data/routing.

A full retrain (5-fold CV over 3 values of C for two heads, the final fit, and the baseline's CV) takes
minutes on two cores, so this
checks the parts that can drift, each for real: the held-out file byte for byte, the final fit with the
recorded C, every cross-validation fold at the recorded C against its recorded score, and the duplicate handling.
"""

import numpy as np
import pytest

from scheduler import datafiles
from scheduler.routing import data as routing_data
from scheduler.routing.adequacy import load_predictor
from scheduler.routing.features import N_HASHED, featurize_many
from scheduler.routing.metrics import routing_curve
from scheduler.routing.train import C_GRID, CV_FOLDS, CV_SEED, cv_folds, fit, split_data

#: lbfgs gives the same weights for the same data; the margin is for another BLAS or CPU's float rounding
WEIGHT_ATOL = 1e-3
PROBABILITY_ATOL = 1e-3


@pytest.fixture(scope="module")
def split():
    return split_data()


@pytest.fixture(scope="module")
def shipped():
    return load_predictor()


def test_packaged_held_out_prompts_are_the_split_byte_for_byte(split, tmp_path):
    out = tmp_path / "held-out.csv.gz"
    routing_data.write_csv(split.test, out)
    assert out.read_bytes() == datafiles.held_out_prompts().read_bytes()
    again = routing_data.load_csv(out)
    assert again.prompts == split.test.prompts and again.dataset == split.test.dataset


def test_refit_with_the_recorded_c_reproduces_the_shipped_weights(split, shipped):
    meta = shipped.metadata
    assert meta["train_rows"] == len(split.train) and meta["dedupe"] == split.dedupe.as_dict()
    heads = fit(split.train, meta["C"])
    assert np.max(np.abs(heads.weights_strong - shipped.weights[:, 0])) <= WEIGHT_ATOL
    assert np.max(np.abs(heads.weights_weak - shipped.weights[:, 1])) <= WEIGHT_ATOL
    assert heads.intercept_strong == pytest.approx(shipped.intercepts[0], abs=WEIGHT_ATOL)
    assert heads.intercept_weak == pytest.approx(shipped.intercepts[1], abs=WEIGHT_ATOL)
    refit_gain = heads.gain(featurize_many(split.test.prompts[:300]))
    assert np.max(np.abs(refit_gain - shipped.strong_needed_many(split.test.prompts[:300]))) <= PROBABILITY_ATOL


def test_c_is_the_cross_validation_winner_and_every_fold_recomputes(split, shipped, out_of_fold):
    cv = shipped.metadata["cross_validation"]
    assert cv["folds"] == CV_FOLDS and cv["seed"] == CV_SEED and cv["grid"] == list(C_GRID)
    means = {float(c): m for c, m in cv["mean_apgr"].items()}
    assert shipped.metadata["C"] == cv["best_c"] == max(means, key=lambda c: (means[c], -c))
    folds = cv_folds(split.train)
    assert all(set(f).isdisjoint(v) for f, v in folds) and sum(len(v) for _, v in folds) == len(split.train)
    # the out-of-fold scores (heads refitted on the other folds with the recorded C) give each fold's recorded score
    train, need = out_of_fold
    recorded = cv["fold_apgr"][str(cv["best_c"])]
    for k, (_, val_idx) in enumerate(folds):
        apgr = routing_curve(need[val_idx], train.weak_correct[val_idx], train.strong_correct[val_idx]).apgr()
        assert apgr == pytest.approx(recorded[k], abs=1e-4), k


def test_no_held_out_question_is_in_the_training_part(split):
    train_text = {routing_data.normalise_prompt(p) for p in split.train.prompts}
    assert not any(routing_data.normalise_prompt(p) in train_text for p in split.test.prompts)
    # nor a near copy: cosine similarity of the hashed n-grams stays below 0.99 (the closest pairs, ~0.97, are
    # distinct MMLU questions on a shared passage or with one word inverted)
    def unit_rows(prompts):
        x = featurize_many(prompts)[:, :N_HASHED].tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
        return x.multiply(1.0 / np.maximum(norms, 1e-12)[:, None]).tocsr()

    sim = unit_rows(split.test.prompts) @ unit_rows(split.train.prompts).T
    assert sim.max() < 0.99


def test_dedupe_keeps_one_copy_and_drops_conflicting_labels():
    data = routing_data.RoutingData(
        prompts=["What is 2+2?\nA. 4", "what is 2 + 2 ?\nA.  4", "Name a prime.", "name a prime", "Unique one"],
        weak_correct=np.array([1, 1, 1, 0, 0], np.int8),
        strong_correct=np.array([1, 1, 1, 1, 1], np.int8),
        dataset=["mmlu"] * 5,
        subject=["a", "b", "a", "b", "c"],
    )
    out, report = routing_data.dedupe(data)
    assert out.prompts == ["What is 2+2?\nA. 4", "Unique one"]
    assert (report.rows_in, report.duplicate_groups, report.conflicting_groups, report.rows_out) == (5, 2, 1, 2)

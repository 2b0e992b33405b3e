"""The savings baseline (energy/baseline.py): which model is the baseline, and how its joules are estimated."""

from __future__ import annotations

import pytest

from scheduler.config import ModelConfig
from scheduler.energy.baseline import (
    CASCADE_REPEAT,
    OBSERVED,
    OBSERVED_MIN_REQUESTS,
    REPLICA_STATS,
    SERVED,
    SIZE_PRIOR,
    SavingsBaseline,
)
from scheduler.routing.placement import prior_joules_per_token


def model(mid: str, params_b: float, kind: str = "chat", context: int = 4096) -> ModelConfig:
    return ModelConfig(id=mid, kind=kind, engine="simulated", params_b=params_b, context_length=context,
                       devices=["sim0"])


MODELS = [model("small", 1.0), model("mid", 8.0, context=1024), model("big", 70.0, context=2048),
          model("base-xl", 100.0, kind="completion")]


def test_the_baseline_is_the_largest_model_that_serves_the_kind_and_holds_the_tokens():
    b = SavingsBaseline(MODELS)
    # a completion model cannot answer a chat, however large
    assert b.baseline_model("chat", 100).id == "big"
    # chat models continue raw text too, but the completion model is larger
    assert b.baseline_model("completion", 100).id == "base-xl"
    # over big's context: the next largest that holds it is 'small' (mid's context is smaller still)
    assert b.baseline_model("chat", 3000).id == "small"
    assert b.baseline_model("chat", 10_000) is None


def test_replica_figures_scale_the_requests_own_joules_by_the_energy_ratio():
    live = {"small": [{"joules_per_prefill_token": 0.01, "joules_per_decode_token": 0.1},
                      {"joules_per_prefill_token": 0.03, "joules_per_decode_token": 0.3}],  # mean 0.02 / 0.2
            "big": [{"joules_per_prefill_token": 0.1, "joules_per_decode_token": 1.0}]}
    b = SavingsBaseline(MODELS, lambda: live)
    est = b.estimate(served_model="small", request_kind="chat", prompt_tokens=100, completion_tokens=10, joules=5.0)
    served_e, base_e = 100 * 0.02 + 10 * 0.2, 100 * 0.1 + 10 * 1.0
    assert est.model == "big" and est.method == REPLICA_STATS
    assert est.joules == pytest.approx(5.0 * base_e / served_e)


def test_without_live_figures_for_both_models_the_size_prior_gives_the_ratio():
    live = {"small": [{"joules_per_prefill_token": 0.01, "joules_per_decode_token": 0.1}], "big": [{"running": 1}]}
    b = SavingsBaseline(MODELS, lambda: live)
    est = b.estimate(served_model="small", request_kind="chat", prompt_tokens=50, completion_tokens=20, joules=2.0)
    (sp, sd), (bp, bd) = prior_joules_per_token(1.0), prior_joules_per_token(70.0)
    assert est.method == SIZE_PRIOR  # never one model's live figure against the other's prior
    assert est.joules == pytest.approx(2.0 * (50 * bp + 20 * bd) / (50 * sp + 20 * sd))
    assert SavingsBaseline(MODELS, lambda: None).estimate(
        served_model="small", request_kind="chat", prompt_tokens=50, completion_tokens=20, joules=2.0).method == SIZE_PRIOR


def test_on_the_baseline_model_nothing_is_saved_and_a_cascade_repeat_is_all_loss():
    b = SavingsBaseline(MODELS)
    same = b.estimate(served_model="big", request_kind="chat", prompt_tokens=10, completion_tokens=10, joules=7.5)
    assert (same.model, same.joules, same.method) == ("big", 7.5, SERVED)
    repeat = b.estimate(served_model="big", request_kind="chat", prompt_tokens=10, completion_tokens=10, joules=7.5,
                        cascade_repeat=True)
    assert (repeat.joules, repeat.method) == (0.0, CASCADE_REPEAT)


def test_no_joules_or_no_tokens_gives_no_baseline_rather_than_a_made_up_one():
    b = SavingsBaseline(MODELS)
    assert b.estimate(served_model="small", request_kind="chat", prompt_tokens=10, completion_tokens=5, joules=None) is None
    assert b.estimate(served_model="small", request_kind="chat", prompt_tokens=0, completion_tokens=0, joules=1.0) is None
    assert b.estimate(served_model="gone", request_kind="chat", prompt_tokens=5, completion_tokens=5, joules=1.0) is None


def test_what_the_gateway_accounted_stands_in_when_replicas_publish_nothing():
    b = SavingsBaseline(MODELS, lambda: None, prefill_token_weight=0.5)
    # 10 prompt + 5 completion tokens = 10 work tokens at weight 0.5
    for _ in range(OBSERVED_MIN_REQUESTS - 1):
        b.observe("small", 10, 5, 2.0)  # 0.2 J per work token
        b.observe("big", 10, 5, 9.0)  # 0.9 J per work token
    est = b.estimate(served_model="small", request_kind="chat", prompt_tokens=10, completion_tokens=5, joules=2.0)
    assert est.method == SIZE_PRIOR  # too few requests yet to stand for a model
    b.observe("small", 10, 5, 2.0)
    b.observe("big", 10, 5, 9.0)
    b.observe("big", 0, 0, 5.0)  # no work: ignored, not a division by zero
    est = b.estimate(served_model="small", request_kind="chat", prompt_tokens=40, completion_tokens=8, joules=3.0)
    assert est.method == OBSERVED and est.joules == pytest.approx(3.0 * 0.9 / 0.2)

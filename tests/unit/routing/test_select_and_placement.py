"""Model selection (constraints, quality rule, spill, energy budget) and replica placement."""

import pytest

from scheduler.config import ModelConfig, RoutingConfig
from scheduler.routing.controls import merge_request_controls
from scheduler.routing.placement import PlacementRequest, place, rank_replicas
from scheduler.routing.select import RouteRequest, predicted_qualities, prompt_text_from_messages, route


class FixedPredictor:
    """Stands in for the learned predictor so each test sets the adequacy it needs."""

    def __init__(self, adequacy: float):
        self._a = adequacy

    def adequacy(self, prompt: str) -> float:
        return self._a


def models(**overrides):
    small = dict(id="small", kind="chat", engine="simulated", params_b=8, context_length=4096, devices=["g0"])
    # llama.cpp constrains its output to JSON with a grammar: supports_json unset means yes
    large = dict(id="large", kind="chat", engine="llamacpp", weights={"path": "large.gguf"}, params_b=70,
                 context_length=32768, devices=["g1"])
    small.update(overrides)
    return [ModelConfig(**large), ModelConfig(**small)]  # deliberately out of size order


def replica(jd=0.1, ttft_tps=10000.0, tpot=0.02, **kw):
    s = {"prefill_tokens_per_second": ttft_tps, "decode_seconds_per_token": tpot, "joules_per_decode_token": jd,
         "joules_per_prefill_token": jd / 10, "running": 1, "waiting": 0, "idle_power_watts": 50.0}
    s.update(kw)
    return s


def controls(**fields):
    return merge_request_controls({}, fields, RoutingConfig())


def test_high_adequacy_picks_small_low_picks_large():
    stats = {"small": [replica(0.1)], "large": [replica(0.8)]}
    req = RouteRequest(kind="chat", prompt_text="2+2?", max_tokens=100)
    d = route(models(), req, controls(min_quality=0.8), FixedPredictor(0.9), stats)
    assert d.model_id == "small" and d.error is None and d.fallbacks == [("large", 0)]
    d = route(models(), req, controls(min_quality=0.8), FixedPredictor(0.5), stats)
    assert d.model_id == "large"
    small = next(c for c in d.candidates if c.model_id == "small")
    assert not small.kept and "0.50 < target 0.80" in small.reason
    assert "P(small model adequate)=0.50" in d.reason


def test_hard_constraints_drop_with_reasons():
    stats = {"small": [replica()], "large": [replica(0.8)]}
    d = route(models(), RouteRequest(kind="chat", prompt_tokens=4000, max_tokens=200), controls(), FixedPredictor(1.0), stats)
    assert d.model_id == "large"
    assert "context 4096 < 4000 prompt + 200 max_tokens" in next(c for c in d.candidates if c.model_id == "small").reason
    d = route(models(), RouteRequest(kind="chat", prompt_text="x", needs_json=True), controls(), FixedPredictor(1.0), stats)
    assert d.model_id == "large"
    assert "'small' has no JSON mode for response_format (its engine 'simulated' cannot constrain its output)" in \
        next(c for c in d.candidates if c.model_id == "small").reason
    # chat models also continue raw text, so a completion request has candidates ...
    d = route(models(), RouteRequest(kind="completion", prompt_text="x"), controls(), FixedPredictor(1.0), stats)
    assert d.model_id == "small"
    # ... but a base (completion) model cannot take a chat request
    base = [m.model_copy(update={"kind": "completion"}) for m in models()]
    d = route(base, RouteRequest(kind="chat", prompt_text="x"), controls(), FixedPredictor(1.0), stats)
    assert d.model_id is None and d.error.status == 400 and d.error.code == "unsupported_capability"
    assert "/v1/completions" in d.error.message
    d = route(models(), RouteRequest(kind="chat", prompt_tokens=40000, max_tokens=10), controls(), None, stats)
    assert d.error.code == "context_length_exceeded" and d.error.param == "max_tokens"


def test_spills_to_next_model_when_no_small_replica_meets_slo():
    stats = {"small": [replica(0.1, tpot=0.5), replica(0.1, ttft_tps=1.0)], "large": [replica(0.8)]}
    d = route(models(), RouteRequest(kind="chat", prompt_text="hi", max_tokens=50), controls(min_quality=0.1),
              FixedPredictor(0.9), stats)
    assert d.model_id == "large" and d.slo_met is True and "spilling from small" in d.reason
    small = next(c for c in d.candidates if c.model_id == "small")
    assert "no replica meets the SLO" in small.reason


def test_energy_budget_rejects_with_400_and_the_cheapest_figure():
    stats = {"small": [replica(0.1)], "large": [replica(0.8)]}
    req = RouteRequest(kind="chat", prompt_text="hi", max_tokens=1000)
    d = route(models(), req, controls(min_quality=0.1, max_energy_joules=1.0), FixedPredictor(0.9), stats)
    assert d.model_id is None and d.error.status == 400 and d.error.code == "energy_budget_exceeded"
    assert "'small' at about 599.6 J" in d.error.message and d.error.param == "max_energy_joules"
    # a budget that only the small model fits still routes when the small model is adequate
    d = route(models(), req, controls(min_quality=0.1, max_energy_joules=1000.0), FixedPredictor(0.9), stats)
    assert d.model_id == "small"


def test_explicit_and_unknown_models():
    stats = {"small": [replica()], "large": [replica(0.8)]}
    d = route(models(), RouteRequest(kind="chat", model="large", prompt_text="x"), controls(), FixedPredictor(1.0), stats)
    assert d.model_id == "large" and d.adequacy is None
    d = route(models(), RouteRequest(kind="chat", model="nope", prompt_text="x"), controls(), None, stats)
    assert d.error.status == 404 and "small" in d.error.message


def test_explain_without_live_stats_uses_prior_energy():
    d = route(models(), RouteRequest(kind="chat", prompt_text="x", max_tokens=100), controls(min_quality=0.5),
              FixedPredictor(0.9), None)
    small = d.chosen
    assert d.model_id == "small" and small.energy_source == "prior" and small.predicted_energy_joules > 0
    assert d.to_dict()["candidates"][0]["model_id"] == "small"  # size order, not config order


def test_quality_rule_for_three_models():
    ms = [ModelConfig(id=f"m{i}", kind="chat", engine="simulated", params_b=p, devices=["g"]) for i, p in enumerate((1, 8, 70))]
    assert predicted_qualities(ms, 0.4) == pytest.approx([0.4, 0.7, 1.0])
    ms = [m.model_copy(update={"quality": q}) for m, q in zip(ms, (0.5, 0.9, 1.0))]
    assert predicted_qualities(ms, 0.4) == pytest.approx([0.4, 0.88, 1.0])


def test_placement_picks_lowest_energy_feasible_replica():
    req = PlacementRequest(prompt_tokens=500, output_tokens=200, ttft_slo_seconds=1.0, tpot_slo_seconds=0.05)
    reps = [replica(0.3), replica(0.1, tpot=0.2), replica(0.15), replica(0.05, kv_cache_free_fraction=0.0)]
    assert place(req, reps) == 2
    ranked = rank_replicas(req, reps)
    assert [p.index for p in ranked][:2] == [2, 0] and not ranked[-1].feasible
    assert place(req, [replica(tpot=0.2)]) is None
    # queued prefill tokens push TTFT past the SLO
    assert place(req, [replica(queued_prefill_tokens=20000)]) is None
    # unknown latency counts as meeting the SLO
    assert place(req, [{"joules_per_decode_token": 0.1}]) == 0


def test_idle_share_shrinks_with_batch():
    req = PlacementRequest(prompt_tokens=0, output_tokens=100)
    alone, shared = rank_replicas(req, [replica(0.0, running=0)])[0], rank_replicas(req, [replica(0.0, running=9)])[0]
    assert alone.energy_joules == pytest.approx(10 * shared.energy_joules)


def test_prompt_text_from_messages():
    text, chars = prompt_text_from_messages([{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert text == "hello" and chars == len("be brief") + len("hello")

"""Quality budget: min_quality held as a window mean; the threshold spends the allowed shortfall on the smallest gains, and overload sheds."""

import numpy as np
import pytest

from scheduler.config import ModelConfig, RoutingConfig
from scheduler.routing.controls import merge_request_controls
from scheduler.routing.quality_budget import MIN_WINDOW_REQUESTS, QualityBudget
from scheduler.routing.select import RouteRequest, route


class FixedPredictor:
    def __init__(self, adequacy: float):
        self.a = adequacy

    def adequacy(self, prompt: str) -> float:
        return self.a


MODELS = [ModelConfig(id="small", kind="chat", engine="simulated", params_b=8, context_length=32768, devices=["g0"]),
          ModelConfig(id="large", kind="chat", engine="simulated", params_b=70, context_length=32768, devices=["g1"])]


def replica(jd=0.1, prefill_tps=20000.0, tpot=0.02, **kw):
    s = {"prefill_tokens_per_second": prefill_tps, "decode_seconds_per_token": tpot, "joules_per_decode_token": jd,
         "joules_per_prefill_token": jd / 10, "running": 1, "waiting": 0, "idle_power_watts": 50.0}
    s.update(kw)
    return s


def controls(q):
    return merge_request_controls({}, {"min_quality": q}, RoutingConfig())


def test_threshold_keeps_the_window_mean_at_the_target():
    rng = np.random.default_rng(0)
    b = QualityBudget(0.9, window_requests=2000)
    a = rng.beta(4, 1.5, 2000)
    for x in a:
        b.record(float(x), None)
    t = b.threshold()
    served = np.where(a >= t, a, 1.0)
    assert served.mean() >= 0.9 - 1e-9
    # the threshold is the lowest that holds it: one more request sent small would break the target
    below = a[a < t].max()
    assert np.where(a >= below, a, 1.0).mean() < 0.9
    # and a lower target lets more go small
    b2 = QualityBudget(0.8, window_requests=2000)
    for x in a:
        b2.record(float(x), None)
    assert b2.threshold() < t


def test_wall_until_the_window_fills_then_debt_tightens_it():
    b = QualityBudget(0.9, initial_threshold=0.85)
    assert b.threshold() == 0.85
    for _ in range(MIN_WINDOW_REQUESTS + 20):
        b.record(0.8, 0.8)  # served mean 0.8: a debt of 0.1 below the target
    assert b.threshold() == float("inf")  # every request must go large until the debt is repaid
    assert b.shed_threshold() == float("inf")  # the served mean 0.8 is below target - allowance: no shedding


def test_route_with_budget_sends_high_adequacy_small_and_sheds_under_overload():
    b = QualityBudget(0.9, window_requests=200, initial_threshold=0.95)
    free = {"small": [replica(0.1)], "large": [replica(0.8)]}
    req = RouteRequest(kind="chat", prompt_text="q", prompt_tokens=500, max_tokens=50)
    for a in np.random.default_rng(1).uniform(0.5, 1.0, 200):
        route(MODELS, req, controls(0.9), FixedPredictor(float(a)), free, quality_budget=b)
    t, shed = b.threshold(), b.shed_threshold()
    assert 0.5 < shed < t < 0.95  # below the wall the budget started from
    # a request just above the threshold goes small (the wall at 0.95 would send it large) ...
    assert route(MODELS, req, controls(0.95), FixedPredictor(t + 0.005), free).model_id == "large"
    d = route(MODELS, req, controls(0.9), FixedPredictor(t + 0.005), free, quality_budget=b)
    assert d.model_id == "small" and "budget threshold" in d.reason
    # ... one below it goes large while the large replica has room
    d = route(MODELS, req, controls(0.9), FixedPredictor((t + shed) / 2), free, quality_budget=b)
    assert d.model_id == "large" and d.slo_met
    # when the large replica cannot meet the SLO, the same request goes to the small model that can
    # (shedding) instead of waiting past its SLO on the large one
    saturated = {"small": [replica(0.1)], "large": [replica(0.8, waiting=400, queued_prefill_tokens=400 * 2000, prefill_tps=2000.0)]}
    d = route(MODELS, req, controls(0.9), FixedPredictor((t + shed) / 2), saturated, quality_budget=b)
    assert d.model_id == "small" and d.slo_met and "shed" in d.reason and b.shed == 1
    # below the shed threshold it still goes large, best effort
    d = route(MODELS, req, controls(0.9), FixedPredictor(shed - 0.05), saturated, quality_budget=b)
    assert d.model_id == "large" and not d.slo_met
    # without a budget (the default) the wall holds: large, best effort
    d = route(MODELS, req, controls(0.9), FixedPredictor((t + shed) / 2), saturated)
    assert d.model_id == "large" and not d.slo_met


def test_bad_budget_arguments():
    with pytest.raises(ValueError):
        QualityBudget(1.5)
    with pytest.raises(ValueError):
        QualityBudget(0.9, window_requests=10)


def test_the_calibrated_budget_target_routes_the_calibration_rows_like_the_calibrated_wall():
    """route-calibrate's quality_budget target: over a window of the same prompts, the budget's threshold sends
    exactly the prompts the wall sends to the small model (the mean of their served quality is the target)."""
    import numpy as np

    from scheduler.routing.calibrate import calibrate_scores

    rng = np.random.default_rng(3)
    need = rng.beta(1.2, 4.0, 800)  # expected gain of the strong model per prompt
    weak, strong = rng.integers(0, 2, 800), rng.integers(0, 2, 800)
    cal = calibrate_scores(need, weak, strong, strong_share=0.35)
    adequacy = 1.0 - need
    small_by_wall = adequacy >= cal.min_quality
    budget = QualityBudget(cal.budget_target, window_requests=800)
    for a in adequacy:
        budget.record(a, None)
    small_by_budget = adequacy >= budget.threshold()
    assert abs(small_by_wall.mean() - 0.65) < 0.01
    assert (small_by_budget == small_by_wall).mean() >= 0.998  # the one prompt at the margin may differ
    assert "quality_budget: {target: " in cal.yaml_snippet("test rows")


def _filled(rank: str, a: np.ndarray, w: np.ndarray, target: float = 0.9) -> QualityBudget:
    b = QualityBudget(target, window_requests=len(a), rank=rank)
    for x, y in zip(a, w):
        b.record(float(x), None, float(y))
    return b


def test_gain_per_joule_with_equal_weights_is_the_gain_ranking():
    a = np.random.default_rng(4).beta(4, 1.5, 1000)
    w = np.full(1000, 37.0)
    by_gain, by_joule = _filled("gain", a, w), _filled("gain-per-joule", a, w)
    small_gain = a >= by_gain.threshold()
    small_joule = np.array([x >= by_joule.threshold(37.0) for x in a])
    assert (small_gain == small_joule).all()


def test_gain_per_joule_holds_the_target_and_saves_more_joules_than_the_gain_ranking():
    """Least energy at the same mean quality: the weighted ranking sends small the requests where a unit of
    quality buys the most joules, so at the same window mean it saves more than ranking by gain alone."""
    rng = np.random.default_rng(5)
    a = rng.beta(4, 1.5, 2000)
    w = rng.lognormal(5.0, 0.8, 2000)  # joules saved on the small model: long requests save more
    by_gain, by_joule = _filled("gain", a, w), _filled("gain-per-joule", a, w)
    small_gain = a >= by_gain.threshold()
    small_joule = np.array([x >= by_joule.threshold(y) for x, y in zip(a, w)])
    assert np.where(small_joule, a, 1.0).mean() >= 0.9 - 1e-9
    assert np.where(small_gain, a, 1.0).mean() >= 0.9 - 1e-9
    saved_joule, saved_gain = w[small_joule].sum(), w[small_gain].sum()
    assert saved_joule > 1.15 * saved_gain
    # a long request goes small at an adequacy a short one does not
    long_w, short_w = np.percentile(w, 90), np.percentile(w, 10)
    assert by_joule.threshold(long_w) < by_gain.threshold() < by_joule.threshold(short_w)
    state = by_joule.state()
    assert state["rank"] == "gain-per-joule" and state["gain_per_joule_bound"] > 0


def test_route_ranks_by_joules_saved_under_gain_per_joule():
    """Two requests of equal adequacy: the one with the long output (more joules saved on the small model)
    goes small, the short one large; ranked by gain, both go the same way."""
    free = {"small": [replica(0.1)], "large": [replica(0.8)]}
    rng = np.random.default_rng(6)
    budgets = {rank: QualityBudget(0.9, window_requests=400, rank=rank) for rank in ("gain", "gain-per-joule")}
    for a, out in zip(rng.uniform(0.6, 1.0, 400), rng.integers(20, 800, 400)):
        req = RouteRequest(kind="chat", prompt_text="q", prompt_tokens=300, max_tokens=int(out))
        for b in budgets.values():
            route(MODELS, req, controls(0.9), FixedPredictor(float(a)), free, quality_budget=b)
    a = budgets["gain"].threshold() - 0.01  # just below the gain ranking's threshold
    long_req = RouteRequest(kind="chat", prompt_text="q", prompt_tokens=300, max_tokens=780)
    short_req = RouteRequest(kind="chat", prompt_text="q", prompt_tokens=300, max_tokens=20)
    by_gain = [route(MODELS, r, controls(0.9), FixedPredictor(a), free, quality_budget=budgets["gain"], record_decision=False).model_id
               for r in (long_req, short_req)]
    assert by_gain == ["large", "large"]
    d_long = route(MODELS, long_req, controls(0.9), FixedPredictor(a), free, quality_budget=budgets["gain-per-joule"], record_decision=False)
    d_short = route(MODELS, short_req, controls(0.9), FixedPredictor(a), free, quality_budget=budgets["gain-per-joule"], record_decision=False)
    assert (d_long.model_id, d_short.model_id) == ("small", "large")
    assert "by gain per joule" in d_long.reason
    assert d_long.quality_target < d_short.quality_target


def test_bad_rank():
    with pytest.raises(ValueError, match="gain-per-joule"):
        QualityBudget(0.9, rank="cheapest")


def test_prompt_token_weight_decides_whether_a_long_prompt_or_a_long_output_saves_more():
    """A 2,000-token prompt with a 20-token answer against a 100-token prompt with a 300-token answer, at equal
    adequacy: with the size prior (a prompt token at a tenth of an output token) the long answer saves more
    and goes small; with prompt_token_weight 1 the long prompt does."""
    free = {"small": [replica(0.1)], "large": [replica(0.8)]}
    long_prompt = RouteRequest(kind="chat", prompt_text="q", prompt_tokens=2000, max_tokens=20)
    long_answer = RouteRequest(kind="chat", prompt_text="q", prompt_tokens=100, max_tokens=300)
    picks = {}
    for weight in (None, 1.0):
        b = QualityBudget(0.9, window_requests=400, rank="gain-per-joule", prompt_token_weight=weight)
        rng = np.random.default_rng(7)
        for a in rng.uniform(0.6, 1.0, 400):
            route(MODELS, long_prompt if rng.random() < 0.5 else long_answer, controls(0.9), FixedPredictor(float(a)), free,
                  quality_budget=b)
        thresholds = [b.threshold(w) for w in (_weight_of(long_prompt, weight), _weight_of(long_answer, weight))]
        a = sum(thresholds) / 2  # between the two requests' thresholds
        picks[weight] = [route(MODELS, r, controls(0.9), FixedPredictor(a), free, quality_budget=b, record_decision=False).model_id
                         for r in (long_prompt, long_answer)]
    assert picks[None] == ["large", "small"]
    assert picks[1.0] == ["small", "large"]
    with pytest.raises(ValueError, match="prompt_token_weight"):
        QualityBudget(0.9, rank="gain-per-joule", prompt_token_weight=-1.0)


def _weight_of(request: RouteRequest, prompt_token_weight: float | None) -> float:
    from scheduler.routing.select import _joules_saved

    return _joules_saved(MODELS, request.estimated_prompt_tokens(), request.max_tokens, prompt_token_weight)

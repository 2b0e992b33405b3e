"""Admission by the SLO: a request no adequate model can start within its TTFT target is refused at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scheduler.api.errors import ApiError
from scheduler.api.model_selection import ModelSelection
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.config import WattlaneConfig
from scheduler.routing.admission import StartQueue, admit, wait_limit_seconds
from scheduler.routing.placement import PlacementRequest, predict


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def busy_queue(clock: Clock, model: str, *, started_per_second: float, pending: int) -> StartQueue:
    """A model that started `started_per_second` requests a second for 5 s and now has `pending` waiting."""
    q = StartQueue(clock=clock)
    for _ in range(int(started_per_second * 5)):
        token = q.dispatched(model)
        clock.t += 1.0 / started_per_second
        q.started(model, token)
    for _ in range(pending):
        q.dispatched(model)
    return q


def test_idle_model_has_no_wait():
    q = StartQueue(clock=Clock())
    assert q.predicted_wait_seconds("m") == 0.0
    with q.track("m") as started:
        started()
    assert q.pending("m") == 0 and q.predicted_wait_seconds("m") == 0.0


def test_wait_is_pending_over_start_rate():
    clock = Clock()
    q = busy_queue(clock, "m", started_per_second=10, pending=30)
    assert q.predicted_wait_seconds("m") == pytest.approx(3.0, rel=0.05)


def test_abandoned_requests_leave_the_queue():
    q = StartQueue(clock=Clock())
    with pytest.raises(TimeoutError):
        with q.track("m"):
            raise TimeoutError
    assert q.pending("m") == 0


def test_nothing_started_waits_at_least_as_long_as_the_oldest():
    clock = Clock()
    q = StartQueue(clock=clock)
    q.dispatched("m")
    clock.t += 7.0
    q.dispatched("m")
    assert q.predicted_wait_seconds("m") == pytest.approx(7.0)


def test_admit_keeps_the_first_model_that_starts_in_time_else_refuses():
    clock = Clock()
    q = busy_queue(clock, "big", started_per_second=10, pending=30)  # 3 s behind
    ok = admit([("big", None), ("small", 0.2)], q, limit_seconds=1.0)
    assert ok.model == "small" and ok.wait_seconds == pytest.approx(0.2)
    refused = admit([("big", None), ("small", 2.5)], q, limit_seconds=1.0)
    assert refused.model is None
    assert refused.retry_after_seconds == 3  # the shortest wait (2.5 s), rounded up
    assert "big 3.0 s" in refused.reason and "small 2.5 s" in refused.reason


def test_batch_may_wait_longer():
    assert wait_limit_seconds(1.0, "interactive", 10.0) == 1.0
    assert wait_limit_seconds(1.0, "batch", 10.0) == 10.0


def test_placement_reports_the_queue_part_of_ttft():
    p = predict(PlacementRequest(prompt_tokens=100, output_tokens=10),
                {"prefill_tokens_per_second": 1000.0, "queued_prefill_tokens": 2000, "decode_seconds_per_token": 0.02})
    assert p.queue_seconds == pytest.approx(2.0)
    assert p.ttft_seconds == pytest.approx(2.1)


# --- the gateway's router -------------------------------------------------------------------------

def fleet_config(admission: str) -> WattlaneConfig:
    return WattlaneConfig.model_validate({
        "models": [
            {"id": "small", "kind": "chat", "engine": "simulated", "params_b": 8, "quality": 0.6, "devices": ["s0"]},
            {"id": "big", "kind": "chat", "engine": "simulated", "params_b": 70, "quality": 0.8, "devices": ["s1"]},
        ],
        "routing": {"admission": admission, "default_min_quality": 0.0, "default_slo": {"ttft_ms": 1000, "tpot_ms": 100}},
    })


def job(model: str = "big", priority: str | None = None) -> SimpleNamespace:
    controls = {"priority": priority} if priority else {}
    request = GenerationRequest("r1", ModelKind.CHAT, messages=[{"role": "user", "content": "hello"}],
                                params=SamplingParams(max_tokens=16))
    return SimpleNamespace(model=model, controls=controls, key_defaults={}, request=request)


def stats(model: str) -> dict:
    return {"model_id": model, "replica_id": f"{model}#0", "running": 1, "waiting": 0, "prefill_tokens_per_second": 20000.0,
            "queued_prefill_tokens": 0, "decode_seconds_per_token": 0.02}


def test_router_refuses_what_cannot_start_in_time_with_retry_after():
    router = ModelSelection(fleet_config("slo"))
    clock = Clock()
    router.starts = busy_queue(clock, "big", started_per_second=10, pending=50)  # 5 s of queue ahead
    replicas = {"small": [stats("small")], "big": [stats("big")]}

    def route(j):
        return router.select(j, replicas)

    with pytest.raises(ApiError) as info:
        route(job("big"))
    err = info.value
    assert err.status == 503 and err.code == "no_capacity"
    assert err.headers["Retry-After"] in ("5", "6")  # 5 s of queue ahead, rounded up
    assert "TTFT target" in err.message
    # a batch request may wait 10x its target: admitted to the same queue
    assert route(job("big", priority="batch")).model == "big"
    # "auto" goes to the model that can start it in time
    routed = route(job("auto"))
    assert routed.model == "small"


def test_queue_admission_keeps_todays_behaviour():
    router = ModelSelection(fleet_config("queue"))
    clock = Clock()
    router.starts = busy_queue(clock, "big", started_per_second=10, pending=50)
    assert router.select(job("big"), {"small": [stats("small")], "big": [stats("big")]}).model == "big"


def budget_router(default_min_quality: float) -> ModelSelection:
    from scheduler.config import QualityBudgetConfig

    config = fleet_config("slo")
    config.routing.default_min_quality = default_min_quality
    config.routing.quality_budget = QualityBudgetConfig(target=0.95)
    return ModelSelection(config)


def test_the_quality_budget_counts_the_model_admission_puts_a_request_on_and_not_a_refused_one():
    """Routing records its choice in the budget's window; admission may then move the request onto a fallback or
    refuse it, and the window must hold what is served (it held the refused request, and the first choice)."""
    clock = Clock()
    replicas = {"small": [stats("small")], "big": [stats("big")]}
    # the small model is adequate and chosen, but cannot start it in time: admitted on the big one
    moved = budget_router(0.0)
    moved.starts = busy_queue(clock, "small", started_per_second=10, pending=50)
    routed = moved.select(job("auto"), replicas)
    assert routed.model == "big" and "admitted on big" in routed.reason
    assert routed.decision.adequacy < 1.0
    assert moved.quality_budget.state()["served_mean"] == 1.0, "the big model's predicted quality, not the small one's"
    assert moved.quality_budget.state()["window"] == 1
    # only the big model is adequate (wall 0.99 until the window fills) and it cannot start it in time: refused
    refused = budget_router(0.99)
    refused.starts = busy_queue(clock, "big", started_per_second=10, pending=50)
    with pytest.raises(ApiError):
        refused.select(job("auto"), replicas)
    assert refused.quality_budget.state()["window"] == 0 and refused.quality_budget.state()["served_mean"] is None

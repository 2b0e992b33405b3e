"""Placement predicts latency at the batch a request will see (queue, arrivals, prefill interference) with an SLO margin;
the optional lowest-energy model choice."""

import pytest

from scheduler.config import ModelConfig, RoutingConfig
from scheduler.routing.controls import merge_request_controls
from scheduler.routing.placement import DEFAULT_SLO_MARGIN, PlacementRequest, place, predict, rank_replicas
from scheduler.routing.select import RouteRequest, route


def busy(running=50, waiting=0, rate=0.0, prompt_rate=0.0, jd=0.05, **kw):
    """A replica like the simulated 70B one: 25 ms steps growing 0.1 ms per extra sequence, 15k prefill tokens/s."""
    s = {"running": running, "waiting": waiting, "prefill_tokens_per_second": 15000.0, "decode_seconds_per_token": 0.025,
         "decode_seconds_per_token_per_sequence": 1e-4, "arrival_rate_per_second": rate,
         "arrival_prompt_tokens_per_second": prompt_rate, "joules_per_decode_token": jd, "joules_per_prefill_token": jd / 10,
         "idle_power_watts": 580.0, "queued_prefill_tokens": 0}
    s.update(kw)
    return s


#: all traffic on one replica: batch 150, 6200 prompt tokens/s against 10000 prefill tokens/s at that batch
PACKED = busy(running=150, waiting=3, rate=5.4, prompt_rate=6200.0, queued_prefill_tokens=3000, jd=0.03,
              decode_seconds_per_token=0.04, prefill_tokens_per_second=10000.0)
REQ = PlacementRequest(prompt_tokens=1000, output_tokens=200, ttft_slo_seconds=1.0, tpot_slo_seconds=0.1)


def test_prefill_interference_and_arrivals_stretch_predicted_tpot():
    quiet = predict(REQ, busy())
    assert quiet.tpot_seconds == pytest.approx(0.025)
    # 6000 prompt tokens/s into a 15000 tokens/s prefill: 40% of the time goes to prefill, decode stretches 1/(1-0.4)
    loaded = predict(REQ, busy(prompt_rate=6000.0))
    assert loaded.tpot_seconds == pytest.approx(0.025 / 0.6)
    # arrivals during its ~8 s decode grow the batch: half of them on average, each 0.1 ms slower per step
    growing = predict(REQ, busy(rate=5.0, prompt_rate=6000.0))
    decode_s = 199 * 0.025 / 0.6
    assert growing.tpot_seconds == pytest.approx((0.025 + 1e-4 * 0.5 * 5.0 * decode_s) / 0.6)
    # the waiting queue joins the batch and delays the first token
    queued = predict(REQ, busy(waiting=4, queued_prefill_tokens=6000))
    assert queued.tpot_seconds == pytest.approx(0.025 + 4e-4)
    assert queued.ttft_seconds == pytest.approx(7000 / 15000)


def test_queue_stands_in_for_prefill_load_when_no_rate_is_published():
    stats = busy(queued_prefill_tokens=15000)
    del stats["arrival_rate_per_second"], stats["arrival_prompt_tokens_per_second"]
    p = predict(REQ, stats)
    queued_s, decode_s = 1.0, 199 * 0.025
    assert p.tpot_seconds == pytest.approx(0.025 / (1 - queued_s / (queued_s + decode_s)))


def test_over_packed_replica_becomes_infeasible():
    # the old check (TPOT of one more request at the current batch: 40 ms) called this replica fine
    packed = PACKED
    p = predict(REQ, packed)
    assert not p.feasible and "TPOT" in p.reason and "prefill share" in p.reason
    # so the cheaper-per-token packed replica loses to a feasible one
    lighter = busy(running=20, rate=0.5, prompt_rate=600.0, jd=0.06)
    assert place(REQ, [packed, lighter]) == 1
    ranked = rank_replicas(REQ, [packed, lighter])
    assert [r.index for r in ranked] == [1, 0] and ranked[0].feasible and not ranked[1].feasible


def test_margin_is_headroom_on_both_slos():
    # predicted TPOT 25/0.6 = 41.7 ms: inside 50 ms with no margin, outside with 50% margin
    stats = busy(prompt_rate=6000.0)
    tight = PlacementRequest(1000, 200, 1.0, 0.05, slo_margin=0.0)
    assert predict(tight, stats).feasible
    assert not predict(PlacementRequest(1000, 200, 1.0, 0.05, slo_margin=0.5), stats).feasible
    # TTFT: 1000 tokens at 15000/s = 67 ms; a 90 ms SLO holds with 20% margin, not with 50%
    assert predict(PlacementRequest(1000, 200, 0.09, None, slo_margin=0.2), stats).feasible
    assert not predict(PlacementRequest(1000, 200, 0.09, None, slo_margin=0.5), stats).feasible
    assert PlacementRequest(1, 1).slo_margin == DEFAULT_SLO_MARGIN
    # the margin travels from the routing config through the request controls
    c = merge_request_controls({}, {}, RoutingConfig(placement_slo_margin=0.3))
    assert c.placement_slo_margin == 0.3 and c.model_choice == "smallest"
    assert merge_request_controls({}, {}, RoutingConfig()).placement_slo_margin == DEFAULT_SLO_MARGIN


def test_feasible_replica_preferred_and_ties_deterministic():
    reps = [busy(jd=0.05), {**PACKED, "joules_per_decode_token": 0.01}, busy(jd=0.05)]
    first = [p.index for p in rank_replicas(REQ, reps)]
    assert first[0] == 0 and first[-1] == 1  # equal energy: lower index first; the infeasible one last
    assert all([p.index for p in rank_replicas(REQ, reps)] == first for _ in range(5))
    assert place(REQ, reps) == 0


def _models():
    return [ModelConfig(id="small", kind="chat", engine="simulated", params_b=8, devices=["g0"]),
            ModelConfig(id="large", kind="chat", engine="simulated", params_b=70, devices=["g1"])]


class _Adequate:
    def adequacy(self, prompt: str) -> float:
        return 0.95


def test_lowest_energy_model_choice_prefers_a_busy_large_replica_over_waking_an_idle_small_one():
    # the small replica is idle (its whole idle draw is charged to the request); the large one is busy and cheap per token
    stats = {"small": [busy(running=0, jd=0.3, idle_power_watts=120.0)], "large": [busy(running=60, jd=0.05)]}
    req = RouteRequest(kind="chat", prompt_text="x", prompt_tokens=500, max_tokens=200)
    smallest = route(_models(), req, merge_request_controls({}, {"min_quality": 0.5}, RoutingConfig()), _Adequate(), stats)
    assert smallest.model_id == "small" and "smallest adequate" in smallest.reason
    cfg = RoutingConfig(model_choice="lowest-energy")
    d = route(_models(), req, merge_request_controls({}, {"min_quality": 0.5}, cfg), _Adequate(), stats)
    assert d.model_id == "large" and "lowest predicted energy" in d.reason and d.slo_met
    assert d.fallbacks == [("small", 0)]
    # when the large replica cannot meet the SLO, the adequate small model serves
    stats["large"] = [{**PACKED, "joules_per_decode_token": 0.01}]
    d = route(_models(), req, merge_request_controls({}, {"min_quality": 0.5}, cfg), _Adequate(), stats)
    assert d.model_id == "small"
    # a quality target only the large model reaches is never traded for energy
    d = route(_models(), req, merge_request_controls({}, {"min_quality": 0.99}, cfg), _Adequate(),
              {"small": [busy(running=0, jd=0.001)], "large": [busy(running=60, jd=0.05)]})
    assert d.model_id == "large"

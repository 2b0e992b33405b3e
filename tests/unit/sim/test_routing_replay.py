"""Replay in route mode: the simulator's "auto" runs the gateway's route(), is seeded, and energy placement respects the SLO."""

from collections import Counter

import numpy as np
import pytest

import scheduler.routing.select as select
from scheduler.config import load_config
from scheduler.routing.placement import place as energy_place
from scheduler.sim.fleet import FleetSimulator
from scheduler.datafiles import sim_fleet_config
from scheduler.sim.trace import Trace

CONFIG = sim_fleet_config()


def _trace(n=300, seconds=20.0, seed=1) -> Trace:
    """A busy synthetic slice (15 req/s, conversation-like lengths) so queues form and SLOs can bind."""
    rng = np.random.default_rng(seed)
    return Trace(np.sort(rng.uniform(0, seconds, n)), rng.integers(200, 3000, n), rng.integers(20, 400, n), None, "synthetic")


def _run(**kw):
    kw.setdefault("placement", energy_place)
    return FleetSimulator(load_config(CONFIG), **kw).run(_trace()).summary()


def test_auto_runs_the_gateways_route_and_quality_target_moves_traffic_to_the_large_model(monkeypatch):
    calls = []
    real = select.route

    def spy(*a, **k):
        d = real(*a, **k)
        calls.append(d)
        return d

    monkeypatch.setattr(select, "route", spy)
    shares, acc = {}, {}
    for q in (0.0, 0.873, 0.95, 1.0):
        r = _run(min_quality=q)["routing"]
        shares[q], acc[q] = r["large_model_share"], r
    assert len(calls) == 4 * 300 and all(d.adequacy is not None for d in calls)
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0
    assert 0.2 < shares[0.873] < shares[0.95] < 1.0
    # label-implied accuracy: all-small scores the weak labels, all-large the strong ones, the mix in between
    assert acc[0.0]["label_accuracy"] == pytest.approx(acc[0.0]["weak_accuracy_same_prompts"])
    assert acc[1.0]["label_accuracy"] == pytest.approx(acc[1.0]["strong_accuracy_same_prompts"])
    assert acc[0.0]["label_accuracy"] < acc[0.873]["label_accuracy"] < acc[1.0]["label_accuracy"]


def test_prompts_come_from_the_held_out_split_only():
    from scheduler.routing.data import normalise_prompt
    from scheduler.routing.train import split_data
    from scheduler.sim.prompts import held_out_pool

    split = split_data()
    pool = held_out_pool()
    # the packaged pool is exactly today's held-out split, and no question of it (up to case, spacing and punctuation)
    # is among the rows the predictor was trained on
    assert pool.prompts == split.test.prompts
    assert np.array_equal(pool.weak_correct, split.test.weak_correct)
    assert np.array_equal(pool.strong_correct, split.test.strong_correct)
    assert {normalise_prompt(p) for p in pool.prompts}.isdisjoint(normalise_prompt(p) for p in split.train.prompts)


def test_route_mode_is_deterministic_for_a_seed():
    a, b, c = _run(seed=5, min_quality=0.873), _run(seed=5, min_quality=0.873), _run(seed=6, min_quality=0.873)
    for k in ("energy_joules", "ttft_p99_seconds", "tpot_p99_seconds", "slo_attainment"):
        assert a[k] == b[k]
    assert a["routing"]["requests_by_model"] == b["routing"]["requests_by_model"]
    assert a["routing"]["label_accuracy"] == b["routing"]["label_accuracy"]
    # another seed draws other prompts, so other routing
    assert (a["routing"]["requests_by_model"], a["routing"]["label_accuracy"]) != (c["routing"]["requests_by_model"], c["routing"]["label_accuracy"])


def test_energy_placement_picks_a_replica_meeting_the_slo_whenever_one_exists(monkeypatch):
    decisions = []
    real = select.route

    def spy(*a, **k):
        d = real(*a, **k)
        decisions.append(d)
        return d

    monkeypatch.setattr(select, "route", spy)
    s = _run(min_quality=0.873, seed=2)
    assert len(decisions) == 300
    infeasible_seen = 0
    for d in decisions:
        chosen = d.chosen
        preds = {p["index"]: p for p in chosen.replicas}
        infeasible_seen += sum(not p["feasible"] for p in chosen.replicas)
        if any(p["feasible"] for p in chosen.replicas):
            assert preds[d.replica_index]["feasible"], d.reason
            # and it is the cheapest feasible one
            cheapest = min((p for p in chosen.replicas if p["feasible"]), key=lambda p: p["energy_joules"])
            assert preds[d.replica_index]["energy_joules"] == cheapest["energy_joules"]
    assert infeasible_seen > 0, "the trace should load some replica past its SLO"
    # the simulator served each request on the replica route() chose
    by_decision = Counter(f"{d.model_id}#{d.replica_index}" for d in decisions)
    assert {k: v for k, v in s["replicas"].items() if v["completed"]} and all(
        s["replicas"][rid]["completed"] == n for rid, n in by_decision.items()
    )


def test_round_robin_after_model_selection_cycles_the_chosen_models_replicas():
    s = _run(placement=None, min_quality=0.873)
    small = [v["completed"] for k, v in s["replicas"].items() if k.startswith("llama-3.1-8b#")]
    assert sum(small) == s["routing"]["requests_by_model"]["llama-3.1-8b"] > 0
    assert max(small) - min(small) <= 1
    assert "RoundRobin among the chosen model's replicas" in s["routing"]["placement"]


def test_placement_only_keeps_the_old_behaviour():
    s = _run(placement=None, auto_selection="placement-only")
    assert s["routing"] == {} and s["settings"]["auto_selection"] == "placement-only"
    # round-robin over all five replicas, the 70B included, with no model selection
    counts = [v["completed"] for v in s["replicas"].values()]
    assert len(counts) == 5 and max(counts) - min(counts) <= 1


def test_routing_fleet_benchmark_writes_every_policy(tmp_path):
    import json

    from benchmarks import routing_fleet

    out = tmp_path / "rf"
    assert routing_fleet.main(["--minutes", "0.3", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    runs = doc["runs"]
    assert doc["method"] == "simulated" and len(doc["quality_targets"]) == 3
    for name in ("largest-rr", "largest-energy", "largest-rr-2x70b", "largest-energy-2x70b", "smallest-energy"):
        assert runs[name]["completed"] == doc["requests"]
    assert runs["largest-energy"]["large_model_share"] == 1.0 and runs["smallest-energy"]["large_model_share"] == 0.0
    q = doc["quality_targets"][0]["min_quality"]
    d = runs[f"auto-energy@{q:g}"]
    assert 0.0 < d["large_model_share"] < 1.0 and d["min_quality"] == q
    assert {"energy_per_request_joules", "tokens_per_joule", "ttft_p99_seconds", "tpot_p99_seconds", "slo_attainment", "label_accuracy"} <= set(d)
    assert "| (d) auto" in out.with_suffix(".md").read_text()

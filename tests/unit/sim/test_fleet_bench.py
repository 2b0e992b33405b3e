"""`wattlane bench fleet` on a tiny window: structural invariants of the result that a wrong replay or accounting would break."""

import json
import math

import pytest
from typer.testing import CliRunner

from scheduler.sim import bench

POLICIES = ["baseline", "routing", "wattlane", "wattlane-all", "oracle", "perfect-predictor"]


@pytest.fixture(scope="module")
def doc():
    return bench.run_bench(workloads=list(bench.WORKLOADS), loads=[1.0], policies=POLICIES, minutes=0.5, seed=0, workers=1)


def test_every_cell_has_every_policy_on_the_same_requests(doc):
    assert set(doc["cells"]) == {"conversation@1", "prompt-heavy@1"}
    for cell in doc["cells"].values():
        pol = cell["policies"]
        assert list(pol) == POLICIES
        assert len({r["requests"] for r in pol.values()}) == 1 and pol["baseline"]["requests"] > 10
        assert all(r["method"] == "simulated" for r in pol.values())


def test_energy_components_sum_to_total_and_gpu_hours_cover_the_run(doc):
    for cell in doc["cells"].values():
        for name, r in cell["policies"].items():
            comp = r["energy_components_joules"]
            assert comp["dynamic"] + comp["idle"] == pytest.approx(r["energy_joules"], rel=1e-9), name
            assert 0.0 <= comp["parked_part_of_idle"] <= comp["idle"] + 1e-9
            assert r["dynamic_energy_per_request_joules"] + r["idle_energy_per_request_joules"] == pytest.approx(r["energy_per_request_joules"])
            # 8 GPUs, each either busy or idle for the whole run
            assert r["gpu_hours_busy"] + r["gpu_hours_idle"] >= 8 * r["virtual_seconds"] / 3600 * (1 - 1e-9)
            assert r["gpu_hours_parked"] <= r["gpu_hours_idle"] + 1e-12
            assert r["energy_per_output_token_joules"] == pytest.approx(r["energy_joules"] / r["completion_tokens"])
    assert doc["run"]["cpu_seconds"] > 0


def test_per_model_breakdown_adds_up_to_the_totals(doc):
    for cell in doc["cells"].values():
        for name, r in cell["policies"].items():
            pools = r["by_model"]
            per_req = sum(b["busy_joules_per_request"] + b["idle_joules_per_request"] + b["parked_joules_per_request"] for b in pools.values())
            assert per_req == pytest.approx(r["energy_per_request_joules"], rel=1e-9), name
            assert sum(b["gpus"] for b in pools.values()) == 8
            assert {m: b["requests"] for m, b in pools.items() if b["requests"]} == {m: n for m, n in r["requests_by_model"].items() if n}
            for b in pools.values():
                assert b["mean_busy_clock_mhz"] is None or 200 <= b["mean_busy_clock_mhz"] <= 1980 + 1e-6
        # per-batch clocks run batches below the top clock; the fixed-clock baseline never does
        assert cell["policies"]["baseline"]["by_model"]["llama-3.1-70b"]["mean_busy_clock_mhz"] == pytest.approx(1980)
        assert cell["policies"]["wattlane-all"]["by_model"]["llama-3.1-70b"]["mean_busy_clock_mhz"] < 1900


def test_shares_sum_to_one_and_quality_is_against_the_baseline(doc):
    for cell in doc["cells"].values():
        pol = cell["policies"]
        for name, r in pol.items():
            assert math.isclose(sum(r["share_by_model"].values()), 1.0, rel_tol=1e-12), name
            assert sum(r["requests_by_model"].values()) == r["completed"]
        assert pol["baseline"]["share_by_model"] == {"llama-3.1-70b": 1.0}
        assert pol["baseline"]["comparison"]["quality_retained"] == 1.0
        assert pol["routing"]["share_by_model"]["llama-3.1-8b"] > 0.0
        # the oracle never sends a request the small model gets wrong and the large one right
        assert pol["oracle"]["comparison"]["quality_retained"] >= 1.0


def test_oracle_uses_no_more_energy_than_any_policy_when_it_meets_the_slo(doc):
    for key, cell in doc["cells"].items():
        pol = cell["policies"]
        o = pol["oracle"]
        assert o["slo_attainment"] >= 0.99, key
        for name, r in pol.items():
            assert o["energy_per_request_joules"] <= r["energy_per_request_joules"] * (1 + 1e-9), (key, name)
            assert r["comparison"]["energy_vs_oracle"] >= -1e-9


def test_parking_parks_and_saves_idle_energy(doc):
    for cell in doc["cells"].values():
        pol = cell["policies"]
        assert pol["wattlane-all"]["parks"] > 0 and pol["wattlane-all"]["gpu_hours_parked"] > 0
        assert pol["wattlane"]["parks"] == 0 and pol["wattlane"]["gpu_hours_parked"] == 0


def test_cli_writes_json_markdown_and_plots(tmp_path):
    from scheduler.cli import _register_all, app

    _register_all()
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "fleet", "--out", str(out), "--minutes", "0.2", "--loads", "1",
                                   "--policies", "baseline,oracle", "--workloads", "prompt-heavy", "--no-band", "--workers", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "fleet-bench.json").read_text())
    assert set(doc["cells"]["prompt-heavy@1"]["policies"]) == {"baseline", "oracle"}
    assert "| oracle |" in (out / "fleet-bench.md").read_text()
    for png in ("energy-vs-load.png", "slo-vs-load.png", "energy-breakdown.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused_before_any_replay():
    with pytest.raises(bench.BenchError, match="unknown policy set"):
        bench.plan(["conversation"], [1.0], ["baseline", "nope"], 1.0, 0, False)
    with pytest.raises(bench.BenchError, match="must include 'baseline'"):
        bench.plan(["conversation"], [1.0], ["oracle"], 1.0, 0, False)
    with pytest.raises(bench.BenchError, match="one-hour conversation trace"):
        bench.plan(["conversation"], [4.0], ["baseline"], 20.0, 0, False)
    with pytest.raises(bench.BenchError, match="loads must be positive"):
        bench.plan(["conversation"], [0.0], ["baseline"], 1.0, 0, False)


def test_packaged_fleet_configs_match_the_repository_copies():
    # an installed `wattlane bench fleet` (no repository) replays on the packaged copies
    from scheduler import datafiles
    from scheduler.datafiles import REPOSITORY_DIR

    for name in bench.FLEETS.values():
        assert datafiles.sim_fleet_config().with_name(name).read_text() == (REPOSITORY_DIR / "configs" / name).read_text()


def test_band_is_the_power_replay_band():
    from benchmarks.power_replay import SENSITIVITY_BAND

    assert bench.SENSITIVITY_BAND == SENSITIVITY_BAND == bench.PACKAGED_BAND


def test_min_quality_overrides_the_routed_policies_threshold_only():
    with pytest.raises(bench.BenchError, match="min quality"):
        bench.plan(["conversation"], [1.0], ["baseline"], 1.0, 0, False, min_quality=1.5)
    jobs = bench.plan(["prompt-heavy"], [1.0], ["baseline", "wattlane-all", "oracle"], 0.5, 0, False, min_quality=1.0)
    assert {j.min_quality for j in jobs} == {1.0}
    doc = bench.run_bench(workloads=["prompt-heavy"], loads=[1.0], policies=["baseline", "wattlane-all", "oracle"],
                          minutes=0.5, seed=0, min_quality=1.0)
    pol = doc["cells"]["prompt-heavy@1"]["policies"]
    assert doc["settings"]["min_quality"] == 1.0
    # min_quality 1.0: no prompt is adequate for the 8B (adequacy stays below 1), so the routed policy serves all on the 70B
    assert pol["wattlane-all"]["min_quality"] == 1.0 and pol["wattlane-all"]["share_by_model"][bench.LARGE] == 1.0
    # the oracle routes by the labels whatever the threshold
    assert pol["oracle"]["min_quality"] is None and pol["oracle"]["share_by_model"].get(bench.SMALL, 0.0) > 0.5


def test_budget_prompt_weight_reaches_the_routed_budgets_and_is_checked():
    with pytest.raises(bench.BenchError, match="budget prompt weight"):
        bench.plan(["conversation"], [1.0], ["baseline"], 1.0, 0, False, budget_prompt_weight=-1.0)
    jobs = bench.plan(["prompt-heavy"], [1.0], ["baseline", "wattlane-all"], 0.5, 0, False, budget_prompt_weight=1.0)
    assert {j.budget_prompt_weight for j in jobs} == {1.0}
    # the weight reaches route(): long prompts weigh more, so the routed set's choices change
    shares = []
    for weight in (None, 1.0):
        doc = bench.run_bench(workloads=["prompt-heavy"], loads=[1.0], policies=["baseline", "wattlane-all"], minutes=3.0,
                              seed=0, budget_prompt_weight=weight)
        assert doc["settings"]["budget_prompt_weight"] == weight
        shares.append(doc["cells"]["prompt-heavy@1"]["policies"]["wattlane-all"]["share_by_model"][bench.LARGE])
    assert shares[0] != shares[1]


def test_wattlanes_rule_with_a_perfect_predictor_routes_as_the_oracle(doc):
    # with true adequacy, the smallest adequate model that meets the SLO is also the one of lowest predicted
    # energy: what separates full Wattlane from the oracle is the predictor (docs/benchmarks.md, "The oracle")
    for cell in doc["cells"].values():
        pol = cell["policies"]
        perfect, oracle = pol["perfect-predictor"], pol["oracle"]
        assert perfect["requests_by_model"] == oracle["requests_by_model"]
        assert perfect["energy_per_request_joules"] == pytest.approx(oracle["energy_per_request_joules"], rel=1e-9)
        large = "llama-3.1-70b"
        assert pol["wattlane-all"]["share_by_model"][large] > 2 * oracle["share_by_model"][large]


def test_minutes_that_are_not_finite_and_negative_seeds_are_refused_before_any_replay():
    # nan passed `minutes <= 0` and crashed in compare after every replay; a negative seed failed in numpy
    with pytest.raises(bench.BenchError, match="minutes must be a positive finite number, got nan"):
        bench.plan(["prompt-heavy"], [1.0], ["baseline"], float("nan"), 0, False)
    with pytest.raises(bench.BenchError, match="seed must be 0 or more"):
        bench.plan(["prompt-heavy"], [1.0], ["baseline"], 1.0, -1, False)


def test_a_cell_whose_baseline_completed_nothing_has_no_comparison():
    """A window too short for any request (0.0001 minutes) divided by the baseline's zero energy per request."""
    doc = bench.run_bench(workloads=["prompt-heavy"], loads=[1.0], policies=["baseline", "oracle"], minutes=0.0001, seed=0)
    pol = doc["cells"]["prompt-heavy@1"]["policies"]
    assert pol["baseline"]["completed"] == 0
    assert pol["oracle"]["comparison"] == {"energy_vs_baseline": None, "quality_retained": None,
                                           "slo_points_vs_baseline": None, "energy_vs_oracle": None}
    from scheduler.sim.bench_report import render_doc_blocks, render_markdown

    assert "| oracle |" in render_markdown({**doc, "command": "x"}) and render_doc_blocks(doc)["cells"]


def _bench(*args):
    from scheduler.cli import _register_all, app

    _register_all()
    return CliRunner().invoke(app, ["bench", *args])


def test_fleet_out_and_docs_are_checked_before_any_replay(tmp_path, monkeypatch):
    """An existing file as --out, or a --docs page without the blocks, used to fail only after the whole bench."""
    monkeypatch.setattr(bench, "run_bench", lambda **k: pytest.fail("replayed before checking --out and --docs"))
    short = ["--minutes", "0.1", "--loads", "1", "--policies", "baseline", "--no-band"]
    a_file = tmp_path / "results"
    a_file.write_text("")
    r = _bench("fleet", "--out", str(a_file), *short)
    assert r.exit_code == 2 and f"error: --out {a_file} is a file" in r.output, r.output
    r = _bench("fleet", "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "missing.md"), *short)
    assert r.exit_code == 2 and "cannot read" in r.output and "missing.md" in r.output, r.output
    page = tmp_path / "page.md"
    page.write_text("# no blocks here\n")
    r = _bench("fleet", "--out", str(tmp_path / "out"), "--docs", str(page), *short)
    assert r.exit_code == 2 and "no block 'ablations'" in r.output and not (tmp_path / "out").exists(), r.output


@pytest.mark.parametrize("content, missing", [("{}", "no 'cells' object"), ("[1, 2]", "holds a JSON list"),
                                              ('{"cells": {"a": 1}}', "cell 'a' is not an object"),
                                              ('{"cells": {}}', "no 'settings' object")])
def test_bench_docs_names_the_results_file_and_what_it_lacks(tmp_path, content, missing):
    results = tmp_path / "r.json"
    results.write_text(content)
    page = tmp_path / "page.md"
    page.write_text("untouched\n")
    r = _bench("docs", "--results", str(results), "--docs", str(page))
    assert r.exit_code == 2 and str(results) in r.output and missing in r.output and "Traceback" not in r.output, r.output
    assert page.read_text() == "untouched\n"

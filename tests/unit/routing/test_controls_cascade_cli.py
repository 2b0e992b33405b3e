"""Request-control merging, the cascade rule, the route-eval/route-calibrate commands and the Serve router."""

import csv
import json

import pytest
from typer.testing import CliRunner

from scheduler.config import RoutingConfig, SloConfig
from scheduler.routing.cascade import cascade_applies, should_escalate
from scheduler.routing.controls import RequestControlError, merge_request_controls


def test_precedence_request_over_key_over_config():
    cfg = RoutingConfig(default_min_quality=0.7, default_slo=SloConfig(ttft_ms=900, tpot_ms=90))
    c = merge_request_controls({"min_quality": 0.5, "slo": {"tpot_ms": 50}, "priority": "batch"},
                               {"slo": {"ttft_ms": 300}}, cfg)
    assert (c.min_quality, c.ttft_ms, c.tpot_ms, c.priority) == (0.5, 300, 50, "batch")
    c = merge_request_controls(None, {"min_quality": 0.9, "priority": "interactive"}, cfg)
    assert c.min_quality == 0.9 and c.priority == "interactive" and c.ttft_ms == 900


def test_key_budget_is_a_ceiling():
    c = merge_request_controls({"max_energy_joules": 100}, {"max_energy_joules": 500}, RoutingConfig())
    assert c.max_energy_joules == 100
    c = merge_request_controls({"max_energy_joules": 100}, {"max_energy_joules": 20}, RoutingConfig())
    assert c.max_energy_joules == 20


@pytest.mark.parametrize(
    "fields, param",
    [({"min_quality": 1.5}, "min_quality"), ({"priority": "urgent"}, "priority"), ({"slo": {"ttft_ms": -1}}, "slo.ttft_ms"),
     ({"slo": {"p99": 1}}, "slo.p99"), ({"max_energy_joules": "lots"}, "max_energy_joules"), ({"slo": 5}, "slo")],
)
def test_bad_controls_name_the_field(fields, param):
    with pytest.raises(RequestControlError) as exc:
        merge_request_controls({}, fields, RoutingConfig())
    assert exc.value.param == param


def test_cascade_rule():
    cfg = RoutingConfig(cascade=True)
    assert cascade_applies("batch", cfg, "large") and not cascade_applies("interactive", cfg, "large")
    assert not cascade_applies("batch", RoutingConfig(cascade=False), "large") and not cascade_applies("batch", cfg, None)
    assert should_escalate(-2.0, -1.5).escalate and not should_escalate(-0.3, -1.5).escalate
    assert should_escalate(None, -1.5).escalate and should_escalate(-0.1, -1.5, completion_tokens=0).escalate


@pytest.fixture(scope="module")
def app():
    from scheduler.cli import _register_all, app

    if not any(c.name == "route-eval" for c in app.registered_commands):
        _register_all()
    return app


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    from scheduler import datafiles
    from scheduler.routing import data as routing_data

    d = routing_data.load_csv(datafiles.routing_csv("gsm8k"))
    path = tmp_path_factory.mktemp("routing") / "small.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "weak_correct", "strong_correct"])
        for i in range(120):
            w.writerow([d.prompts[i], int(d.weak_correct[i]), int(d.strong_correct[i])])
    return path


def test_route_eval_prints_metrics_and_json_last_line(app, small_csv):
    res = CliRunner().invoke(app, ["route-eval", "--data", str(small_csv)])
    assert res.exit_code == 0, res.output
    last = json.loads(res.output.strip().splitlines()[-1])
    assert set(last) == {"apgr", "cpt50", "cpt80", "baseline"}
    assert all(0.0 <= last[k] <= 1.5 for k in ("apgr", "cpt50", "cpt80"))
    # the TF-IDF baseline stays visible beside the predictor
    assert set(last["baseline"]) == {"apgr", "cpt50", "cpt80"} and "TF-IDF baseline" in res.output
    assert "APGR" in res.output and "CPT(50%)" in res.output


def test_route_eval_errors_exit_2_without_traceback(app, tmp_path):
    res = CliRunner().invoke(app, ["route-eval", "--data", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "file not found" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,weak_correct\nhi,1\n")
    res = CliRunner().invoke(app, ["route-eval", "--data", str(bad)])
    assert res.exit_code == 2 and "strong_correct" in res.output


def test_route_calibrate_strong_share(app, small_csv, tmp_path):
    out = tmp_path / "routing.yaml"
    res = CliRunner().invoke(app, ["route-calibrate", "--data", str(small_csv), "--strong-share", "0.3", "--write", str(out)])
    assert res.exit_code == 0, res.output
    import yaml

    snippet = yaml.safe_load(out.read_text())
    q = snippet["routing"]["default_min_quality"]
    RoutingConfig(default_min_quality=q)  # the snippet is valid config
    assert "strong-model share 30.0%" in out.read_text()
    res = CliRunner().invoke(app, ["route-calibrate", "--data", str(small_csv)])
    assert res.exit_code == 2


def test_serve_router_ranks_by_energy_without_ray_running():
    from scheduler.routing.serve_router import placement_hint, rank_running_replicas

    class Replica:
        def __init__(self, name, stats):
            self.replica_id, self.routing_stats = name, stats

    class Pending:
        args, kwargs = [], {"placement": {"prompt_tokens": 100, "output_tokens": 50, "ttft_slo_seconds": 1.0}}

    common = {"prefill_tokens_per_second": 1000.0, "decode_seconds_per_token": 0.02}
    reps = [Replica("hot", {**common, "joules_per_decode_token": 0.3}), Replica("cool", {**common, "joules_per_decode_token": 0.1}),
            Replica("late", {**common, "joules_per_decode_token": 0.01, "waiting": 20})]
    ranks = rank_running_replicas(reps, Pending())
    assert [r[0].replica_id for r in ranks] == ["cool", "hot", "late"]  # "late" misses the TTFT SLO
    assert placement_hint(Pending()).prompt_tokens == 100
    silent = [Replica("a", {}), Replica("b", None)]
    assert rank_running_replicas(silent, Pending()) == [silent]


def _not_artefacts(tmp_path):
    """Files an --artefact can name that are not a predictor artefact, and what the error says of each."""
    import numpy as np

    from scheduler.routing.adequacy import DEFAULT_ARTEFACT

    csv_file = tmp_path / "rows.csv"  # numpy read this as a pickle: "This file contains pickled (object) data"
    csv_file.write_text("prompt,weak_correct,strong_correct\nhi,1,1\n")
    no_meta = tmp_path / "no-meta.npz"  # was KeyError: 'metadata is not a file in the archive'
    with np.load(DEFAULT_ARTEFACT) as z:
        np.savez(no_meta, **{k: z[k] for k in z.files if k != "metadata"})
    bad_meta = tmp_path / "bad-meta.npz"
    np.savez(bad_meta, metadata=np.array("[1, 2]"), weights_strong=np.zeros(2), intercept_strong=0.0,
             weights_weak=np.zeros(2), intercept_weak=0.0)
    array = tmp_path / "array.npy"
    np.save(array, np.zeros(3))
    broken = tmp_path / "broken.npz"
    broken.write_bytes(DEFAULT_ARTEFACT.read_bytes()[:100])
    return [(csv_file, "not a NumPy .npz archive"), (no_meta, "it has no metadata"),
            (bad_meta, "its metadata is not a JSON object"), (array, "a single .npy array"),
            (broken, "unreadable as an .npz archive")]


def test_a_file_that_is_not_an_artefact_is_a_predictor_error_naming_it(tmp_path):
    from scheduler.routing.adequacy import AdequacyPredictor, PredictorError

    for path, what in _not_artefacts(tmp_path):
        with pytest.raises(PredictorError) as exc:
            AdequacyPredictor.load(path)
        assert str(exc.value).startswith(f"{path} is not an adequacy predictor artefact ({what}")
        assert "python -m scheduler.routing.train" in str(exc.value)


@pytest.mark.parametrize("command", [["route-eval", "--no-baseline"], ["route-calibrate", "--strong-share", "0.3"]])
def test_route_commands_refuse_an_artefact_that_is_not_one_with_exit_2(app, small_csv, tmp_path, command):
    for path, what in _not_artefacts(tmp_path):
        res = CliRunner().invoke(app, [*command, "--data", str(small_csv), "--artefact", str(path)])
        assert res.exit_code == 2, (path, res.exception, res.output)
        assert f"{path.name} is not an adequacy predictor artefact ({what}" in res.output

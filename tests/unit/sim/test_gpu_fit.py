"""Fitting a GPU's clock and power-cap constants from a GPU run recovers constants that are known."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks.gpu_run import RunPlan, simulated_run
from scheduler.sim.fit import main as fit_main
from scheduler.sim.profiles import gpu_profile, gpu_profiles

#: far from the assumed 0.6 / 0.05 / 0.3, so a fit that returns its start (or the defaults) fails
TRUE = {"voltage_floor_fraction": 0.72, "memory_clock_knee": 0.12, "memory_bound_sm_activity": 0.5}
PLAN = RunPlan(batch_sizes=(1, 16, 128), clock_fractions=(0.8, 0.6, 0.4), window_seconds=0.5, idle_seconds=1.0)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    true_gpu = replace(gpu_profile("h100-sxm"), **TRUE)
    doc = simulated_run(true_gpu, plan=PLAN)
    path = tmp_path_factory.mktemp("run") / "run.json"
    path.write_text(json.dumps(doc))
    return path


def test_fit_recovers_known_constants_and_writes_a_profile_that_says_where_they_came_from(run_file, tmp_path, capsys):
    out = tmp_path / "gpus.json"
    assert fit_main(["--gpu-run", str(run_file), "--gpu-key", "h100-fitted", "--gpu-out", str(out),
                     "--gpu-report", str(tmp_path / "report.json")]) == 0
    assert "max |log error|" in capsys.readouterr().out
    fitted = gpu_profiles(out)["h100-fitted"]
    assert fitted.voltage_floor_fraction == pytest.approx(TRUE["voltage_floor_fraction"], abs=0.03)
    assert fitted.memory_clock_knee == pytest.approx(TRUE["memory_clock_knee"], rel=0.2)
    assert fitted.memory_bound_sm_activity == pytest.approx(TRUE["memory_bound_sm_activity"], abs=0.05)
    # idle terms are the run's idle readings (the simulated card's 72 / 122 / 61 W)
    assert (fitted.idle_no_model_watts, fitted.idle_loaded_watts, fitted.idle_loaded_min_clock_watts) == pytest.approx((72, 122, 61))
    assert fitted.constants_provenance.startswith("fitted: ") and "(method simulated)" in fitted.constants_provenance
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["max_abs_log_error"] < 0.02 and report["windows"] == len(report["rows"]) > 20


def test_a_run_without_a_locked_clock_is_refused_with_the_reason(tmp_path, capsys):
    doc = simulated_run("h100-sxm", plan=RunPlan(batch_sizes=(1, 16, 128), clock_fractions=(), window_seconds=0.5, idle_seconds=1.0))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    assert fit_main(["--gpu-run", str(path), "--gpu-out", str(tmp_path / "gpus.json")]) == 2
    assert "no locked-clock setting" in capsys.readouterr().err
    assert not (tmp_path / "gpus.json").exists()


def test_a_missing_run_file_is_a_clear_error(tmp_path, capsys):
    assert fit_main(["--gpu-run", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err

"""The GPU measurement run's orchestration, exercised against a simulated GPU (the real run swaps in NVML and PyTorch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_run import RunPlan, simulated_run, write_results
from scheduler.devices.base import DevicePermissionError, DeviceSettingError
from scheduler.devices.simulated import SimulatedGpu

SMALL = RunPlan(batch_sizes=(1, 16, 128), power_limit_fractions=(0.7, 0.45), clock_fractions=(0.7, 0.4),
                window_seconds=0.5, idle_seconds=1.0)


class ClockLockRefusingGpu(SimulatedGpu):
    """A board whose driver refuses every clock lock (NVML_ERROR_INVALID_ARGUMENT) but takes power limits."""

    def set_locked_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        raise DeviceSettingError(f"{self.device_id}: nvmlDeviceSetGpuLockedClocks{(min_mhz, max_mhz)} was refused by the driver")


class UnprivilegedGpu(SimulatedGpu):
    """A board this process may read but not change (NVML without root)."""

    def set_power_limit_watts(self, watts: float) -> None:
        raise DevicePermissionError(f"{self.device_id}: nvmlDeviceSetPowerManagementLimit needs root or CAP_SYS_ADMIN")

    def set_locked_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        raise DevicePermissionError(f"{self.device_id}: nvmlDeviceSetGpuLockedClocks needs root or CAP_SYS_ADMIN")


def test_sweep_measures_every_setting_and_restores_what_it_found(tmp_path):
    doc = simulated_run("h100-sxm", plan=SMALL, state_dir=tmp_path)
    assert doc["method"] == "simulated" and "not a measurement" in doc["workload"]["label"]
    assert doc["restore"]["verified"] and doc["restore"]["after"] == {"power_limit_watts": 700.0, "locked_clocks_mhz": None}
    assert not (tmp_path / "power" / "saved_settings.json").exists()
    names = [s["name"] for s in doc["settings"]]
    assert names == ["default", "power limit 490 W", "power limit 315 W", "SM clock 1380 MHz", "SM clock 795 MHz"]
    assert all(s["applied"] and len(s["points"]) == 3 for s in doc["settings"]) and doc["refusals"] == []
    by = {s["name"]: {p["batch_size"]: p for p in s["points"]} for s in doc["settings"]}
    # what the run is for: batching amortises the weights, a cap or a lower clock costs latency and saves power
    d = by["default"]
    assert d[1]["decode"]["joules_per_token"] > 5 * d[128]["decode"]["joules_per_token"]
    assert by["power limit 315 W"][128]["decode"]["power_watts"] == pytest.approx(315, rel=0.02)
    slow = by["SM clock 795 MHz"][128]["decode"]
    assert slow["seconds_per_forward"] > d[128]["decode"]["seconds_per_forward"]
    assert slow["power_watts"] < d[128]["decode"]["power_watts"] and slow["mean_sm_clock_mhz"] == pytest.approx(795)
    # each window's joules are the counter's, over the window's own time
    for s in doc["settings"]:
        for p in s["points"]:
            w = p["decode"]
            assert w["joules"] == pytest.approx(w["power_watts"] * w["seconds"]) and w["tokens"] == w["forwards"] * p["batch_size"]
    idle = {(r["model_loaded"], r["clock"]): r["power_watts"] for r in doc["idle"]}
    assert idle[(True, "max")] == pytest.approx(122) and idle[(True, "min")] == pytest.approx(61) and idle[(False, "none")] == pytest.approx(72)


def test_refused_settings_are_recorded_and_the_sweep_goes_on(tmp_path):
    from benchmarks.gpu_run import VirtualClock

    clock = VirtualClock(0.0)
    gpu = ClockLockRefusingGpu("gpu0", "h100-sxm", node="sim", clock=clock)
    doc = simulated_run("h100-sxm", plan=SMALL, device=gpu, state_dir=tmp_path)
    refused = {s["name"]: s["refused"] for s in doc["settings"] if s["refused"]}
    assert set(refused) == {"SM clock 1380 MHz", "SM clock 795 MHz"} and all("refused by the driver" in e for e in refused.values())
    assert [s["name"] for s in doc["settings"] if s["applied"]] == ["default", "power limit 490 W", "power limit 315 W"]
    assert all(len(s["points"]) == 3 for s in doc["settings"] if s["applied"])
    assert {(r["model_loaded"], r["clock"]) for r in doc["idle"] if "refused" in r} == {(False, "max"), (False, "min"), (True, "max"), (True, "min")}
    assert doc["restore"]["verified"]


def test_without_privileges_every_change_is_refused_and_the_defaults_are_still_measured(tmp_path):
    from benchmarks.gpu_run import VirtualClock

    gpu = UnprivilegedGpu("gpu0", "h100-sxm", node="sim", clock=VirtualClock(0.0))
    doc = simulated_run("h100-sxm", plan=SMALL, device=gpu, state_dir=tmp_path)
    assert [s["name"] for s in doc["settings"] if s["applied"]] == ["default"]
    assert len(doc["settings"][0]["points"]) == 3
    assert all("recommend" in s["refused"] for s in doc["settings"][1:])
    assert doc["restore"]["verified"] and doc["restore"]["after"]["power_limit_watts"] == 700.0


def test_a_card_without_a_settable_power_limit_records_that_and_still_sweeps_clocks(tmp_path):
    doc = simulated_run("l40s", plan=SMALL, state_dir=tmp_path)
    pl = [s for s in doc["settings"] if s["kind"] == "power_limit"]
    assert len(pl) == 1 and "no settable power limit" in pl[0]["refused"] and pl[0]["points"] == []
    assert sum(1 for s in doc["settings"] if s["kind"] == "locked_clock" and s["applied"]) == 2
    assert doc["restore"]["verified"]


def test_results_are_written_as_json_and_markdown_with_every_figure(tmp_path):
    doc = simulated_run("h100-sxm", plan=SMALL, state_dir=tmp_path / "state")
    doc["command"] = "python -m benchmarks.gpu_run --simulated h100-sxm"
    js, md = write_results(doc, tmp_path / "out" / "run")
    back = json.loads(js.read_text())
    assert back["settings"][0]["points"][0]["decode"]["joules_per_token"] == doc["settings"][0]["points"][0]["decode"]["joules_per_token"]
    text = md.read_text()
    assert "method: simulated" in text and "**Simulated**" in text and "**verified**" in text
    assert text.count("| SM clock 795 MHz |") == 3 and "## Idle power" in text


def test_the_simulated_path_never_imports_torch():
    code = "import sys, benchmarks.gpu_run as g; g.simulated_run('h100-sxm', plan=g.RunPlan(batch_sizes=(1,), power_limit_fractions=(), clock_fractions=(), window_seconds=0.1, idle_seconds=0.1)); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("script", ["scripts/gpu/gpu_run.py", "scripts/gpu/nvml_check.py"])
def test_the_gpu_scripts_start_on_a_machine_without_a_gpu(script):
    """They are run by hand on a lent GPU machine: an import that broke since would cost that machine's time.
    --help imports everything the script needs before a GPU is touched (and needs no torch)."""
    from scheduler.datafiles import REPOSITORY_DIR

    r = subprocess.run([sys.executable, str(REPOSITORY_DIR / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout

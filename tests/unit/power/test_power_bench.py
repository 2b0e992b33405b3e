"""The power benchmark runs end to end on a slice of the trace and checks the budget on the simulated fleet."""

import json
from pathlib import Path

from benchmarks import power_replay


def test_power_replay_smoke(tmp_path):
    out = tmp_path / "power-replay"
    assert power_replay.main(["--minutes", "0.5", "--only", "default,budget", "--budget-watts", "2400", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["method"] == "simulated" and doc["runs"]["default"]["completed"] > 50
    b = doc["comparisons"]["budget"]
    assert b["met"] and b["max_sum_of_limits_watts"] <= 2400 and b["max_group_power_watts_1s"] <= 2400 + 1e-6
    assert "budget 2400 W" in Path(out.with_suffix(".md")).read_text()


def test_band_reruns_the_governor_at_both_ends_of_the_unfitted_constants(tmp_path):
    out = tmp_path / "power-replay"
    assert power_replay.main(["--minutes", "1", "--only", "default,slo-feedback", "--band", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    band = doc["sensitivity_band"]
    assert set(band["ends"]) == {"low", "high"}
    changes = [e["energy_per_request_change"] for e in band["ends"].values()]
    # the overrides reach the simulated devices: each end's physics gives other joules and another saving
    low, high = band["ends"]["low"], band["ends"]["high"]
    assert abs(low["default_energy_per_request_joules"] / high["default_energy_per_request_joules"] - 1) > 0.01
    assert changes[0] != changes[1]
    central = doc["comparisons"]["slo_feedback_vs_default"]["energy_per_request_change"]
    assert band["slo_feedback_energy_per_request_change"] == [min(changes + [central]), max(changes + [central])]
    assert doc["gpu_constants"]["h100-sxm"]["constants_provenance"] == "assumed"
    assert "Sensitivity band" in out.with_suffix(".md").read_text()

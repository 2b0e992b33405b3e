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

"""The seed sweep's reading of issue 14's targets: each is judged from the cell's own figures, and can fail."""

from benchmarks.fleet_seeds import CELLS, targets_met


def figures(over: dict[tuple[str, str], float] | None = None) -> dict[str, dict[str, float]]:
    """Figures that meet every target, with some (cell, figure) pairs changed."""
    cells = {k: {"baseline_slo": 0.995, "wattlane_slo": 0.999, "energy_vs_baseline": -0.61, "energy_vs_oracle": 0.10,
                 "quality_retained": 0.97} for k in CELLS}
    for (cell, name), value in (over or {}).items():
        cells[cell][name] = value
    return cells


def test_every_target_met_on_good_figures_and_each_fails_on_its_own_shortfall():
    assert all(targets_met(figures()).values())
    cases = {
        "conversation 1x: <= 40% of the baseline's energy": {("conversation@1", "energy_vs_baseline"): -0.59},
        "conversation 1x: within 15% of the oracle": {("conversation@1", "energy_vs_oracle"): 0.25},
        "conversation 1x: >= 95% quality retained": {("conversation@1", "quality_retained"): 0.949},
        "prompt-heavy 1x: Wattlane holds 99%": {("prompt-heavy@1", "wattlane_slo"): 0.9886},
        "prompt-heavy 2x: no worse than the baseline": {("prompt-heavy@2", "wattlane_slo"): 0.99,
                                                         ("prompt-heavy@2", "baseline_slo"): 0.991},
    }
    for target, over in cases.items():
        met = targets_met(figures(over))
        assert [k for k, v in met.items() if not v] == [target], target

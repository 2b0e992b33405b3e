"""The discrete-event engine reproduces the ML.ENERGY measurements it was fitted to, within 15%."""

import pytest

from scheduler.sim.calibration import calibrate_point, calibration_rows
ROWS = calibration_rows()


@pytest.mark.parametrize("profile,row", ROWS, ids=[f"{p}-b{r.max_num_seqs}" for p, r in ROWS])
def test_energy_power_and_itl_within_15_percent(profile, row):
    result = calibrate_point(profile, row)
    errors = result.errors()
    for metric, err in errors.items():
        assert abs(err) <= 0.15, f"{profile} batch {row.batch_size}: {metric} off by {err:+.1%} ({result})"


def test_both_required_models_are_calibrated():
    profiles = {p for p, _ in ROWS}
    assert {"llama-3.1-8b@h100-sxm", "llama-3.1-70b@h100-sxm"} <= profiles

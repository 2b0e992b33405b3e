"""Bounded mixed load with abandoned streams and bad input against real servers: nothing accepted is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.load_fault import run

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("config", "concurrency", "seconds"), [
    ("configs/sim-fleet.yaml", 16, 10),
    ("configs/local.yaml", 3, 14),
], ids=["simulated", "llamacpp"])
def test_mixed_load_loses_nothing_and_leaks_nothing(config: str, concurrency: int, seconds: float) -> None:
    report = run(REPO / config, concurrency=concurrency, seconds=seconds, seed=1)
    assert report.requests > 20, report
    assert report.by_kind["abandoned-stream"]["requests"] > 0
    # every request the gateway accepted, abandoned streams included, has its row under the id the client saw
    assert report.accepted_without_id == 0
    assert report.accepted_without_row == 0, report.ledger_rows_by_status
    assert report.running_requests_after == 0
    assert report.unexpected_5xx == 0 and report.connection_errors == 0, report.status_counts
    assert report.checks["bad_input_is_4xx"], report.by_kind["bad-input"]

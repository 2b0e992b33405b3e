"""Start-up energy (idle energy while models loaded) reaches the ledger once, the summary beside the groups, and /metrics."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from scheduler.energy.ledger import LedgerRow
from tests.support.gateway_app import NODE, bearer, build


def agent_snapshot(settled: bool, joules: float, started: float, ready: float | None) -> dict:
    """A device as NodeAgent._devices_snapshot reports it (the start-up fields)."""
    return {"device_id": "cpu0", "node": NODE, "agent_node": NODE, "kind": "cpu", "energy_method": "cpu-estimate",
            "energy_scope": "cpu", "power_watts": 9.0, "energy_joules": 500.0, "startup_energy_joules": joules,
            "startup_settled": settled, "started_unix_s": started, "ready_unix_s": ready}


def test_startup_energy_is_recorded_once_and_reported_beside_the_requests(tmp_path):
    app, gw = build(tmp_path)
    started = time.time() - 40.0
    gw.ledger.record(LedgerRow(request_id="r1", time_unix_s=started + 35.0, model="m", device="cpu0", node=NODE,
                               status="ok", joules=2.8, dynamic_joules=2.5, idle_joules=0.3,
                               energy_method="cpu-estimate")).result(timeout=5)
    try:
        with TestClient(app) as client:
            get = lambda **p: client.get("/v1/energy/summary", headers=bearer("reader"), params=p)  # noqa: E731
            gw.device_snapshots = [agent_snapshot(False, 120.0, started, None)]  # still loading
            body = get(group_by="model").json()
            assert body["startup"] == [] and body["startup_joules"] == 0.0

            gw.device_snapshots = [agent_snapshot(True, 360.0, started, started + 30.0)]
            for _ in range(2):  # a second look must not add a second row
                body = get(group_by="model").json()
            assert body["startup_joules"] == 360.0
            (row,) = body["startup"]
            assert row["device"] == "cpu0" and row["ready_unix_s"] == started + 30.0 and row["method_kind"] == "estimated"
            # the requests' totals do not contain it
            assert body["data"][0]["joules"] == 2.8
            assert len(gw.ledger.startups()) == 1
            # window on the ready time; a model or API-key filter leaves it out (it belongs to neither)
            assert get(since=started + 31.0).json()["startup"] == []
            assert get(model="m").json()["startup"] == []
            assert get(device="cpu0").json()["startup_joules"] == 360.0

            metrics = client.get("/metrics").text
            assert f'wattlane_device_startup_energy_joules{{device="cpu0",kind="cpu",node="{NODE}"}} 360.0' in metrics
    finally:
        gw.close()


def test_a_summary_just_after_ready_shows_the_start_up_energy_as_not_final(tmp_path):
    """Regression: a summary asked for in the second after the ready time (the last start-up interval
    still inside the settle delay) used to report no start-up energy at all."""
    app, gw = build(tmp_path)
    started = time.time() - 20.0
    try:
        with TestClient(app) as client:
            get = lambda **p: client.get("/v1/energy/summary", headers=bearer("reader"), params=p)  # noqa: E731
            gw.device_snapshots = [agent_snapshot(False, 150.0, started, started + 19.5)]  # ready, not settled
            body = get().json()
            (row,) = body["startup"]
            assert row["settled"] is False and row["joules"] == 150.0 and body["startup_joules"] == 150.0
            assert row["method_kind"] == "estimated" and gw.ledger.startups() == []  # not final: not stored
            assert get(since=started + 19.6).json()["startup"] == [] and get(model="m").json()["startup"] == []

            gw.device_snapshots = [agent_snapshot(True, 151.0, started, started + 19.5)]
            (row,) = get().json()["startup"]
            assert row["settled"] is True and row["joules"] == 151.0 and len(gw.ledger.startups()) == 1
    finally:
        gw.close()

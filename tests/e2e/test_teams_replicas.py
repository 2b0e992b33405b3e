"""Two gateway replicas (two processes) on the served simulated fleet: each request's ledger row written once
and complete /metrics from either replica; teams: keys made and revoked with the CLI while the server runs, a
budget that holds across both replicas, downgrade and 429 through Serve's proxy."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from scheduler.teams import budgets
from scheduler.teams.store import TeamsStore
from tests.support.served import served

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OPERATOR = "e2e-operator-key"


def chat(url: str, key: str, *, max_tokens: int = 16, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Explain GPUs briefly."}],
                            "max_tokens": max_tokens, **extra})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from scheduler.api.auth import hash_key

    tmp = tmp_path_factory.mktemp("teams")
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    cfg["routing"]["admission"] = "queue"
    cfg["server"]["gateway_replicas"] = 2
    cfg["server"]["api_keys"] = [{"id": "operator", "key_sha256": hash_key(OPERATOR), "role": "operator"}]
    cfg["teams"] = [{"name": "research", "budgets": [{"energy_joules": 1.0e9, "period": "day"}], "warn_at_fraction": 0.5,
                     "when_low": "downgrade", "downgrade_min_quality": 0.2}]
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    with served(cfg, tmp) as srv:
        yield srv, tmp / "config.yaml"


def cli(srv, config: Path, *args: str) -> str:
    env = {**os.environ, "WATTLANE_STATE_DIR": str(srv.state_dir)}
    r = subprocess.run([sys.executable, "-m", "scheduler", "keys", *args, "--config", str(config)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=30).text
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"{key} exported twice"
            out[key] = sample.value
    return out


def test_each_request_has_one_ledger_row_and_either_replicas_metrics_count_them_all(fleet):
    """First in the module: the server has answered nothing else yet, so its totals are these requests."""
    srv, config = fleet
    key = json.loads(cli(srv, config, "create", "--id", "rows", "--json"))["key"]
    time.sleep(0.6)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: chat(srv.url, key, max_tokens=4), range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    # each row written once, by the replica that served the request, into the one ledger
    rows = httpx.get(srv.url + "/v1/energy/requests", params={"limit": 100},
                     headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=30).json()["data"]
    assert sorted(r["request_id"] for r in rows) == sorted(a.json()["id"] for a in answers)
    assert sum(r["joules"] for r in rows) == pytest.approx(sum(a.json()["usage"]["energy"]["joules"] for a in answers))
    # both replicas counted requests (one metric file each), and whichever one a scrape reaches shows them
    # all, each device once
    files = list((srv.state_dir / "prometheus-multiproc").glob("counter_*.db"))
    assert len({f.stem.rsplit("_", 1)[1] for f in files}) == 2, files
    devices = sorted(d["device_id"] for d in httpx.get(srv.url + "/v1/devices", timeout=30, headers={
        "Authorization": f"Bearer {OPERATOR}"}).json()["data"])
    for _ in range(4):
        scraped = scrape(srv.url)
        assert sum(v for (name, _), v in scraped.items() if name == "wattlane_requests_total") == len(answers)
        assert sorted(dict(labels)["device"] for (name, labels) in scraped
                      if name == "wattlane_device_power_watts") == devices


def test_a_key_made_with_the_cli_works_at_once_and_its_revocation_reaches_both_replicas_within_a_second(fleet):
    srv, config = fleet
    key = json.loads(cli(srv, config, "create", "--id", "ci", "--json"))["key"]
    time.sleep(0.6)
    assert all(chat(srv.url, key, max_tokens=2).status_code == 200 for _ in range(4))
    cli(srv, config, "revoke", "ci")
    time.sleep(1.0)
    # Serve's proxy spreads requests over both gateway replicas: none of them still knows the key
    statuses = [httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                for _ in range(12)]
    assert statuses == [401] * 12


def test_a_budget_holds_across_two_gateway_replicas(fleet):
    srv, config = fleet
    warm = json.loads(cli(srv, config, "create", "--id", "warm", "--json"))["key"]
    time.sleep(0.6)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: chat(srv.url, warm), range(8)))  # these take the idle energy since start-up
        probes = list(pool.map(lambda _: chat(srv.url, warm), range(8)))
    probe_j = sorted(p.json()["usage"]["energy"]["joules"] for p in probes)
    budget_j = 3 * probe_j[len(probe_j) // 2]
    assert budget_j > 0, [p.json()["usage"]["energy"] for p in probes]
    key = json.loads(cli(srv, config, "create", "--id", "capped", "--budget", f"energy_joules={budget_j}/day",
                         "--json"))["key"]
    time.sleep(0.6)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: chat(srv.url, key), range(48)))
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(ok) + len(refused) == len(answers), [a.text for a in answers if a.status_code not in (200, 429)]
    assert refused, ([a.json()["usage"]["energy"]["joules"] for a in ok], budget_j, probe_j)
    assert all(a.json()["error"]["code"] == "budget_exceeded" and a.headers["Retry-After"] for a in refused)
    spent_j = [a.json()["usage"]["energy"]["joules"] for a in ok]
    # no double spending beyond one in-flight request per replica
    assert sum(spent_j) <= budget_j + 2 * max(spent_j), (sum(spent_j), budget_j, spent_j, probe_j)
    # the budget counts what the ledger counts (idle share included)
    rows = httpx.get(srv.url + "/v1/energy/requests", params={"api_key": "capped", "limit": 1000},
                     headers={"Authorization": f"Bearer {OPERATOR}"}).json()["data"]
    from scheduler.config import BudgetConfig
    from scheduler.teams.quotas import Subject, RateLimitsConfig

    budget = BudgetConfig(energy_joules=budget_j)
    use = budgets.use(TeamsStore(srv.state_dir).conn(), Subject("key:capped", "", RateLimitsConfig(), (budget,)),
                      budget, time.time())
    assert use.reserved == 0 and use.spent == pytest.approx(sum(r["joules"] for r in rows)) == pytest.approx(sum(spent_j))


def test_a_low_team_budget_downgrades_and_a_rate_limit_refuses_through_the_proxy(fleet):
    srv, config = fleet
    key = json.loads(cli(srv, config, "create", "--id", "researcher", "--team", "research", "--rpm", "3", "--json"))["key"]
    with TeamsStore(srv.state_dir).write() as conn:  # the team has spent 60% of its day
        budgets.add_spend(conn, "team:research", 0.6e9, 0.0, time.time(), measured=False)  # not one request
    time.sleep(0.6)
    r = chat(srv.url, key, model="auto", min_quality=0.99)
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["model"] == "llama-3.1-8b"
    assert r.json()["routing"]["reason"].startswith("budget downgrade (team 'research' energy_joules budget per day")
    assert "downgraded" in r.headers["x-wattlane-budget-warning"]
    statuses = [chat(srv.url, key, max_tokens=2) for _ in range(3)]
    last = statuses[-1]
    assert [s.status_code for s in statuses] == [200, 200, 429]
    assert "requests_per_minute=3" in last.json()["error"]["message"] and int(last.headers["Retry-After"]) >= 1

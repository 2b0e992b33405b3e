"""Teams over HTTP on the gateway's real app (in-process fleet, no Ray): keys made and revoked at run time,
429 in the OpenAI envelope with Retry-After, the budget warning header and the downgrade in routing.reason."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from scheduler.api.auth import hash_key
from scheduler.config import ApiKeyConfig, BudgetConfig, TeamConfig, load_config
from scheduler.datafiles import sim_fleet_config
from scheduler.teams import budgets
from scheduler.teams.guard import BUDGET_WARNING_HEADER
from tests.support.gateway_app import GatewayForTests, bearer

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "Prove Fermat's little theorem."}],
        "max_tokens": 4, "min_quality": 0.99}


@pytest.fixture
def client(tmp_path):
    config = load_config(sim_fleet_config())
    config.teams = [TeamConfig(name="research", budgets=[BudgetConfig(energy_joules=1e9)], warn_at_fraction=0.5,
                               when_low="downgrade", downgrade_min_quality=0.2)]
    gw = GatewayForTests(tmp_path, config)
    gw.config.server.api_keys.append(ApiKeyConfig(id="research-bot", key_sha256=hash_key("research-key"), team="research"))
    gw.serving.teams.state_cache_seconds = 0
    with TestClient(create_app(gw)) as c:
        yield c, gw
    gw.close()


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_a_key_created_at_run_time_is_limited_then_revoked(client):
    c, _ = client
    r = c.post("/v1/keys", json={"id": "ci-bot", "limits": {"requests_per_minute": 2}}, headers=bearer("operator"))
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    assert c.get("/v1/keys", headers=bearer("client")).status_code == 403  # operators only
    me = {"Authorization": f"Bearer {key}"}
    for _ in range(2):
        assert c.post("/v1/chat/completions", json=CHAT, headers=me).status_code == 200
    r = c.post("/v1/chat/completions", json=CHAT, headers=me)
    e = error_of(r, 429)
    assert e["type"] == "rate_limit_error" and e["code"] == "rate_limit_exceeded"
    assert "key 'ci-bot'" in e["message"] and "requests_per_minute=2" in e["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    listed = {k["id"]: k for k in c.get("/v1/keys", headers=bearer("operator")).json()["data"]}
    assert listed["ci-bot"]["status"] == "active" and "key" not in listed["ci-bot"]
    assert listed["research-bot"]["source"] == "config"
    assert c.delete("/v1/keys/ci-bot", headers=bearer("operator")).json()["status"] == "revoked"
    revoked_s = time.monotonic()
    while c.get("/v1/models", headers=me).status_code != 401:
        assert time.monotonic() - revoked_s < 1.0, "the revoked key still works after 1 s"
        time.sleep(0.02)


def test_a_key_works_the_moment_it_is_handed_out_and_a_rotated_one_stops_at_once(client):
    """The answer that shows a key promises it works: it was refused with 401 for up to half a second (the
    key cache's lifetime), on the very replica that created it."""
    c, _ = client
    first = c.post("/v1/keys", json={"id": "first"}, headers=bearer("operator")).json()["key"]
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {first}"}).status_code == 200  # keys just read
    second = c.post("/v1/keys", json={"id": "second"}, headers=bearer("operator")).json()["key"]
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    rotated = c.post("/v1/keys/second/rotate", headers=bearer("operator")).json()["key"]
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {rotated}"}).status_code == 200
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {second}"}).status_code == 401


@pytest.mark.parametrize("body, param", [
    ({"id": "inf-budget", "budgets": [{"energy_joules": "inf"}]}, "budgets"),  # was stored as the string "inf"
    ({"id": "inf-budget", "budgets": [{"gco2e": "Infinity"}]}, "budgets"),
    ({"id": ""}, "id"),  # was a key with a random id
])
def test_a_key_with_an_infinite_budget_or_an_empty_id_is_refused(client, body, param):
    c, _ = client
    e = error_of(c.post("/v1/keys", json=body, headers=bearer("operator")), 400)
    assert e["param"] == param, e
    listed = [k["id"] for k in c.get("/v1/keys", headers=bearer("operator")).json()["data"]]
    assert "inf-budget" not in listed and not any(i.startswith("key-") for i in listed)


@pytest.mark.parametrize("days", ["inf", "Infinity", 1e300])
def test_a_key_whose_expiry_is_no_date_is_refused(client, days):
    """inf was stored and then broke every listing; 1e300 was stored as a time no listing can show as a date."""
    c, _ = client
    e = error_of(c.post("/v1/keys", json={"id": "forever", "expires_in_days": days}, headers=bearer("operator")), 400)
    assert e["param"] == "expires_in_days" and "ends by 9999-12-31" in e["message"], e
    r = c.get("/v1/keys", headers=bearer("operator"))
    assert r.status_code == 200 and "forever" not in [k["id"] for k in r.json()["data"]]


def test_a_keys_limits_and_budgets_are_stored_as_validated(client):
    c, _ = client
    r = c.post("/v1/keys", json={"id": "typed", "limits": {"requests_per_minute": "5"},
                                 "budgets": [{"energy_joules": "1e6"}]}, headers=bearer("operator"))
    assert r.status_code == 200, r.text
    listed = {k["id"]: k for k in c.get("/v1/keys", headers=bearer("operator")).json()["data"]}["typed"]
    assert listed["limits"] == {"requests_per_minute": 5}
    assert listed["budgets"] == [{"energy_joules": 1e6, "period": "day"}]


def test_a_low_team_budget_downgrades_then_a_spent_one_refuses(client):
    c, gw = client
    team_key = {"Authorization": "Bearer research-key"}
    r = c.post("/v1/chat/completions", json=CHAT, headers=team_key)
    assert r.status_code == 200 and r.json()["model"] == "llama-3.1-70b" and BUDGET_WARNING_HEADER not in r.headers
    with gw.teams_store.write() as conn:
        budgets.add_spend(conn, "team:research", 0.7e9, 0.0, time.time(), measured=False)
    r = c.post("/v1/chat/completions", json=CHAT, headers=team_key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == body["routing"]["model"] == "llama-3.1-8b"
    assert body["routing"]["reason"].startswith("budget downgrade (team 'research' energy_joules budget per day: 70% used")
    assert "70% used" in r.headers[BUDGET_WARNING_HEADER] and r.headers[BUDGET_WARNING_HEADER].endswith("downgraded")
    gauge = gw.metrics.budget_used.labels(scope="team", name="research", kind="energy")._value.get()
    assert 0.7 <= gauge < 0.71  # wattlane_budget_used_ratio, for the dashboard's budget panel
    with gw.teams_store.write() as conn:
        budgets.add_spend(conn, "team:research", 0.3e9, 0.0, time.time(), measured=False)
    r = c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=team_key)
    e = error_of(r, 429)
    assert e["code"] == "budget_exceeded" and "resets at the start of the next day" in e["message"]
    assert int(r.headers["Retry-After"]) > 0
    # other callers are not limited by the team's budget
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("client")).status_code == 200

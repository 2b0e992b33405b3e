"""HTTP-level errors of the real app: unknown node 404, body limit on bytes received, 405 Allow, empty body."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.gateway_app import NODE, bearer, build, power_node


@pytest.fixture
def client(tmp_path):
    app, gw = build(tmp_path, power_nodes={NODE: power_node(tmp_path, NODE, ["gpu0", "gpu1"]),
                                           "node-b": power_node(tmp_path, "node-b", ["gpu2"])})
    with TestClient(app) as c:
        yield c
    gw.close()


def envelope(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


# --- ?node= on the operator routes ---------------------------------------------------------------

@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/devices", None),
    ("GET", "/v1/power/policy", None),
    ("PUT", "/v1/power/policy", {"mode": "recommend"}),
    ("GET", "/v1/power/audit", None),
    ("PUT", "/v1/devices/gpu0/power-limit", {"watts": 300}),
    ("DELETE", "/v1/devices/gpu0/power-limit", None),
    ("PUT", "/v1/devices/gpu0/locked-clocks", {"min_mhz": 500, "max_mhz": 900}),
    ("DELETE", "/v1/devices/gpu0/locked-clocks", None),
])
def test_unknown_node_is_404_naming_the_nodes(client, method, path, body):
    r = client.request(method, path, params={"node": "nope"}, json=body, headers=bearer("operator"))
    err = envelope(r, 404, "node_not_found")
    assert err["param"] == "node"
    assert "'nope'" in err["message"] and NODE in err["message"]


def test_node_filters_devices_and_scopes_device_routes(client):
    r = client.get("/v1/devices", params={"node": "node-b"}, headers=bearer("operator"))
    assert r.status_code == 200, r.text
    assert [d["device_id"] for d in r.json()["data"]] == ["gpu2"]
    # gpu0 exists, but not on node-b
    r = client.put("/v1/devices/gpu0/power-limit", params={"node": "node-b"}, json={"watts": 300},
                   headers=bearer("operator"))
    envelope(r, 404, "device_not_found")
    r = client.put("/v1/devices/gpu0/power-limit", params={"node": NODE}, json={"watts": 300},
                   headers=bearer("operator"))
    assert r.status_code == 200, r.text
    assert r.json()["device_id"] == "gpu0" and r.json()["outcome"] == "recommended"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/devices/gpu0/power-limit", {"watts": 5000}, "watts"),
    ("/v1/devices/gpu0/power-limit", {"watts": "inf"}, "watts"),
    ("/v1/devices/gpu0/locked-clocks", {"min_mhz": 1500, "max_mhz": 900}, "min_mhz"),
    ("/v1/devices/gpu0/locked-clocks", {"min_mhz": 1, "max_mhz": 900}, "min_mhz"),
    ("/v1/devices/gpu0/locked-clocks", {"min_mhz": 900, "max_mhz": 99999}, "max_mhz"),
])
def test_a_setting_outside_the_devices_range_is_400_naming_its_field(client, path, body, param):
    r = client.put(path, json=body, headers=bearer("operator"))
    err = envelope(r, 400, "invalid_setting")
    assert err["param"] == param, err
    assert err["message"].startswith("gpu0: ") or "not a number" in err["message"], err


def test_known_node_policy_is_that_nodes(client):
    r = client.get("/v1/power/policy", params={"node": "node-b"}, headers=bearer("operator"))
    assert r.status_code == 200, r.text
    assert r.json()["node"] == "node-b"


# --- body size limit -----------------------------------------------------------------------------

def _chunked(total_bytes: int, piece: int = 64 * 1024):
    yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
    sent = 0
    while sent < total_bytes:
        yield b"x" * piece
        sent += piece
    yield b'"}]}'


def test_chunked_body_over_the_limit_is_413(client):
    limit = client.app.state.gateway.config.server.max_body_bytes
    r = client.post("/v1/chat/completions", content=_chunked(limit + 1), headers={**bearer("client"),
                    "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    envelope(r, 413, "body_too_large")


def test_chunked_body_under_the_limit_is_served(client):
    r = client.post("/v1/chat/completions", content=_chunked(1000, piece=100), headers={**bearer("client"),
                    "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_declared_length_over_the_limit_is_413(client):
    limit = client.app.state.gateway.config.server.max_body_bytes
    r = client.post("/v1/chat/completions", content=b"x" * (limit + 1), headers=bearer("client"))
    envelope(r, 413, "body_too_large")


# --- 405 and empty bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/v1/chat/completions", {"POST"}),
    ("POST", "/v1/devices/gpu0/power-limit", {"PUT", "DELETE"}),
    ("PATCH", "/v1/power/policy", {"GET", "PUT"}),
    ("DELETE", "/v1/models", {"GET"}),
    ("HEAD", "/v1/models", {"GET"}),  # FastAPI routes answer only the methods they declare
])
def test_405_names_every_allowed_method(client, method, path, allowed):
    r = client.request(method, path, headers=bearer("operator"))
    if method == "HEAD":  # no body to carry the envelope
        assert r.status_code == 405
    else:
        envelope(r, 405, "method_not_allowed")
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/route/explain"])
def test_empty_body_says_a_body_is_required(client, path):
    for content in (b"", None):
        r = client.post(path, content=content, headers=bearer("operator"))
        err = envelope(r, 400)
        assert err["message"] == "request body is required (JSON object)"
        assert "None" not in err["message"]


@pytest.mark.parametrize("content", [b"[]", b'"hello"', b"42"])
def test_non_object_body_is_400_saying_so(client, content):
    r = client.post("/v1/chat/completions", content=content,
                    headers={**bearer("client"), "Content-Type": "application/json"})
    assert envelope(r, 400)["message"] == "request body must be a JSON object"


@pytest.mark.parametrize("content", [b"\xc7\x8f\xea\x82EM\xdb", b"{not json"])
def test_a_body_that_is_not_json_text_is_400_saying_so(client, content):
    """Bytes that are not UTF-8 got FastAPI's 'There was an error parsing the body' with no code (fuzz)."""
    r = client.post("/v1/chat/completions", content=content,
                    headers={**bearer("client"), "Content-Type": "application/json"})
    err = envelope(r, 400, "invalid_value")
    assert err["message"].startswith("request body is not valid JSON")


@pytest.mark.parametrize("method, path, body, param", [
    ("PUT", "/v1/devices/gpu0/power-limit", {"watts": 300, "reason": "x" * 501}, "reason"),
    ("PUT", "/v1/devices/gpu0/locked-clocks", {"min_mhz": 500, "max_mhz": 900, "reason": "x" * 501}, "reason"),
    ("PUT", "/v1/power/policy", {"mode": "recommend", "reason": "x" * 501}, "reason"),
    ("PUT", "/v1/power/policy", {"group": "g" * 129, "policy": "none", "devices": ["gpu0"]}, "group"),
    ("PUT", "/v1/power/policy", {"groups": [{"name": "", "policy": "none", "devices": ["gpu0"]}]}, "groups.0.name"),
])
def test_an_oversized_reason_or_group_name_is_400_and_nothing_is_audited(client, method, path, body, param):
    before = client.get("/v1/power/audit", headers=bearer("operator")).json()["data"]
    r = client.request(method, path, json=body, headers=bearer("operator"))
    err = envelope(r, 400)
    assert err["param"] == param, err
    after = client.get("/v1/power/audit", headers=bearer("operator")).json()["data"]
    assert after == before


def test_a_reason_at_the_limit_reaches_the_audit_log_whole(client):
    reason = ("planned maintenance on rack 4; " * 17)[:500]
    r = client.put("/v1/devices/gpu0/power-limit", json={"watts": 300, "reason": reason}, headers=bearer("operator"))
    assert r.status_code == 200, r.text
    rows = client.get("/v1/power/audit", headers=bearer("operator")).json()["data"]
    assert [x["reason"] for x in rows if x["device_id"] == "gpu0"] == [reason]


@pytest.mark.parametrize("path, role", [("/v1/energy/requests", "reader"), ("/v1/energy/summary", "reader"),
                                        ("/v1/energy/export.csv", "reader"), ("/v1/power/audit", "operator")])
@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_a_time_that_is_not_finite_is_400_naming_it(client, path, role, value):
    """since=nan was answered 200 with nothing in it: SQLite binds NaN as NULL, so the window matched no row."""
    e = envelope(client.get(path, params={"since": value}, headers=bearer(role)), 400)
    assert e["param"] == "since", e

"""/openapi.json says what every route really returns: bodies, error statuses, and nothing undocumented."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest
from fastapi.testclient import TestClient

from scheduler.api.protocol import ChatCompletionResponse
from scheduler.energy.ledger import LedgerRow
from tests.support.gateway_app import NODE, bearer, build, power_node

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
PUBLIC = {"/healthz", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openapi")
    app, gw = build(tmp, power_nodes={NODE: power_node(tmp, NODE, ["gpu0", "gpu1"])})
    for i, method in enumerate(["cpu-estimate", "simulated", None]):
        gw.ledger.record(LedgerRow(request_id=f"seed-{i}", time_unix_s=1_700_000_000.0 + i, model="m", device="cpu0",
                                   node=NODE, status="ok", joules=None if method is None else 2.0,
                                   energy_method=method, gco2e=None if method is None else 0.1)).result(timeout=5)
    with TestClient(app) as client:
        yield client, client.get("/openapi.json").json()
    gw.close()


def operations(doc):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method.upper(), op


def strict_schema(doc, schema: dict) -> dict:
    """The schema with the document's components, where every object with properties allows no others."""
    components = copy.deepcopy(doc["components"])

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") in (None, True):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(components)
    return {**copy.deepcopy(schema), "components": components}


def check(doc, path: str, method: str, r) -> None:
    """The response's status is documented and its body matches the documented schema exactly."""
    op = doc["paths"][path][method.lower()]
    assert str(r.status_code) in op["responses"], f"{method} {path}: undocumented {r.status_code}: {r.text[:200]}"
    content = op["responses"][str(r.status_code)].get("content", {})
    media = r.headers["content-type"].split(";")[0]
    assert media in content, f"{method} {path} {r.status_code}: {media} is not among {list(content)}"
    if media == "application/json":
        jsonschema.validate(r.json(), strict_schema(doc, content[media]["schema"]),
                            cls=jsonschema.Draft202012Validator)


# --- the document itself ---------------------------------------------------------------------------

def test_every_operation_documents_a_non_empty_200(served):
    _, doc = served
    ops = list(operations(doc))
    assert len(ops) >= 19
    for path, method, op in ops:
        ok = op["responses"].get("200")
        assert ok and ok.get("content"), f"{method} {path}: no 200 body"
        for media, body in ok["content"].items():
            assert body.get("schema") not in (None, {}), f"{method} {path} {media}: empty schema"


def test_every_operation_documents_its_error_statuses_in_the_envelope(served):
    _, doc = served
    for path, method, op in operations(doc):
        statuses = set(op["responses"])
        assert "422" not in statuses, f"{method} {path}: validation errors are 400 here, not 422"
        assert "413" in statuses, f"{method} {path}"
        if op.get("parameters") or op.get("requestBody"):
            assert "400" in statuses, f"{method} {path}"
        if path not in PUBLIC:
            assert {"401", "403"} <= statuses, f"{method} {path}"
        if path.startswith("/v1/devices/") or "node" in {p["name"] for p in op.get("parameters", [])}:
            assert "404" in statuses, f"{method} {path}"
        for status in statuses - {"200"}:
            if path == "/readyz" and status == "503":
                continue
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, f"{method} {path} {status}"
    assert set(doc["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    for name in ("HTTPValidationError", "ValidationError"):
        assert name not in doc["components"]["schemas"]


def test_inference_documents_energy_carbon_and_routing(served):
    _, doc = served
    schemas = doc["components"]["schemas"]
    assert set(schemas["Usage"]["properties"]) >= {"energy", "carbon"}
    assert set(schemas["EnergyUsage"]["properties"]) == {"joules", "dynamic_joules", "idle_joules", "method", "scope",
                                                         "device"}
    assert set(schemas["ChatCompletionResponse"]["properties"]) >= {"id", "usage", "routing"}
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "Retry-After" in op["responses"]["503"]["headers"]


# --- real responses against it ---------------------------------------------------------------------

def test_every_operation_answers_as_documented(served):
    client, doc = served
    calls = [
        ("POST", "/v1/chat/completions", "client", {"json": CHAT}),
        ("POST", "/v1/completions", "client", {"json": {"model": "auto", "prompt": "Hi", "max_tokens": 4}}),
        ("POST", "/v1/route/explain", "client", {"json": CHAT}),
        ("POST", "/v1/route/explain", "client", {"json": {**CHAT, "model": "no-such-model"}}),
        ("GET", "/v1/models", "client", {}),
        ("GET", "/healthz", None, {}),
        ("GET", "/readyz", None, {}),
        ("GET", "/v1/energy/requests", "reader", {}),
        ("GET", "/v1/energy/summary", "reader", {"params": {"group_by": "model"}}),
        ("GET", "/v1/energy/summary", "reader", {"params": {"group_by": "hour"}}),
        ("GET", "/v1/energy/methods", "reader", {"params": {"group_by": "api_key"}}),
        ("GET", "/v1/energy/export.csv", "reader", {}),
        ("GET", "/metrics", None, {}),
        ("GET", "/v1/devices", "operator", {}),
        ("PUT", "/v1/devices/{device_id}/power-limit", "operator", {"json": {"watts": 400}}),
        ("DELETE", "/v1/devices/{device_id}/power-limit", "operator", {}),
        ("PUT", "/v1/devices/{device_id}/locked-clocks", "operator", {"json": {"min_mhz": 800, "max_mhz": 1400}}),
        ("DELETE", "/v1/devices/{device_id}/locked-clocks", "operator", {}),
        ("GET", "/v1/power/policy", "operator", {}),
        ("PUT", "/v1/power/policy", "operator", {"json": {"mode": "recommend"}}),
        ("GET", "/v1/power/audit", "operator", {}),
        ("POST", "/v1/keys", "operator", {"json": {"id": "openapi-key", "limits": {"requests_per_minute": 5},
                                                   "budgets": [{"energy_joules": 1000, "period": "day"}]}}),
        ("GET", "/v1/keys", "operator", {}),
        ("POST", "/v1/keys/{key_id}/rotate", "operator", {}),
        ("DELETE", "/v1/keys/{key_id}", "operator", {}),
        ("GET", "/v1/teams", "reader", {}),
    ]
    seen = set()
    for method, path, role, kw in calls:
        url = path.replace("{device_id}", "gpu0").replace("{key_id}", "openapi-key")
        r = client.request(method, url, headers=bearer(role) if role else {}, **kw)
        assert r.status_code == 200, f"{method} {path}: {r.text[:300]}"
        check(doc, path, method, r)
        seen.add((path, method))
    documented = {(p, m) for p, m, _ in operations(doc)}
    assert documented == seen, f"operations never exercised: {documented - seen}"


def test_errors_answer_as_documented(served):
    client, doc = served
    client.app.state.gateway.ready = False
    try:
        check(doc, "/readyz", "GET", client.get("/readyz"))
    finally:
        client.app.state.gateway.ready = True
    for method, url, role, kw, status in [
        ("POST", "/v1/chat/completions", None, {"json": CHAT}, 401),
        ("POST", "/v1/chat/completions", "reader", {"json": CHAT}, 403),
        ("POST", "/v1/chat/completions", "client", {"content": b""}, 400),
        ("POST", "/v1/chat/completions", "client", {"json": {**CHAT, "model": "gpt-17"}}, 404),
        ("GET", "/v1/energy/summary", "reader", {"params": {"group_by": "colour"}}, 400),
        ("GET", "/v1/energy/requests", "reader", {"params": {"since": "yesterday"}}, 400),
        ("PUT", "/v1/devices/gpu0/power-limit", "operator", {"json": {"watts": -1}}, 400),
        ("PUT", "/v1/devices/nope/power-limit", "operator", {"json": {"watts": 5}}, 404),
        ("PUT", "/v1/devices/gpu0/power-limit", "operator", {"json": {"watts": 5}, "params": {"node": "x"}}, 404),
        ("PUT", "/v1/power/policy", "operator", {"json": {"mode": "turbo"}}, 400),
        ("POST", "/v1/keys", "operator", {"json": {"limits": {"requests_per_minute": 0}}}, 400),
        ("POST", "/v1/keys", "operator", {"json": {"id": "client-key"}}, 409),
        ("DELETE", "/v1/keys/nobody", "operator", {}, 404),
    ]:
        r = client.request(method, url, headers=bearer(role) if role else {}, **kw)
        assert r.status_code == status, f"{method} {url}: {r.status_code} {r.text[:300]}"
        path = re.sub(r"^/v1/devices/[^/]+/", "/v1/devices/{device_id}/", url)
        check(doc, re.sub(r"^/v1/keys/[^/]+$", "/v1/keys/{key_id}", path), method, r)


def test_streamed_chunks_are_documented_as_event_stream(served):
    client, doc = served
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer("client")) as r:
        check(doc, "/v1/chat/completions", "POST", r)
        assert r.headers["content-type"].startswith("text/event-stream")


def test_documented_chat_response_is_what_the_route_builds(served):
    client, _ = served
    body = client.post("/v1/chat/completions", json=CHAT, headers=bearer("client")).json()
    # the model validates the real answer, energy and carbon included
    parsed = ChatCompletionResponse.model_validate(body)
    assert parsed.usage.energy is not None and parsed.usage.carbon is not None
    assert json.loads(parsed.model_dump_json(exclude_unset=True)) == body


def test_policy_body_is_documented_as_the_governor_reads_it(served):
    client, doc = served
    body = doc["paths"]["/v1/power/policy"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert schema["additionalProperties"] is False
    assert {"mode", "groups", "reason"} <= set(schema["properties"])
    # what the document allows, the governor takes; what it forbids is a 400
    r = client.put("/v1/power/policy", json={"groups": [{"name": "rack", "policy": "static", "options": {"power_limit_watts": 500}}]},
                   headers=bearer("operator"))
    assert r.status_code == 200, r.text
    assert [g["policy"] for g in r.json()["groups"]] == ["static"]
    r = client.put("/v1/power/policy", json={"groups": [{"name": "rack", "policy": "warp"}]}, headers=bearer("operator"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "groups.0.policy"


@pytest.mark.parametrize("since", ["1700000000", "1.7e9", "2023-11-14T22:13:20Z", "2023-11-14t22:13:20.5z",
                                   "2023-11-14T23:13:20+01:00"])
def test_report_times_documented_as_number_or_date_time_are_accepted(served, since):
    client, doc = served
    param = next(p for p in doc["paths"]["/v1/energy/requests"]["get"]["parameters"] if p["name"] == "since")
    jsonschema.validate(float(since) if since[0:4].isdigit() and "-" not in since else since, param["schema"],
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    r = client.get("/v1/energy/requests", params={"since": since}, headers=bearer("reader"))
    assert r.status_code == 200, r.text

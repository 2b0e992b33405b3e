"""Through Ray Serve's real HTTP proxy: request ids, chunked bodies over the limit, and /openapi.json."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from scheduler.api.request_ids import SAFE_REQUEST_ID

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
FORGED = "fake -- PUT /v1/power/policy 200"


def ledger_rows(server, rid: str) -> list[dict]:
    r = httpx.get(server.url + "/v1/energy/requests", params={"id": rid}, headers=server.headers("reader"), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def one_id(r: httpx.Response) -> str:
    values = r.headers.get_list("x-request-id")
    assert len(values) == 1, values
    return values[0]


def chat(server, request_id: bytes | None = None, **extra) -> httpx.Response:
    headers = server.headers("client")
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **extra}, headers=headers, timeout=120)


def test_generated_id_is_body_header_and_ledger(server):
    r = chat(server)
    assert r.status_code == 200, r.text
    rid = one_id(r)
    assert rid.startswith("chatcmpl-"), rid  # ours, not the proxy's own uuid
    assert r.json()["id"] == rid
    assert [row["request_id"] for row in ledger_rows(server, rid)] == [rid]


def test_safe_client_id_is_kept_through_the_proxy(server):
    rid = "it-client.7:retry-1"
    r = chat(server, rid.encode())
    assert r.status_code == 200, r.text
    assert one_id(r) == rid and r.json()["id"] == rid
    assert len(ledger_rows(server, rid)) == 1


@pytest.mark.parametrize("sent", [b"x" * 60_000, FORGED.encode(), b"a" * 65], ids=["60KB", "log-forgery", "65-chars"])
def test_unsafe_client_id_is_replaced_and_never_logged(server, sent):
    r = chat(server, sent)
    assert r.status_code == 200, r.text
    rid = one_id(r)
    assert SAFE_REQUEST_ID.fullmatch(rid) and rid.encode() != sent
    assert r.json()["id"] == rid
    assert len(ledger_rows(server, rid)) == 1
    # Serve's proxy logs each request with its id: the replacement, never what the client sent
    logs = list((server.state_dir / "ray").resolve().glob("session_*/logs/serve/*.log"))
    assert logs, "no Serve logs found"
    text = b"".join(p.read_bytes() for p in logs)
    assert rid.encode() in text
    assert sent not in text


def test_stream_header_and_every_chunk_share_the_id(server):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    headers = {**server.headers("client"), "X-Request-Id": FORGED}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        rid = one_id(r)
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {rid}
    assert rid.startswith("chatcmpl-")
    assert len(ledger_rows(server, rid)) == 1


def test_chunked_body_over_the_limit_is_413(server):
    limit = server.config.server.max_body_bytes

    def body():
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=body(), timeout=60,
                   headers={**server.headers("client"), "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "body_too_large"


def test_served_openapi_documents_what_the_server_answers(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert "422" not in json.dumps({p: {m: list(o["responses"]) for m, o in ops.items()}
                                    for p, ops in doc["paths"].items()})
    r = chat(server)
    schema = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(r.json(), {**schema, "components": doc["components"]}, cls=jsonschema.Draft202012Validator)
    r = httpx.get(server.url + "/v1/devices", headers=server.headers("operator"), timeout=30)
    schema = doc["paths"]["/v1/devices"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(r.json(), {**schema, "components": doc["components"]}, cls=jsonschema.Draft202012Validator)
    documented = set(doc["components"]["schemas"]["DeviceOut"]["properties"])
    for device in r.json()["data"]:
        assert set(device) <= documented, set(device) - documented
    r = httpx.put(server.url + "/v1/devices/cpu0/power-limit", params={"node": "nope"}, json={"watts": 10},
                  headers=server.headers("operator"), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "node_not_found"
    r = httpx.get(server.url + "/v1/chat/completions", headers=server.headers("client"), timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"

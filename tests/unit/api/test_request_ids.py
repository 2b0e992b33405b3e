"""One id per request, the same in body, X-Request-Id and ledger; a client's id only when short and printable."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from scheduler.api.request_ids import SAFE_REQUEST_ID, RequestIdMiddleware, serve_proxy_middlewares
from tests.support.gateway_app import bearer

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
#: what a hostile client sent: huge, a forged log line, too long by one, a character outside the set
UNSAFE = ["x" * 60_000, "fake -- PUT /v1/power/policy 200", "a" * 65, "id/with/slash", "caf\u00e9"]


def ledger_rows(client, rid: str) -> list[dict]:
    r = client.get("/v1/energy/requests", params={"id": rid}, headers=bearer("reader"))
    assert r.status_code == 200, r.text
    return r.json()["data"]


def one_request_id_header(r) -> str:
    values = r.headers.get_list("x-request-id")
    assert len(values) == 1, values
    return values[0]


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", {"model": "auto", "prompt": "Hi", "max_tokens": 4})])
def test_generated_id_is_body_header_and_ledger(client, path, body):
    r = client.post(path, json=body, headers=bearer("client"))
    assert r.status_code == 200, r.text
    rid = one_request_id_header(r)
    assert SAFE_REQUEST_ID.fullmatch(rid)
    assert r.json()["id"] == rid
    rows = ledger_rows(client, rid)
    assert [row["request_id"] for row in rows] == [rid]


def test_safe_client_id_is_kept_everywhere(client):
    rid = "client-42.retry:1_A"
    r = client.post("/v1/chat/completions", json=CHAT, headers={**bearer("client"), "X-Request-Id": rid})
    assert one_request_id_header(r) == rid
    assert r.json()["id"] == rid
    assert len(ledger_rows(client, rid)) == 1


@pytest.mark.parametrize("unsafe", UNSAFE, ids=["60KB", "log-forgery", "65-chars", "slash", "non-ascii"])
def test_unsafe_client_id_is_replaced(client, unsafe):
    r = client.post("/v1/chat/completions", json=CHAT,
                    headers={**bearer("client"), "X-Request-Id": unsafe.encode("utf-8")})
    assert r.status_code == 200, r.text
    rid = one_request_id_header(r)
    assert rid != unsafe and SAFE_REQUEST_ID.fullmatch(rid) and rid.startswith("chatcmpl-")
    assert r.json()["id"] == rid
    assert len(ledger_rows(client, rid)) == 1


def test_stream_header_and_every_chunk_share_the_id(client):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body,
                       headers={**bearer("client"), "X-Request-Id": "fake -- PUT /v1/power/policy 200"}) as r:
        assert r.status_code == 200
        rid = one_request_id_header(r)
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3
    assert {c["id"] for c in chunks} == {rid}
    assert len(ledger_rows(client, rid)) == 1


def test_errors_carry_the_id_too(client):
    r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "my-id-1"})
    assert r.status_code == 401
    assert one_request_id_header(r) == "my-id-1"
    r = client.post("/v1/chat/completions", content=b"x" * 2_000_000, headers={"X-Request-Id": "x" * 100})
    assert r.status_code == 413
    assert SAFE_REQUEST_ID.fullmatch(one_request_id_header(r))


def _proxy_stack(seen: list[str]):
    """Ray Serve's proxy composition: its RequestIdMiddleware first, then the callback's middlewares outside."""
    from ray.serve._private.http_util import _apply_middlewares

    async def endpoint(request):
        seen.append(request.headers["x-request-id"])
        # the app behind the proxy sets the header as well
        rid = request.headers["x-request-id"]
        return JSONResponse({"id": rid}, headers={"X-Request-Id": rid})

    return _apply_middlewares(Starlette(routes=[Route("/", endpoint)]), serve_proxy_middlewares())


@pytest.mark.parametrize("sent", [None, "ok-id-7", *UNSAFE[:3]])
def test_behind_serves_proxy_middleware_one_safe_id_reaches_app_and_client(sent):
    seen: list[str] = []
    # no lifespan: Serve's own middleware expects HTTP scopes only, as its proxy sends
    r = TestClient(_proxy_stack(seen)).get("/", headers={"X-Request-Id": sent} if sent is not None else {})
    rid = one_request_id_header(r)
    assert seen == [rid] and r.json()["id"] == rid
    assert SAFE_REQUEST_ID.fullmatch(rid)
    if sent == "ok-id-7":
        assert rid == sent


def test_middleware_leaves_non_http_scopes_alone():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope)

    import asyncio

    scope = {"type": "lifespan"}
    asyncio.run(RequestIdMiddleware(app)(scope, None, None))
    assert calls == [scope]


def test_two_requests_under_one_client_id_are_charged_their_own_joules(client):
    """A client may send one X-Request-Id twice (a retry of its own, a fixed id per session): each request's
    work is its own at the node agent, so each answer and row carry that request's joules. They shared the
    agent's accounting under the client's id: the second answer got the first's joules, and the ledger
    counted them twice."""
    headers = {**bearer("client"), "X-Request-Id": "my-fixed-id"}
    short = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=headers)
    long = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 40}, headers=headers)
    assert short.status_code == long.status_code == 200, (short.text, long.text)
    e_short, e_long = short.json()["usage"]["energy"]["joules"], long.json()["usage"]["energy"]["joules"]
    assert e_long > e_short, "40 tokens cost more than 2"
    rows = ledger_rows(client, "my-fixed-id")
    assert sorted(r["joules"] for r in rows) == pytest.approx(sorted([e_short, e_long]))

"""A request the client abandons still ends in the ledger with the energy of the work done, its
generation stops, and the device's running count comes back down."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT_MODEL = "smollm2-135m-instruct"


def _ledger_row(server, request_id: str, timeout_s: float = 30.0) -> dict | None:
    deadline = time.time() + timeout_s
    with server.client("reader") as c:
        while time.time() < deadline:
            rows = c.get("/v1/energy/requests", params={"limit": 1000}).json()["data"]
            found = [r for r in rows if r["request_id"] == request_id]
            if found:
                return found[0]
            time.sleep(0.5)
    return None


def _running_requests(server) -> int:
    with server.client("operator") as c:
        return sum(int(d.get("running_requests") or 0) for d in c.get("/v1/devices").json()["data"])


def test_client_disconnect_mid_stream_is_recorded_as_cancelled_with_its_energy(server):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    request_id = None
    pieces = 0
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                request_id = chunk["id"]
                pieces += 1
                if pieces >= 6:
                    break  # leave mid-stream: the connection closes here
    assert request_id is not None
    row = _ledger_row(server, request_id)
    assert row is not None, "an abandoned request must still have a ledger row"
    assert row["status"] == "cancelled"
    assert 0 < row["completion_tokens"] < 400, "the generation must stop early"
    assert row["joules"] is not None and row["joules"] > 0
    deadline = time.time() + 15
    while _running_requests(server) and time.time() < deadline:
        time.sleep(0.5)
    assert _running_requests(server) == 0


def test_a_non_streaming_request_abandoned_before_its_start_reached_the_gateway_is_charged(server):
    """A non-streaming request is one unary call whose start comes back with its end (api/serving.py): a
    client that leaves before then leaves the gateway without the request's node, and every agent is asked.

    The client must leave after the replica started the request but before its start came back: on a busy
    machine, 40 ms after sending can still be before the replica had it (then no work was done, and the row
    says so). So it tries a few moments, and one of them must land on work done and be charged for it."""
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "temperature": 0}
    charged = []
    for leave_after_s in (0.04, 0.06, 0.08):
        request_id = f"chatcmpl-left-early-{time.time_ns()}"
        headers = {**server.headers(), "X-Request-Id": request_id}
        with httpx.Client(base_url=server.url, headers=headers,
                          timeout=httpx.Timeout(30.0, read=leave_after_s)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json=body)  # the client gives up: the connection closes
        row = _ledger_row(server, request_id)
        assert row is not None, "an abandoned request must still have a ledger row"
        assert row["status"] == "cancelled"
        assert row["completion_tokens"] < 400, "the generation must stop early"
        if row["joules"] is None:  # only a request that never reached the engine has no energy
            assert row["completion_tokens"] == 0, row
        else:
            assert row["joules"] > 0, row
            charged.append(row)
        deadline = time.time() + 15
        while _running_requests(server) and time.time() < deadline:
            time.sleep(0.5)
        assert _running_requests(server) == 0
        if charged:
            break
    assert charged, "no try left after the replica had started the request"

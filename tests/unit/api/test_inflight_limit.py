"""The gateway's front-door limit: past max_inflight inference requests, 503 at once, before the body is read."""

from __future__ import annotations

import asyncio
import json

from scheduler.api.app import InflightLimit


def test_past_the_limit_inference_is_refused_at_once_and_the_rest_passes() -> None:
    release = asyncio.Event()
    bodies_read: list[str] = []

    async def slow_app(scope, receive, send):
        await receive()
        bodies_read.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limit = InflightLimit(slow_app, max_inflight=2)

    async def call(path: str) -> tuple[int, dict, bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        await limit({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], dict(start["headers"]), body

    async def main():
        held = [asyncio.create_task(call("/v1/chat/completions")) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, headers, body = await asyncio.wait_for(call("/v1/completions"), 1.0)  # refused without waiting
        other = asyncio.create_task(call("/v1/energy/summary"))  # reports are never counted or refused
        await asyncio.sleep(0.01)
        release.set()
        done = await asyncio.gather(*held, other)
        after = await call("/v1/chat/completions")  # the slots came back
        return status, headers, body, [d[0] for d in done], after[0]

    status, headers, body, held_statuses, after = asyncio.run(main())
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["error"]["code"] == "no_capacity"
    assert held_statuses == [200, 200, 200] and after == 200
    assert bodies_read.count("/v1/completions") == 0  # refused before its body was read
    assert limit.inflight == 0


def test_no_limit_configured_counts_nothing() -> None:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = InflightLimit(app, max_inflight=None)

    async def main():
        async def send(_m):
            pass

        await asyncio.gather(*(limit({"type": "http", "path": "/v1/completions"}, None, send) for _ in range(50)))

    asyncio.run(main())
    assert limit.inflight == 0

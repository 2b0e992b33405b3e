"""A small OpenAI-compatible server that misbehaves on request, for the upstream engine's fault tests.

The request's `model` picks the behaviour (see MODES): a good stream, or one of the ways real servers
fail (bad JSON, broken SSE, a stall before the first token, with or without the response's headers, or
mid-stream, a 500, another model's name, a connection cut mid-stream, a 400, a response held open after
[DONE]).
It runs in-process on uvicorn in a thread, on a free port of 127.0.0.1; no network beyond loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODES = ("ok", "ok-nousage", "ok-no-prompt-usage", "bad-json", "broken-sse", "truncated", "stall", "stall-mid",
         "http500", "wrong-model", "no-such-model", "too-long", "error-chunk", "held-after-done", "stall-headers")
WORDS = ["Hello", " from", " the", " fake", " upstream"]


def _chunk(model: str, text: str | None, finish: str | None = None, chat: bool = True) -> str:
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text is not None else {}
    else:
        choice["text"] = text or ""
    return "data: " + json.dumps({"id": "x", "object": "chunk", "model": model, "choices": [choice]}) + "\n\n"


class FakeUpstream:
    """Serves /v1/chat/completions, /v1/completions, /health and /v1/models on 127.0.0.1:<port>."""

    def __init__(self, stall_seconds: float = 30.0):
        self.stall_seconds = stall_seconds
        self.healthy = True
        #: what /metrics answers (Prometheus text); None: 404, as a server without metrics
        self.metrics_text: str | None = None
        self.requests: Counter[str] = Counter()
        #: the client's port of every generation request, in order: one port for many requests is one connection
        self.client_ports: list[int] = []
        #: the body of every generation request, in order
        self.bodies: list[dict] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._generate, methods=["POST"]),
            Route("/v1/completions", self._generate, methods=["POST"]),
            Route("/health", self._health),
            Route("/v1/models", self._health),
            Route("/metrics", self._metrics),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "FakeUpstream":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _health(self, request: Request) -> Response:
        if not self.healthy:
            return JSONResponse({"error": "unhealthy"}, status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in MODES]})

    async def _metrics(self, request: Request) -> Response:
        if self.metrics_text is None:
            return Response("not found", status_code=404)
        return Response(self.metrics_text, media_type="text/plain; version=0.0.4")

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        mode = body.get("model", "ok")
        self.requests[mode] += 1
        self.client_ports.append(request.client.port if request.client else 0)
        chat = request.url.path.endswith("chat/completions")
        if not self.healthy:
            return JSONResponse({"error": {"message": "server is shutting down"}}, status_code=503)
        if mode == "http500":
            return JSONResponse({"error": {"message": "CUDA error: an illegal memory access"}}, status_code=500)
        if mode == "no-such-model":
            return JSONResponse({"error": {"message": f"The model `{mode}` does not exist.", "code": 404}},
                                status_code=404)
        if mode == "stall-headers":  # a server that sends no headers until its first token (prefilling)
            deadline = time.monotonic() + self.stall_seconds
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.02)  # a client that left frees the handler (the server's shutdown waits for it)
        if mode == "too-long":
            return JSONResponse({"error": {"message": "This model's maximum context length is 2048 tokens. However, "
                                           "you requested 5000 tokens.", "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)

        async def stream():
            if mode == "stall":
                await asyncio.sleep(self.stall_seconds)
            name = "someone-else" if mode == "wrong-model" else mode
            for i, word in enumerate(WORDS):
                if mode == "bad-json" and i == 1:
                    yield "data: {\"choices\": [{\"delta\": {\"content\": \"x\"\n\n"
                    return
                if mode == "broken-sse" and i == 1:
                    yield "<html>502 Bad Gateway</html>\n\n"
                    return
                if mode == "error-chunk" and i == 1:
                    yield "data: " + json.dumps({"error": {"message": "out of memory"}}) + "\n\n"
                    return
                if mode == "truncated" and i == 2:
                    raise ConnectionResetError("the server died")
                if mode == "stall-mid" and i == 2:
                    await asyncio.sleep(self.stall_seconds)
                yield _chunk(name, word, chat=chat)
            yield _chunk(name, None if chat else "", "stop", chat=chat)
            if mode == "ok-no-prompt-usage":  # a usage report that counts only the output
                yield "data: " + json.dumps({"id": "x", "model": name, "choices": [],
                                             "usage": {"completion_tokens": len(WORDS)}}) + "\n\n"
            elif mode != "ok-nousage":
                yield "data: " + json.dumps({"id": "x", "model": name, "choices": [],
                                             "usage": {"prompt_tokens": 7, "completion_tokens": len(WORDS),
                                                       "total_tokens": 7 + len(WORDS)}}) + "\n\n"
            yield "data: [DONE]\n\n"
            if mode == "held-after-done":
                await asyncio.sleep(self.stall_seconds)

        return StreamingResponse(stream(), media_type="text/event-stream")

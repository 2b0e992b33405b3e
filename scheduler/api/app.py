"""Assembles the gateway's FastAPI application: routers, auth, error envelope, body-size limit."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler import __version__
from scheduler.api.auth import KeyStore
from scheduler.api.errors import ApiError, install_error_handlers
from scheduler.api.request_ids import RequestIdMiddleware


class BodySizeLimit:
    """Refuses bodies over max_body_bytes with 413, counting the bytes received, not only Content-Length.

    The body is read here, up to the limit, before the app runs: an error raised while FastAPI reads
    the body would reach the client as FastAPI's own 400, and a chunked body declares no length.
    Gateway bodies are small JSON documents, so holding one in memory costs nothing new.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await too_large.response()(scope, receive, send)
                return
        parts: list[bytes] = []
        received_bytes = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            body = message.get("body", b"")
            received_bytes += len(body)
            if received_bytes > limit:
                await too_large.response()(scope, receive, send)
                return
            parts.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            # the whole body once, then the real channel (so a disconnect is still seen)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less the 422 it adds to every operation (validation errors here are 400),
    with every error response as the JSON it is."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in doc.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                for status, response in responses.items():
                    # errors are JSON even where the success is CSV or text
                    if int(status) >= 400 and "content" in response:
                        response["content"] = {"application/json": next(iter(response["content"].values()))}
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


#: the routes that do inference: the ones a flood is made of, and the only ones the in-flight limit counts
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class InflightLimit:
    """Refuses an inference request at once (503 no_capacity + Retry-After) while max_inflight are in flight.

    It runs before the body is read, routing or auth: under a flood, a refusal must cost the gateway
    almost nothing, or the requests it refuses queue for its CPU as long as the ones it serves.
    """

    def __init__(self, app: ASGIApp, max_inflight: int | None, retry_after_seconds: int = 1):
        self.app = app
        self.max_inflight = max_inflight
        self.retry_after_seconds = retry_after_seconds
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.max_inflight is None or scope["type"] != "http" or scope.get("path") not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            await ApiError(503, f"the gateway is at its limit of {self.max_inflight} requests in flight; retry "
                           "after the Retry-After seconds", code="no_capacity",
                           headers={"Retry-After": str(self.retry_after_seconds)}).response()(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def create_app(gateway: Any) -> FastAPI:
    from scheduler.api.routes import inference, service

    app = FastAPI(title="Wattlane", version=__version__,
                  description="Energy-aware, OpenAI-compatible inference gateway")
    app.state.gateway = gateway
    app.state.serving = gateway.serving
    app.state.keys = KeyStore(gateway.config.server.api_keys, runtime=getattr(gateway, "key_cache", None),
                              config=gateway.config)
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(service.router)
    for extra in getattr(gateway, "extra_routers", lambda: [])():
        app.include_router(extra)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    app.add_middleware(BodySizeLimit, max_body_bytes=gateway.config.server.max_body_bytes)
    app.add_middleware(InflightLimit, max_inflight=gateway.config.server.max_inflight_requests)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, a 413 included, carries the id
    return app

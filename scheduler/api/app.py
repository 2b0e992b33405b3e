"""Assembles the gateway's FastAPI application: routers, auth, error envelope, body-size limit."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from scheduler import __version__
from scheduler.api.auth import KeyStore
from scheduler.api.errors import ApiError, install_error_handlers


class BodySizeLimit:
    """Refuses bodies over max_body_bytes with 413, whether or not Content-Length is given."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large").response()(
                    scope, receive, send)
                return
        seen = 0
        too_big = False

        async def limited_receive():
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_big = True
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large").response()(
                scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(gateway: Any) -> FastAPI:
    from scheduler.api.routes import inference, service

    app = FastAPI(title="Wattlane", version=__version__,
                  description="Energy-aware, OpenAI-compatible inference gateway")
    app.state.gateway = gateway
    app.state.service = gateway.service
    app.state.keys = KeyStore(gateway.config.server.api_keys)
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(service.router)
    for extra in getattr(gateway, "extra_routers", lambda: [])():
        app.include_router(extra)
    app.add_middleware(BodySizeLimit, max_body_bytes=gateway.config.server.max_body_bytes)
    return app

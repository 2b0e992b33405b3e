"""One id per request: a client's X-Request-Id when it is short and printable, otherwise a new one.

The same id goes in the response body (`id`), the X-Request-Id response header, the ledger row and
every log line. The work the request starts on a replica, and its node agent's accounting, go under an
attempt id of their own (attempt_id): clients may send one X-Request-Id twice. A client value is kept only if it matches SAFE_REQUEST_ID, so nothing a client
sends (60 KB, newlines, text that mimics a log line) reaches a header or a log raw.

RequestIdMiddleware runs twice in a deployment: in the gateway's FastAPI app, and outermost in Ray
Serve's HTTP proxy (installed through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, see
serve_proxy_middlewares). Serve's proxy reads X-Request-Id itself (its request context, access log
and replica logs) and appends the value to the response headers; running first there, the
middleware makes sure the proxy only ever sees a safe id, and leaves exactly one header on the way
out.
"""

from __future__ import annotations

import re
import secrets
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 64
SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_CHARS}}}")
#: the environment variable through which Ray Serve's proxy loads extra middlewares, and our value
SERVE_PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
SERVE_PROXY_CALLBACK = "scheduler.api.request_ids.serve_proxy_middlewares"

#: OpenAI-style prefixes, so generated ids look like the ones OpenAI clients know
_PREFIXES = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl"}
_HEADER = REQUEST_ID_HEADER.encode()


def is_safe_request_id(value: str) -> bool:
    return SAFE_REQUEST_ID.fullmatch(value) is not None


def attempt_id(request_id: str) -> str:
    """The id a request's work goes under on its replica and node agent: its own id and a random suffix. The
    agent keeps a finished request's joules under that id a while (for a replica cancelled as it asked), so
    two requests a client sent under one X-Request-Id must not share it there: the second got the first's
    joules, and the ledger counted them twice."""
    return f"{request_id}.{secrets.token_hex(4)}"


def new_request_id(path: str = "") -> str:
    return f"{_PREFIXES.get(path, 'req')}-{uuid.uuid4().hex}"


def resolve_request_id(raw_headers: list[tuple[bytes, bytes]], path: str) -> str:
    """The first X-Request-Id if it is safe, else a new id."""
    for name, value in raw_headers:
        if name.lower() == _HEADER:
            text = value.decode("latin-1")
            return text if is_safe_request_id(text) else new_request_id(path)
    return new_request_id(path)


def request_id_of(request: Request) -> str:
    """The request's id; RequestIdMiddleware has already made its header safe."""
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is not None and is_safe_request_id(value):
        return value
    # reachable only when the app runs without the middleware; keep the answer consistent anyway
    rid = new_request_id(request.url.path)
    _set_header(request.scope, rid)
    return rid


def _set_header(scope_or_message: dict, rid: str) -> None:
    headers = [(k, v) for k, v in scope_or_message.get("headers", []) if k.lower() != _HEADER]
    headers.append((_HEADER, rid.encode()))
    scope_or_message["headers"] = headers


class RequestIdMiddleware:
    """Replaces an unsafe or missing X-Request-Id before anything reads it; one header on the response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = resolve_request_id(scope.get("headers", []), scope.get("path", ""))
        scope = dict(scope)
        _set_header(scope, rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                _set_header(message, rid)
            await send(message)

        await self.app(scope, receive, send_with_id)


def serve_proxy_middlewares() -> list:
    """Ray Serve's HTTP-proxy callback: the middlewares its proxy puts around everything it serves."""
    from starlette.middleware import Middleware

    return [Middleware(RequestIdMiddleware)]


def serve_proxy_env() -> dict[str, str]:
    """Environment for Serve's controller (its proxies inherit it) so the proxy loads the middleware."""
    return {SERVE_PROXY_CALLBACK_ENV: SERVE_PROXY_CALLBACK}

"""Errors in the OpenAI envelope {"error": {"message", "type", "param", "code"}} with the right status.

Every failure the gateway can foresee becomes an ApiError; the handlers installed by
install_error_handlers() make sure nothing else leaks out as a bare 500 with a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad input: invalid JSON, a missing or invalid field or parameter",
    401: "No API key, or an unknown one",
    403: "The API key's role may not do this",
    404: "No such model, device or node",
    409: "Conflicts with what exists (a key id taken, a revoked or config key)",
    413: "Request body larger than server.max_body_bytes",
    429: "Rate or energy budget limit (see Retry-After)",
    503: "No capacity or no node agent (the reason is in the message; see Retry-After)",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying (when capacity is the reason)",
                          "schema": {"type": "string"}}},
}
#: what every route can answer: a body over the limit (checked before routing) and bad query parameters
COMMON_ERRORS = (400, 413)
#: what every route behind an API key can answer as well
AUTH_ERRORS = (401, 403)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, each with the OpenAI envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted(set(statuses)):
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[status] = entry
    return out


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


#: the one mapping from a replica's error kind to the client's status and code (replicas never pick statuses)
_REPLICA_ERRORS = {
    "context_length": (400, "context_length_exceeded"),
    "invalid_request": (400, "invalid_request"),
    "engine": (503, "engine_error"),
    "unavailable": (503, "engine_unavailable"),
}


def replica_error(kind: str, message: str, param: str | None = None) -> ApiError:
    """The envelope for a replica's failure (cluster.messages.ReplicaErrorKind, by value)."""
    status, code = _REPLICA_ERRORS.get(str(getattr(kind, "value", kind)), (503, "engine_error"))
    return ApiError(status, message, param=param if status == 400 else None, code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: absent, or not an object
        if first.get("type") == "missing":
            return "request body is required (JSON object)", None
        if first.get("type") == "value_error":  # a check across fields of the body: its own words
            return msg, None
        return "request body must be a JSON object", None
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    more = f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return (f"'{param}': {msg}{more}" if param else f"{msg}{more}"), param


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path (Starlette names only the first matching route's).

    Asks the routes themselves, one method at a time, so included routers count too.
    """
    from starlette.routing import Match

    routes = request.app.router.routes
    return [m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's words for a body that is not UTF-8 text: say what to send, like every other bad body
            message, code = "request body is not valid JSON (send UTF-8 encoded JSON)", "invalid_value"
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        return ApiError(exc.status_code, message, code=code, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug on our side: log it with its traceback, never send it to the client
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; the request was not completed", code="internal_error").response()

"""API-key authentication and roles (client < reader < operator), as FastAPI dependencies.

Keys are stored only as sha256 hashes in the config. With no keys configured the server binds to
127.0.0.1 (see cluster/runtime.py) and every caller acts as an anonymous operator.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from scheduler.api.errors import ApiError
from scheduler.config import ApiKeyConfig

#: which roles may do what: operator may do everything, reader reads reports, client infers
_ALLOWED = {
    "client": {"client", "operator"},
    "reader": {"reader", "operator"},
    "operator": {"operator"},
}


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str
    defaults: dict[str, Any] = field(default_factory=dict)
    team: str | None = None


ANONYMOUS = Principal(key_id="anonymous", role="operator")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, keys: list[ApiKeyConfig]):
        self._by_hash = {k.key_sha256: k for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = hash_key(authorization[7:].strip())
        for known, cfg in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return Principal(key_id=cfg.id, role=cfg.role, defaults=dict(cfg.defaults), team=cfg.team)
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require(role: str):
    """A FastAPI dependency that authenticates and checks the caller may act as `role`."""

    async def dependency(request: Request) -> Principal:
        store: KeyStore = request.app.state.keys
        principal = store.authenticate(request.headers.get("authorization"))
        if principal.role not in _ALLOWED[role]:
            raise ApiError(403, f"API key '{principal.key_id}' has role '{principal.role}', which may not do this "
                                f"(needs {role})", code="forbidden")
        request.state.principal = principal
        return principal

    return dependency

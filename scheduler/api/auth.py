"""API-key authentication and roles (client < reader < operator), as FastAPI dependencies.

Keys are stored only as sha256 hashes: in the config (server.api_keys), and, created at run time,
in the state directory's teams database (scheduler/teams/keys.py; seen by every gateway replica
within KEY_CACHE_SECONDS of a change). With no key anywhere the server binds to 127.0.0.1 (see
cluster/runtime.py) and every caller acts as an anonymous operator; the first key, config or run-time,
turns this off for good (revoking the last run-time key does not turn it back on).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from scheduler.api.errors import ApiError
from scheduler.config import ApiKeyConfig, WattlaneConfig
from scheduler.teams.keys import KeyCache, hash_key
from scheduler.teams.quotas import KeyQuota, Quota, QuotaError, parse_key_quota, quota_for

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
    #: the key's and its team's limits and budgets (None: nothing limits this caller)
    quota: Quota | None = None


ANONYMOUS = Principal(key_id="anonymous", role="operator")


__all__ = ["ANONYMOUS", "KeyStore", "Principal", "hash_key", "require"]


class KeyStore:
    def __init__(self, keys: list[ApiKeyConfig], runtime: KeyCache | None = None, config: WattlaneConfig | None = None):
        self._by_hash = {k.key_sha256: k for k in keys}
        self._runtime = runtime
        self._config = config
        #: Principal per config key, and per run-time key (rebuilt when the key's record changes)
        self._principals: dict[str, Principal] = {}
        self._runtime_principals: dict[str, tuple[Any, Principal]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash) or (self._runtime is not None and self._runtime.any_ever())

    def _quota(self, key_id: str, key: KeyQuota) -> Quota | None:
        return quota_for(self._config, key_id, key) if self._config is not None else None

    def _config_principal(self, cfg: ApiKeyConfig) -> Principal:
        p = self._principals.get(cfg.key_sha256)
        if p is None:
            quota = self._quota(cfg.id, KeyQuota(cfg.team, cfg.limits, tuple(cfg.budgets)))
            p = Principal(key_id=cfg.id, role=cfg.role, defaults=dict(cfg.defaults), team=cfg.team, quota=quota)
            self._principals[cfg.key_sha256] = p
        return p

    def _runtime_principal(self, digest: str) -> Principal | None:
        if self._runtime is None:
            return None
        record = self._runtime.lookup(digest)
        if record is None:
            return None
        cached = self._runtime_principals.get(digest)
        if cached is not None and cached[0] is record:
            return cached[1]
        try:
            key = parse_key_quota(record.team, record.limits, record.budgets)
        except QuotaError as exc:  # written by hand into the database: refuse rather than run unlimited
            raise ApiError(403, f"API key '{record.key_id}' has invalid limits or budgets ({exc}); rotate or "
                                "recreate it", code="invalid_api_key") from None
        p = Principal(key_id=record.key_id, role=record.role, defaults=dict(record.defaults), team=record.team,
                      quota=self._quota(record.key_id, key))
        self._runtime_principals[digest] = (record, p)
        return p

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = hash_key(authorization[7:].strip())
        for known, cfg in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return self._config_principal(cfg)
        principal = self._runtime_principal(digest)
        if principal is not None:
            return principal
        raise ApiError(401, "invalid API key (unknown, revoked or expired)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


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

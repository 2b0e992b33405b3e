"""API keys created at run time: create, list, revoke, rotate (stored hashed), and the gateways' cache of them.

A key is shown once, when it is created or rotated; the database keeps only its sha256 (keys are 256
random bits, so a plain hash is as strong as a slow one). Every change moves meta.keys_version;
a gateway replica reads that one integer at most every KEY_CACHE_SECONDS and reloads the keys when
it moved, so a revoked or rotated key stops working on every replica within that time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from scheduler.teams.store import TeamsStore

#: how stale a replica's view of the run-time keys may be; revocation is seen within this (plus one read)
KEY_CACHE_SECONDS = 0.5
#: how old the version read may be before a lookup of an unknown key reads it again (see KeyCache.lookup)
MISS_RECHECK_SECONDS = 0.05
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ROLES = ("client", "reader", "operator")
#: run-time keys start with this, so a leaked one is recognisable in logs and secret scanners
KEY_PREFIX = "wl-"
#: the latest expiry a key may have: the last day a datetime holds, so every listing can show it as a date
LATEST_EXPIRY_UNIX_S = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyError_(ValueError):
    """A key operation that cannot be done (unknown id, id taken, bad value); `status` for the HTTP route."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def expiry_in_days(days: float, now_s: float | None = None, *, name: str = "expires_in_days") -> float:
    """The expiry `days` from now, in unix seconds; KeyError_ naming `name` unless days is a finite number
    greater than 0 that ends before LATEST_EXPIRY_UNIX_S (NaN was stored as no expiry, inf and 1e300 as a
    time no listing could show)."""
    now_s = time.time() if now_s is None else now_s
    most_days = (LATEST_EXPIRY_UNIX_S - now_s) / 86400
    if not (math.isfinite(days) and 0 < days <= most_days):
        raise KeyError_(f"{name} must be a number of days greater than 0 that ends by 9999-12-31 "
                        f"(at most {most_days:.0f}), not {days!r}", param="expires_in_days")
    return now_s + days * 86400


@dataclass(frozen=True)
class RuntimeKey:
    key_id: str
    role: str
    team: str | None
    defaults: dict[str, Any] = field(default_factory=dict)
    #: RateLimitsConfig fields, and BudgetConfig entries, as plain JSON
    limits: dict[str, Any] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    created_unix_s: float = 0.0
    expires_unix_s: float | None = None
    revoked_unix_s: float | None = None

    def active(self, now_s: float) -> bool:
        return self.revoked_unix_s is None and (self.expires_unix_s is None or now_s < self.expires_unix_s)

    def public(self, now_s: float | None = None) -> dict[str, Any]:
        """What list and the API show: everything but the hash."""
        now_s = time.time() if now_s is None else now_s
        status = "revoked" if self.revoked_unix_s is not None else (
            "expired" if self.expires_unix_s is not None and now_s >= self.expires_unix_s else "active")
        return {"id": self.key_id, "role": self.role, "team": self.team, "defaults": self.defaults,
                "limits": self.limits, "budgets": self.budgets, "created_unix_s": self.created_unix_s,
                "expires_unix_s": self.expires_unix_s, "revoked_unix_s": self.revoked_unix_s,
                "status": status, "source": "runtime"}


_COLUMNS = "key_id, role, team, defaults_json, limits_json, budgets_json, created_unix_s, expires_unix_s, revoked_unix_s"


def _row_key(row: tuple) -> RuntimeKey:
    return RuntimeKey(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), json.loads(row[5]),
                      row[6], row[7], row[8])


def _bump(conn: Any) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")


class KeyRegistry:
    """Create, list, revoke and rotate run-time keys in the teams database (the CLI and the operator API)."""

    def __init__(self, store: TeamsStore, reserved_ids: set[str] | frozenset[str] = frozenset()):
        self.store = store
        #: ids of the config's keys: a run-time key may not take one
        self.reserved_ids = set(reserved_ids)

    def create(self, *, role: str = "client", team: str | None = None, key_id: str | None = None,
               defaults: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
               budgets: list[dict[str, Any]] | None = None, expires_unix_s: float | None = None,
               now_s: float | None = None) -> tuple[RuntimeKey, str]:
        """A new key: (its record, the key itself, to show once)."""
        now_s = time.time() if now_s is None else now_s
        if role not in ROLES:
            raise KeyError_(f"role must be one of {', '.join(ROLES)}, not {role!r}", param="role")
        key_id = f"key-{secrets.token_hex(4)}" if key_id is None else key_id  # "" is an id, and not a valid one
        if not KEY_ID_PATTERN.match(key_id):
            raise KeyError_(f"key id {key_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ - (starting with a letter "
                            "or digit)", param="id")
        if key_id in self.reserved_ids:
            raise KeyError_(f"key id '{key_id}' is a key of the config file; choose another id", status=409, param="id")
        if expires_unix_s is not None and not (math.isfinite(expires_unix_s)
                                               and expires_unix_s <= LATEST_EXPIRY_UNIX_S):
            raise KeyError_(f"the expiry must be a time no later than 9999-12-31, not {expires_unix_s!r} "
                            "(unix seconds)", param="expires_at")
        if expires_unix_s is not None and expires_unix_s <= now_s:
            raise KeyError_("the expiry is in the past", param="expires_at")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = RuntimeKey(key_id, role, team, dict(defaults or {}), dict(limits or {}), list(budgets or []),
                            now_s, expires_unix_s, None)
        with self.store.write() as conn:
            if conn.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone():
                raise KeyError_(f"key id '{key_id}' exists already; revoke or rotate it, or choose another id",
                                status=409, param="id")
            conn.execute(
                f"INSERT INTO api_keys ({_COLUMNS}, key_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, role, team, json.dumps(record.defaults), json.dumps(record.limits),
                 json.dumps(record.budgets), now_s, expires_unix_s, None, hash_key(secret)))
            _bump(conn)
        return record, secret

    def list(self) -> list[RuntimeKey]:
        rows = self.store.conn().execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_unix_s, key_id").fetchall()
        return [_row_key(r) for r in rows]

    def get(self, key_id: str) -> RuntimeKey:
        row = self.store.conn().execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyError_(f"no run-time key '{key_id}'", status=404, param="id")
        return _row_key(row)

    def revoke(self, key_id: str, now_s: float | None = None) -> RuntimeKey:
        now_s = time.time() if now_s is None else now_s
        if key_id in self.reserved_ids:
            raise KeyError_(f"key '{key_id}' is in the config file; remove it there and restart", status=409, param="id")
        with self.store.write() as conn:
            found = conn.execute("UPDATE api_keys SET revoked_unix_s = COALESCE(revoked_unix_s, ?) WHERE key_id = ?",
                                 (now_s, key_id)).rowcount
            if not found:
                raise KeyError_(f"no run-time key '{key_id}'", status=404, param="id")
            _bump(conn)
        return self.get(key_id)

    def rotate(self, key_id: str, now_s: float | None = None) -> tuple[RuntimeKey, str]:
        """A new secret for the same key id (role, team, limits, spend kept); the old secret stops working."""
        now_s = time.time() if now_s is None else now_s
        if key_id in self.reserved_ids:
            raise KeyError_(f"key '{key_id}' is in the config file; change its key_sha256 there", status=409, param="id")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.store.write() as conn:
            row = conn.execute("SELECT revoked_unix_s FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is None:
                raise KeyError_(f"no run-time key '{key_id}'", status=404, param="id")
            if row[0] is not None:
                raise KeyError_(f"key '{key_id}' is revoked; create a new one", status=409, param="id")
            conn.execute("UPDATE api_keys SET key_sha256 = ?, rotated_unix_s = ? WHERE key_id = ?",
                         (hash_key(secret), now_s, key_id))
            _bump(conn)
        return self.get(key_id), secret


class KeyCache:
    """A gateway replica's view of the run-time keys by hash, reloaded when keys_version moves.

    lookup() runs on the event loop: it costs a dict lookup, and every KEY_CACHE_SECONDS one read of
    a single integer (tens of microseconds on a local WAL file); the full reload happens only after a change.
    """

    def __init__(self, store: TeamsStore, ttl_seconds: float = KEY_CACHE_SECONDS):
        self.store = store
        self.ttl_seconds = ttl_seconds
        self._by_hash: dict[str, RuntimeKey] = {}
        self._version: int | None = None
        self._ever = False
        self._checked_monotonic = -1e9
        self._lock = threading.Lock()

    def _refresh(self, max_age_seconds: float | None = None) -> None:
        now = time.monotonic()
        if now - self._checked_monotonic < (self.ttl_seconds if max_age_seconds is None else max_age_seconds):
            return
        with self._lock:
            conn = self.store.conn()
            version = conn.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()[0]
            if version != self._version:
                rows = conn.execute(f"SELECT {_COLUMNS}, key_sha256 FROM api_keys WHERE revoked_unix_s IS NULL").fetchall()
                self._by_hash = {r[9]: _row_key(r[:9]) for r in rows}
                self._ever = bool(rows) or conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None
                self._version = version
            self._checked_monotonic = now

    def any_ever(self) -> bool:
        """Whether a run-time key was ever created: from then on every caller needs a key, even after the
        last one is revoked (revoking a key must never open the server to anonymous callers)."""
        self._refresh()
        return self._ever

    def lookup(self, key_sha256: str) -> RuntimeKey | None:
        """The active key with this hash, or None (unknown, revoked or expired).

        An unknown hash re-reads the version when the last read is MISS_RECHECK_SECONDS old: a key just
        created (on this replica or another) is one a client uses at once, and the answer that handed it out
        promised it works. Unknown keys sent in a flood cost one integer read per that interval, no more."""
        self._refresh()
        key = self._by_hash.get(key_sha256)
        if key is None:
            self._refresh(MISS_RECHECK_SECONDS)
            key = self._by_hash.get(key_sha256)
        return key if key is not None and key.active(time.time()) else None

    def expire(self) -> None:
        """Read the keys again at the next lookup (this replica just created or rotated one)."""
        self._checked_monotonic = -1e9


def validate_key_fields(config: Any, team: str | None, defaults: dict[str, Any] | None,
                        limits: dict[str, Any] | None, budgets: list[dict[str, Any]] | None
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The checks a config key gets, for a run-time one: a configured team, known defaults, valid limits and budgets.

    Returns the limits and budgets as validated (numbers as numbers, the period said), which is what to store:
    a value as sent ("1e6" as a string) is not what the key's listings and /v1/teams should show."""
    from scheduler.config import TEAM_NAME_PATTERN
    from scheduler.routing.controls import RequestControlError, merge_request_controls
    from scheduler.teams.quotas import QuotaError, parse_key_quota

    if team is not None and not re.match(TEAM_NAME_PATTERN, team):
        raise KeyError_(f"team {team!r} must be 1-64 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)",
                        param="team")
    if team is not None and config.teams and config.team(team) is None:
        names = ", ".join(t.name for t in config.teams)
        raise KeyError_(f"team '{team}' is not one of the config's teams ({names}); add it under teams", param="team")
    try:
        merge_request_controls(defaults or {}, {}, config.routing)
    except RequestControlError as exc:
        raise KeyError_(f"defaults: {exc}", param="defaults") from None
    try:
        quota = parse_key_quota(team, limits, budgets)
    except QuotaError as exc:
        raise KeyError_(str(exc), param=exc.param) from None
    return quota.limits.model_dump(exclude_none=True), [b.model_dump(exclude_none=True) for b in quota.budgets]

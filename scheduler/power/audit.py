"""The power audit log: every device-setting change or recommendation, by a person or a policy, in SQLite.

One row per action with who, when, which device and setting, the old and new value, the reason and
the outcome (applied, recommended, refused, failed). Served by GET /v1/power/audit. A callback is
invoked for each applied or recommended action so the caller can count
wattlane_power_actions_total{device, action} without this module importing the metrics.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from scheduler.sql_filters import where_clause

log = logging.getLogger(__name__)

Outcome = Literal["applied", "recommended", "refused", "failed"]
#: outcomes that are actions taken or proposed (counted in wattlane_power_actions_total)
COUNTED_OUTCOMES = ("applied", "recommended")


@dataclass
class AuditRecord:
    time_s: float
    actor: str  # "operator:<key id>", "policy:<policy>/<group>", "actuator" (restore), "cli"
    node: str
    device_id: str  # a device id, or "group:<name>" for a policy change
    setting: str  # power_limit_watts | locked_clocks_mhz | policy | mode
    action: str  # set_power_limit | reset_power_limit | set_locked_clocks | reset_locked_clocks | restore | set_policy | set_mode
    old_value: Any
    new_value: Any
    reason: str
    outcome: Outcome
    error: str | None = None
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS power_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_s REAL NOT NULL,
    actor TEXT NOT NULL,
    node TEXT NOT NULL,
    device_id TEXT NOT NULL,
    setting TEXT NOT NULL,
    action TEXT NOT NULL,
    old_value TEXT,
    new_value TEXT,
    reason TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS power_audit_time ON power_audit (time_s);
CREATE INDEX IF NOT EXISTS power_audit_device ON power_audit (device_id, time_s);
"""


class PowerAuditLog:
    """Append-only SQLite table (WAL) of power actions; safe to share between threads."""

    def __init__(
        self,
        path: str | Path,
        on_action: Callable[[AuditRecord], None] | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._on_action = on_action
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def in_state_dir(cls, state_dir: str | Path, on_action: Callable[[AuditRecord], None] | None = None) -> "PowerAuditLog":
        return cls(Path(state_dir) / "power" / "audit.sqlite3", on_action=on_action)

    def set_on_action(self, on_action: Callable[[AuditRecord], None] | None) -> None:
        self._on_action = on_action

    def record(self, rec: AuditRecord) -> AuditRecord:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO power_audit (time_s, actor, node, device_id, setting, action, old_value, new_value,"
                " reason, outcome, error) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.time_s, rec.actor, rec.node, rec.device_id, rec.setting, rec.action,
                    json.dumps(rec.old_value), json.dumps(rec.new_value), rec.reason, rec.outcome, rec.error,
                ),
            )
            rec.id = cur.lastrowid
        if self._on_action is not None and rec.outcome in COUNTED_OUTCOMES:
            try:
                self._on_action(rec)
            except Exception:  # a metrics hiccup must never undo or block an audited change
                log.exception("power audit callback failed")
        return rec

    def query(
        self,
        *,
        since_s: float | None = None,
        until_s: float | None = None,
        device_id: str | None = None,
        actor: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first, filtered; the shape GET /v1/power/audit returns under "data"."""
        where, params = where_clause((
            ("time_s", ">=", since_s),
            ("time_s", "<", until_s),
            ("device_id", "=", device_id),
            ("actor", "=", actor),
            ("outcome", "=", outcome),
        ))
        limit = max(1, min(int(limit), 10_000))
        with self._lock:
            rows = self._db.execute(
                "SELECT id, time_s, actor, node, device_id, setting, action, old_value, new_value, reason, outcome,"
                f" error FROM power_audit{where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        out = []
        for r in rows:
            out.append(
                {
                    "id": r[0], "time_s": r[1], "actor": r[2], "node": r[3], "device_id": r[4], "setting": r[5],
                    "action": r[6], "old_value": json.loads(r[7]) if r[7] is not None else None,
                    "new_value": json.loads(r[8]) if r[8] is not None else None, "reason": r[9],
                    "outcome": r[10], "error": r[11],
                }
            )
        return out

    def count(self, *, outcome: str | None = None, device_id: str | None = None) -> int:
        clauses, params = [], []
        for col, val in (("outcome", outcome), ("device_id", device_id)):
            if val is not None:
                clauses.append(f"{col} = ?")
                params.append(val)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM power_audit{where}", params).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


"""The teams database: one SQLite file in the state directory, shared by gateway replicas and the CLI.

Every gateway replica (a separate process) and `wattlane keys` open the same file. WAL lets readers
run beside the one writer; every write is one short BEGIN IMMEDIATE transaction, so a check and the
reservation it leads to are atomic across processes (no two replicas can spend the same joules).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

TEAMS_FILENAME = "teams.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = (
    # run-time API keys (config keys stay in the config); key_sha256 only, never the key
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL UNIQUE, role TEXT NOT NULL, team TEXT,
        defaults_json TEXT NOT NULL DEFAULT '{}', limits_json TEXT NOT NULL DEFAULT '{}',
        budgets_json TEXT NOT NULL DEFAULT '[]', created_unix_s REAL NOT NULL, expires_unix_s REAL,
        revoked_unix_s REAL, rotated_unix_s REAL)""",
    # counters; 'keys_version' moves on every key change so gateways reload their key cache
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('keys_version', 0)",
    # admissions of the last minute, per subject ('key:<id>' or 'team:<name>'): requests and tokens per minute
    """CREATE TABLE IF NOT EXISTS rate_window (
        id INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL, t_unix_s REAL NOT NULL, tokens INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rate_window_subject ON rate_window(subject, t_unix_s)",
    # what each admitted, unfinished request holds: concurrency, and the energy and carbon reserved for it
    """CREATE TABLE IF NOT EXISTS inflight (
        ticket TEXT NOT NULL, subject TEXT NOT NULL, holder TEXT NOT NULL, request_id TEXT NOT NULL,
        admitted_unix_s REAL NOT NULL, expires_unix_s REAL NOT NULL, window_id INTEGER,
        reserved_joules REAL NOT NULL, reserved_gco2e REAL NOT NULL, PRIMARY KEY (ticket, subject))""",
    "CREATE INDEX IF NOT EXISTS inflight_subject ON inflight(subject, expires_unix_s)",
    # what finished requests spent, per subject and budget period (the same joules and grams as their ledger rows)
    """CREATE TABLE IF NOT EXISTS spend (
        subject TEXT NOT NULL, period TEXT NOT NULL, period_start_unix_s REAL NOT NULL,
        joules REAL NOT NULL DEFAULT 0, gco2e REAL NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (subject, period, period_start_unix_s))""",
    # a moving average of what one request of the subject costs: a reservation is never below it
    """CREATE TABLE IF NOT EXISTS cost_estimate (
        subject TEXT PRIMARY KEY, joules_per_request REAL NOT NULL, gco2e_per_request REAL NOT NULL)""",
)


class TeamsStore:
    """Connections to the teams database: one per thread (sqlite3 connections stay in their thread)."""

    def __init__(self, path: str | Path):
        p = Path(path)
        self.path = p / TEAMS_FILENAME if p.is_dir() or p.suffix == "" else p
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.write() as conn:
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a process crash; only an OS crash can lose the last ones
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): what it reads, nobody changes until it commits."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

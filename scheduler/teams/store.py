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


#: the tables every teams database has had since the first version: a file with tables but not these is not one
_FIRST_TABLES = ("api_keys", "meta")


def _table_name(stmt: str) -> str | None:
    head = stmt.split("(", 1)[0].split()
    return head[-1] if head[:2] == ["CREATE", "TABLE"] else None


#: our tables and their columns, as _SCHEMA creates them (what a table of that name in the file must have)
_TABLE_COLUMNS: dict[str, set[str]] = {}
with contextlib.closing(sqlite3.connect(":memory:")) as _conn:
    for _stmt in _SCHEMA:
        _conn.execute(_stmt)
        if (_name := _table_name(_stmt)) is not None:
            _TABLE_COLUMNS[_name] = {r[1] for r in _conn.execute(f"PRAGMA table_info({_name})")}


class NotATeamsStoreError(ValueError):
    """A file opened as the teams database is not one (not SQLite, a folder, another program's tables);
    nothing was written to it."""


class NoTeamsStoreError(FileNotFoundError):
    """There is no teams database where one was to be read (TeamsStore(..., create=False))."""


def _check_teams_file(path: Path) -> None:
    """NotATeamsStoreError unless `path` is a teams database, or an empty SQLite file that may become one.

    Read-only: the check opens the file with mode=ro, so a file that fails it is left exactly as it was."""
    if path.is_dir():
        raise NotATeamsStoreError(f"{path} is a folder, not a Wattlane teams database; move it away")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables & set(_TABLE_COLUMNS)}
    except sqlite3.DatabaseError as exc:
        raise NotATeamsStoreError(f"{path} is not a Wattlane teams database: {exc}; move it away") from None
    tables -= {"sqlite_sequence"}  # SQLite's own (AUTOINCREMENT)
    if not tables:
        return  # an empty database: ours to initialise
    missing = [t for t in _FIRST_TABLES if t not in tables]
    if missing:
        raise NotATeamsStoreError(f"{path} is not a Wattlane teams database: it has no {' or '.join(missing)} table "
                                  f"(tables: {', '.join(sorted(tables))}); move it away")
    for table, have in sorted(columns.items()):
        if not _TABLE_COLUMNS[table] <= have:
            lacking = ", ".join(sorted(_TABLE_COLUMNS[table] - have))
            raise NotATeamsStoreError(f"{path} is not a Wattlane teams database: its {table} table has another "
                                      f"layout (no column {lacking}); move it away")


class TeamsStore:
    """Connections to the teams database: one per thread (sqlite3 connections stay in their thread)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        """Open the teams database at `path` (a state directory, or the file itself).

        NotATeamsStoreError for a file that is not one (nothing is written to it). create=False (commands
        that only read or change existing keys): NoTeamsStoreError where there is none, instead of making
        the folders and the file."""
        p = Path(path)
        self.path = p / TEAMS_FILENAME if p.is_dir() or p.suffix == "" else p
        if self.path.exists():
            _check_teams_file(self.path)
        elif not create:
            raise NoTeamsStoreError(f"no Wattlane teams database at {self.path}")
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

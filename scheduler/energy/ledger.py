"""The energy ledger: one durable SQLite row per finished request, and the reports read from it.

Durability contract: record(row) returns a Future that resolves only after the row's transaction
has committed. The gateway awaits it (arecord) before it sends the last bytes of a response, so a
request whose answer reached the client is in the ledger even if the server is killed (-9) right
after: SQLite in WAL mode with synchronous=NORMAL loses nothing on a process crash (only an OS
crash or power loss can drop the last commits).

Writes: arecord(row) commits on the caller's thread when the write connection is idle: a WAL append
that syncs nothing (synchronous=NORMAL), about 0.1 ms, where a hand-over to the writer thread and back
costs two thread wake-ups, milliseconds on a busy machine, on the response path. Otherwise (a commit is
running) the row queues for the writer thread, which commits in groups: rows that queue up while a
commit runs go together in the next transaction (for at most group_commit_seconds of gathering). The
write connection is used under a lock, by one thread at a time. Checkpoints, the writes that sync,
run on the writer thread on a connection of their own, without that lock: a PASSIVE checkpoint copies
what it can beside a writer, so no request's commit waits for a checkpoint's syncs. Reads open their
own connection per call (WAL lets them run beside the writer); call them from a worker thread. A streaming export (aexport_csv) gets a thread of its
own that opens, reads and closes its connection, however many exports run at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import io
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from scheduler.sql_filters import Condition, where_clause

log = logging.getLogger(__name__)

LEDGER_FILENAME = "ledger.sqlite3"
#: the writer thread checkpoints the WAL after this many commits (SQLite's own default is ~1000 pages)
CHECKPOINT_EVERY_COMMITS = 200
#: a queue item that asks the writer thread for a checkpoint
_CHECKPOINT: Any = object()

#: how each energy method's figures were obtained, as reports label them
METHOD_KINDS = {"nvml-counter": "measured", "rapl": "measured", "cpu-estimate": "estimated", "simulated": "simulated",
                # an upstream server no node agent meters: its model's joules-per-token profile (engines/openai_upstream.py)
                "upstream-jpt-estimate": "estimated"}
#: 2 added team, baseline_model, baseline_joules and baseline_method (older files gain them on open, as NULL);
#: 3 added prompt_tokens_method and completion_tokens_method
SCHEMA_VERSION = 3
#: CSV chunks an export reads ahead of a slow client (bounds each export's memory)
EXPORT_READ_AHEAD_CHUNKS = 4


def startup_window(since: float | None, until: float | None, device: str | None) -> list[Condition]:
    """Which start-up rows a report over [since, until), of one device or all, covers (Ledger.startups)."""
    return [("ready_unix_s", ">=", since), ("ready_unix_s", "<", until), ("device", "=", device)]


def method_kind(energy_method: str | None) -> str:
    """measured, estimated or simulated for a known method; "unknown" for another; "none" without a figure."""
    return METHOD_KINDS.get(energy_method, "unknown") if energy_method else "none"


@dataclass
class LedgerRow:
    """One finished request. Energy and carbon fields are None when they could not be known."""

    request_id: str
    time_unix_s: float
    model: str
    device: str
    node: str
    status: str
    api_key_id: str | None = None
    #: the API key's team, when the key has one
    team: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_seconds: float | None = None
    tpot_seconds: float | None = None
    latency_seconds: float | None = None
    joules: float | None = None
    dynamic_joules: float | None = None
    idle_joules: float | None = None
    energy_method: str | None = None
    energy_scope: str | None = None
    gco2e: float | None = None
    intensity_gco2e_per_kwh: float | None = None
    pue: float | None = None
    carbon_source: str | None = None
    carbon_region: str | None = None
    power_limit_watts: float | None = None
    routing_reason: str | None = None
    priority: str | None = None
    #: what the request would have cost under the savings baseline (energy/baseline.py): always an
    #: estimate, named by baseline_method; None when it could not be estimated (e.g. no joules)
    baseline_model: str | None = None
    baseline_joules: float | None = None
    baseline_method: str | None = None
    #: how prompt_tokens and completion_tokens were obtained (engines.base.TokenCountMethod: tokenizer,
    #: server, simulated, request-hint, or an estimate's name); None when unknown (a cancelled request)
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None

    @property
    def time_iso(self) -> str:
        return _iso(self.time_unix_s)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_ROW_FIELDS = [f.name for f in fields(LedgerRow)]
#: column order in the table and in exports: time_iso right after time_unix_s
COLUMNS = _ROW_FIELDS[:2] + ["time_iso"] + _ROW_FIELDS[2:]
#: the CSV export's columns: the table's, then the estimated saving (baseline_joules - joules)
EXPORT_COLUMNS = COLUMNS + ["saved_joules"]

_SQL_TYPES = {
    "request_id": "TEXT NOT NULL",
    "time_unix_s": "REAL NOT NULL",
    "time_iso": "TEXT NOT NULL",
    "model": "TEXT NOT NULL",
    "device": "TEXT NOT NULL",
    "node": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "prompt_tokens": "INTEGER NOT NULL",
    "completion_tokens": "INTEGER NOT NULL",
}



def _sql_type(column: str) -> str:
    numeric = column.endswith(("_seconds", "joules", "gco2e", "_kwh", "pue", "_watts"))
    return _SQL_TYPES.get(column, "REAL" if numeric else "TEXT")


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    + ", ".join(f"{c} {_sql_type(c)}" for c in COLUMNS)
    + ")",
    # A request id is not unique: a client may reuse its own X-Request-Id, and a retried request keeps its id.
    # Every row is kept (seq is the key); ledgers written before this drop their old unique index.
    "DROP INDEX IF EXISTS requests_id",
    "CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id)",
    "CREATE INDEX IF NOT EXISTS requests_time ON requests(time_unix_s)",
    "CREATE INDEX IF NOT EXISTS requests_model_time ON requests(model, time_unix_s)",
    # start-up energy: idle energy metered while models loaded, before the service answered; charged
    # to no request (docs/energy.md). One row per device per start of its node agent.
    "CREATE TABLE IF NOT EXISTS startups (node TEXT NOT NULL, device TEXT NOT NULL, started_unix_s REAL NOT NULL, "
    "ready_unix_s REAL NOT NULL, joules REAL NOT NULL, energy_method TEXT, energy_scope TEXT, "
    "PRIMARY KEY (node, device, started_unix_s))",
)

GroupBy = Literal["model", "device", "api_key", "team", "hour"]
_GROUP_SQL = {
    "model": "model",
    "device": "device",
    "api_key": "COALESCE(api_key_id, '')",
    "team": "COALESCE(team, '')",
    "hour": "strftime('%Y-%m-%dT%H:00:00Z', CAST(time_unix_s AS INTEGER), 'unixepoch')",
}


def _group_sql(group_by: str) -> str:
    """The SQL expression a report groups by; ValueError for anything else."""
    if group_by not in _GROUP_SQL:
        raise ValueError(f"group_by must be one of {', '.join(_GROUP_SQL)}, not {group_by!r}")
    return _GROUP_SQL[group_by]


#: the columns each schema version added (ledgers written before it gain them on open, as NULL)
_ADDED_COLUMNS = {
    2: ("team", "baseline_model", "baseline_joules", "baseline_method"),
    3: ("prompt_tokens_method", "completion_tokens_method"),
}
#: the columns every ledger had since the first version: a requests table without all of them is not ours,
#: and migrating it would fail half-way (a NOT NULL column cannot be added to a table) after writing to it
FIRST_COLUMNS = frozenset(COLUMNS) - {c for added in _ADDED_COLUMNS.values() for c in added}


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Migrate a ledger written by an older version: add the columns it lacks (NULL in its old rows)."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    for c in COLUMNS:
        if c not in have:
            # every column added after version 1 is nullable, so ALTER TABLE can add it to a full table
            conn.execute(f"ALTER TABLE requests ADD COLUMN {c} {_sql_type(c)}")


class LedgerClosedError(RuntimeError):
    pass


class NotALedgerError(ValueError):
    """A file opened as a ledger is not one (not SQLite, or no requests table); nothing was written to it."""


def _check_requests_columns(path: Path, have: set[str]) -> None:
    """NotALedgerError unless a requests table with columns `have` is one a ledger of some version wrote."""
    lacking = [c for c in COLUMNS if c in FIRST_COLUMNS - have]
    if lacking:
        more = f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""
        raise NotALedgerError(f"{path} is not a Wattlane ledger: its requests table lacks the columns every ledger "
                              f"has ({', '.join(lacking[:4])}{more})")


class Ledger:
    """SQLite ledger under the state directory (see module docstring for the durability contract)."""

    def __init__(self, path: str | Path, *, group_commit_seconds: float = 0.005, max_batch: int = 512):
        self.path = Path(path)
        if self.path.is_dir() or self.path.suffix == "":
            self.path = self.path / LEDGER_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.group_commit_seconds = group_commit_seconds
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[LedgerRow, concurrent.futures.Future[None]] | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        if self.path.is_file():  # another program's file is refused before anything is written to it
            _, have = self._schema()
            if have:
                _check_requests_columns(self.path, have)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            _add_missing_columns(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.commit()
        finally:
            conn.close()
        self.rows_written = 0
        self.commits = 0
        #: held while the write connection is in use (a commit), by whichever thread
        self._write_lock = threading.Lock()
        self._commits_since_checkpoint = 0
        self._conn = self._connect()
        self._conn_open = True
        # checkpoints (the only writes that sync) run on the writer thread, never in a caller's commit
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        #: the writer thread's own connection for checkpoints (see the module docstring)
        self._checkpoint_conn = self._connect()
        self._checkpoint_conn.execute("PRAGMA wal_autocheckpoint=0")
        self._insert = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        self._ready = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="wattlane-ledger-writer", daemon=True)
        self._writer.start()
        self._ready.wait()

    @classmethod
    def for_reading(cls, path: str | Path) -> "Ledger":
        """An existing ledger file opened to read (reports): nothing is created in it or written to it.

        NotALedgerError for a file that is not a Wattlane ledger, instead of giving it our tables. A ledger
        written by an older version lacks columns the reads name; that one is opened as the gateway opens
        it, which adds them (NULL in the old rows), as its next `wattlane serve` would.
        """
        reader = cls.__new__(cls)
        reader.path = Path(path)
        reader._closed = True  # a reader: record() refuses, close() has nothing to stop
        reader._close_lock = threading.Lock()
        reader._writer = None
        tables, have = reader._schema()
        if "requests" not in tables:
            raise NotALedgerError(f"{reader.path} is not a Wattlane ledger: it has no requests table of ours "
                                  f"(tables: {', '.join(sorted(tables)) or 'none'})")
        _check_requests_columns(reader.path, have)
        if not set(COLUMNS) <= have or "startups" not in tables:
            return cls(reader.path)
        return reader

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # --- writing ----------------------------------------------------------------------------

    def record(self, row: LedgerRow) -> concurrent.futures.Future[None]:
        """Queue a row; the future resolves after its commit (or fails with the database error)."""
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._closed:
            fut.set_exception(LedgerClosedError("the ledger is closed"))
            return fut
        self._queue.put((row, fut))
        return fut

    async def arecord(self, row: LedgerRow) -> None:
        """record() for asyncio code: returns once the row is durable.

        If the write connection is idle the row is committed here and now (see the module docstring),
        else it queues for the writer thread and this waits without blocking the loop."""
        if not self._closed and self._write_lock.acquire(blocking=False):
            try:
                if self._conn_open:
                    self._commit([row])
                    return
            finally:
                self._write_lock.release()
        await asyncio.wrap_future(self.record(row))

    def _commit(self, rows: list[LedgerRow]) -> None:
        """One transaction for `rows` (write lock held); asks the writer thread for a checkpoint now and then."""
        with self._conn:
            self._conn.executemany(self._insert, [self._values(r) for r in rows])
        self.rows_written += len(rows)
        self.commits += 1
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS:
            self._commits_since_checkpoint = 0  # counted from the request on: it is asked for once
            self._queue.put(_CHECKPOINT)

    def _checkpoint(self) -> None:
        try:
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # a reader holds the WAL: the next one catches up
            log.warning("ledger checkpoint failed: %s", exc)

    def _write_loop(self) -> None:
        self._ready.set()
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            if item is _CHECKPOINT:
                self._checkpoint()
                continue
            batch = [item]
            checkpoint_due = False
            # group commit: take what queued while the last commit ran, but never wait for more (a lone
            # row would pay the whole window in latency, and the ledger commit is on the response path)
            deadline = time.monotonic() + self.group_commit_seconds
            while len(batch) < self.max_batch and time.monotonic() < deadline:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if nxt is _CHECKPOINT:
                    checkpoint_due = True  # after this batch's commit: the request is not repeated
                    continue
                batch.append(nxt)
            live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            try:
                with self._write_lock:
                    self._commit([r for r, _ in live])
            except Exception as exc:  # a bad batch fails its futures, the writer keeps going
                for _, f in live:
                    f.set_exception(exc)
            else:
                for _, f in live:
                    f.set_result(None)
            if checkpoint_due:
                self._checkpoint()
        self._checkpoint_conn.close()
        with self._write_lock:
            self._conn_open = False
            self._conn.close()  # the last connection to close checkpoints the WAL into the database

    @staticmethod
    def _values(row: LedgerRow) -> tuple[Any, ...]:
        # getattr, not asdict: asdict deep-copies every field, a tenth of the commit's time
        return tuple(getattr(row, c) for c in COLUMNS)

    def close(self) -> None:
        """Flush every queued row, commit, and stop the writer. Later record() calls fail."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._writer.join()
        # rows queued after the sentinel (a race with close) are failed, not silently dropped
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].set_exception(LedgerClosedError("the ledger closed before this row was written"))

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------------

    def _schema(self) -> tuple[set[str], set[str]]:
        """(tables, columns of the requests table) of the existing file, read-only; NotALedgerError naming the
        file when it is not SQLite at all."""
        try:
            with self._read() as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                have = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        except sqlite3.DatabaseError as exc:
            raise NotALedgerError(f"{self.path} is not a Wattlane ledger: {exc}") from None
        return tables, have

    def _connect_ro(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        conn.row_factory = sqlite3.Row
        return conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect_ro()
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _where(since: float | None, until: float | None, model: str | None, device: str | None, api_key: str | None) -> tuple[str, list[Any]]:
        return where_clause((("time_unix_s", ">=", since), ("time_unix_s", "<", until), ("model", "=", model),
                             ("device", "=", device), ("api_key_id", "=", api_key)))

    def requests(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        device: str | None = None,
        api_key: str | None = None,
        request_id: str | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Rows newest first, filtered; since/until are unix seconds (until exclusive)."""
        where, params = self._where(since, until, model, device, api_key)
        if request_id is not None:
            where += (" AND" if where else " WHERE") + " request_id = ?"
            params.append(request_id)
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests{where} ORDER BY time_unix_s DESC, seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as conn:
            return [dict(r) for r in conn.execute(sql, params)]

    def summary(
        self,
        group_by: GroupBy = "model",
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        device: str | None = None,
        api_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Totals per group: requests, joules (and parts), gco2e, tokens, tokens per joule, savings.

        The one aggregation behind GET /v1/energy/summary and `wattlane report`, so the two agree.
        """
        where, params = self._where(since, until, model, device, api_key)
        return [{group_by: grp, **figures} for grp, figures in self._aggregate(_group_sql(group_by), where, params)]

    def totals(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        device: str | None = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        """summary()'s figures over the whole window, as one row (zeros for an empty window)."""
        where, params = self._where(since, until, model, device, api_key)
        rows = self._aggregate("'all'", where, params)
        if rows:
            return rows[0][1]
        return {"requests": 0, "requests_with_energy": 0, "joules": 0.0, "dynamic_joules": 0.0, "idle_joules": 0.0,
                "gco2e": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "tokens_per_joule": None,
                "completion_tokens_per_joule": None, "requests_with_baseline": 0, "baseline_joules": 0.0,
                "saved_joules": 0.0, "saved_gco2e": 0.0, "saved_fraction": None}

    def _aggregate(self, key: str, where: str, params: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        sql = (
            f"SELECT {key} AS grp, COUNT(*) AS requests, "
            "SUM(CASE WHEN joules IS NULL THEN 0 ELSE 1 END) AS requests_with_energy, "
            "TOTAL(joules) AS joules, TOTAL(dynamic_joules) AS dynamic_joules, TOTAL(idle_joules) AS idle_joules, "
            "TOTAL(gco2e) AS gco2e, TOTAL(prompt_tokens) AS prompt_tokens, TOTAL(completion_tokens) AS completion_tokens, "
            "TOTAL(CASE WHEN joules IS NULL THEN 0 ELSE prompt_tokens + completion_tokens END) AS metered_tokens, "
            "TOTAL(CASE WHEN joules IS NULL THEN 0 ELSE completion_tokens END) AS metered_completion_tokens, "
            # savings count only rows with both figures, so a missing estimate never reads as a saving
            "SUM(CASE WHEN joules IS NULL OR baseline_joules IS NULL THEN 0 ELSE 1 END) AS requests_with_baseline, "
            "TOTAL(CASE WHEN joules IS NULL THEN NULL ELSE baseline_joules END) AS baseline_joules, "
            "TOTAL(baseline_joules - joules) AS saved_joules, "
            # the saving's carbon at the request's own intensity and PUE (gco2e / joules of that request)
            "TOTAL(CASE WHEN joules > 0 THEN (baseline_joules - joules) * gco2e / joules END) AS saved_gco2e "
            f"FROM requests{where} GROUP BY grp ORDER BY grp"
        )
        out = []
        with self._read() as conn:
            for r in conn.execute(sql, params):
                j, base = r["joules"], r["baseline_joules"]
                out.append((r["grp"], {
                    "requests": r["requests"],
                    "requests_with_energy": r["requests_with_energy"],
                    "joules": j,
                    "dynamic_joules": r["dynamic_joules"],
                    "idle_joules": r["idle_joules"],
                    "gco2e": r["gco2e"],
                    "prompt_tokens": int(r["prompt_tokens"]),
                    "completion_tokens": int(r["completion_tokens"]),
                    # only rows that carry energy count, so unmetered requests do not inflate it
                    "tokens_per_joule": (r["metered_tokens"] / j) if j > 0 else None,
                    "completion_tokens_per_joule": (r["metered_completion_tokens"] / j) if j > 0 else None,
                    "requests_with_baseline": r["requests_with_baseline"],
                    "baseline_joules": base,
                    "saved_joules": r["saved_joules"],
                    "saved_gco2e": r["saved_gco2e"],
                    "saved_fraction": (r["saved_joules"] / base) if base > 0 else None,
                }))
        return out

    def method_breakdown(
        self,
        group_by: GroupBy = "model",
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        device: str | None = None,
        api_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Requests, joules and gCO2e per group and per (energy method, scope, carbon source, region).

        Summaries add joules across methods; this says how much of them was measured, estimated or
        simulated, so no report can pass an estimate off as a measurement.
        """
        where, params = self._where(since, until, model, device, api_key)
        sql = (
            f"SELECT {_group_sql(group_by)} AS grp, energy_method, energy_scope, carbon_source, carbon_region, "
            "COUNT(*) AS requests, TOTAL(joules) AS joules, TOTAL(gco2e) AS gco2e "
            f"FROM requests{where} GROUP BY grp, energy_method, energy_scope, carbon_source, carbon_region "
            "ORDER BY grp, joules DESC"
        )
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            {
                group_by: r["grp"],
                "energy_method": r["energy_method"],
                # rows without an energy figure are counted, never folded into a method
                "method_kind": method_kind(r["energy_method"]),
                "energy_scope": r["energy_scope"],
                "carbon_source": r["carbon_source"],
                "carbon_region": r["carbon_region"],
                "requests": r["requests"],
                "joules": r["joules"],
                "gco2e": r["gco2e"],
            }
            for r in rows
        ]

    def baseline_methods(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        device: str | None = None,
        api_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Requests, baseline joules and saved joules per baseline method (how each saving was estimated)."""
        where, params = self._where(since, until, model, device, api_key)
        where += (" AND" if where else " WHERE") + " joules IS NOT NULL AND baseline_joules IS NOT NULL"
        sql = ("SELECT baseline_method, COUNT(*) AS requests, TOTAL(baseline_joules) AS baseline_joules, "
               f"TOTAL(baseline_joules - joules) AS saved_joules FROM requests{where} "
               "GROUP BY baseline_method ORDER BY requests DESC, baseline_method")
        with self._read() as conn:
            return [dict(r) for r in conn.execute(sql, params)]

    def export_csv(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        device: str | None = None,
        api_key: str | None = None,
        chunk_rows: int = 500,
    ) -> Iterator[str]:
        """CSV text in chunks, oldest row first, read lazily.

        The generator owns a connection that may only be used by the thread that opened it, so the
        whole iteration must happen in one thread; asyncio code uses aexport_csv().
        """
        where, params = self._where(since, until, model, device, api_key)
        conn = self._connect_ro()
        try:
            cur = conn.execute(f"SELECT {', '.join(COLUMNS)}, baseline_joules - joules AS saved_joules "
                               f"FROM requests{where} ORDER BY time_unix_s, seq", params)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(EXPORT_COLUMNS)
            while True:
                rows = cur.fetchmany(chunk_rows)
                if not rows:
                    break
                w.writerows(tuple(r) for r in rows)
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
            if buf.tell():
                yield buf.getvalue()
        finally:
            conn.close()

    async def aexport_csv(self, **filters: Any) -> AsyncIterator[str]:
        """export_csv() for asyncio code (a streaming HTTP response), any number at once.

        One thread per export opens the read connection, reads every chunk and closes it; chunks
        reach the event loop through a queue. If the consumer stops early (client gone), the thread
        is told to stop and closes its connection itself.
        """
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        room = threading.Semaphore(EXPORT_READ_AHEAD_CHUNKS)
        stop = threading.Event()

        def deliver(item: str | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        def produce() -> None:
            try:
                with contextlib.closing(self.export_csv(**filters)) as gen:
                    for chunk in gen:
                        room.acquire()
                        if stop.is_set():
                            return
                        deliver(chunk)
                deliver(None)
            except BaseException as exc:  # handed to the consumer, which raises it
                deliver(exc)

        threading.Thread(target=produce, name="wattlane-ledger-export", daemon=True).start()
        try:
            while True:
                item = await chunks.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                room.release()
                yield item
        finally:
            stop.set()
            room.release()  # wake a producer waiting for room so it sees stop and closes its connection

    def record_startup(self, *, node: str, device: str, started_unix_s: float, ready_unix_s: float, joules: float,
                       energy_method: str | None, energy_scope: str | None) -> None:
        """Store (or update) one device's start-up energy. Call it from a worker thread: it commits on a
        connection of its own (one row per device per start, far from the request path)."""
        conn = self._connect()
        try:
            with conn:
                conn.execute("INSERT OR REPLACE INTO startups VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (node, device, started_unix_s, ready_unix_s, joules, energy_method, energy_scope))
        finally:
            conn.close()

    def startups(self, *, since: float | None = None, until: float | None = None,
                 device: str | None = None) -> list[dict[str, Any]]:
        """Start-up energy rows whose ready time falls in [since, until), oldest first."""
        where, params = where_clause(startup_window(since, until, device))
        with self._read() as conn:
            rows = conn.execute(f"SELECT * FROM startups{where} ORDER BY ready_unix_s, node, device", params).fetchall()
        return [dict(r) | {"method_kind": method_kind(r["energy_method"])} for r in rows]

    def count(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])

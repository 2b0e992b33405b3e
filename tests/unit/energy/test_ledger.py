"""Energy ledger: durable group commit, queries, summary math, CSV export, and survival of kill -9."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from scheduler.energy.ledger import COLUMNS, EXPORT_COLUMNS, Ledger, LedgerClosedError, LedgerRow

REPO = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def row(i: int, **kw) -> LedgerRow:
    base = dict(
        request_id=f"req-{i}", time_unix_s=T0 + i, model="small", device="cpu0", node="n0", status="ok",
        api_key_id="team-a", prompt_tokens=10, completion_tokens=20, ttft_seconds=0.1, tpot_seconds=0.02,
        latency_seconds=0.5, joules=3.0, dynamic_joules=2.0, idle_joules=1.0, energy_method="rapl",
        energy_scope="cpu", gco2e=0.001, intensity_gco2e_per_kwh=400.0, pue=1.2, carbon_source="fixed",
        carbon_region="FRA", power_limit_watts=None, routing_reason="smallest adequate", priority="interactive",
    )
    base.update(kw)
    return LedgerRow(**base)


@pytest.fixture
def ledger(tmp_path: Path):
    lg = Ledger(tmp_path)
    yield lg
    lg.close()


def test_record_resolves_after_commit_and_row_has_every_column(ledger: Ledger) -> None:
    ledger.record(row(1)).result(timeout=5)
    # a separate connection sees it: it is committed, not just queued
    rows = ledger.requests()
    assert len(rows) == 1
    r = rows[0]
    assert list(r) == COLUMNS
    assert r["time_iso"] == "2023-11-14T22:13:21.000Z"
    assert r["joules"] == 3.0 and r["power_limit_watts"] is None and r["priority"] == "interactive"
    assert ledger.path.name == "ledger.sqlite3"


def test_wal_mode(ledger: Ledger) -> None:
    import sqlite3

    ledger.record(row(1)).result(timeout=5)
    with sqlite3.connect(ledger.path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_group_commit(ledger: Ledger) -> None:
    futures = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for i in range(250):
            f = ledger.record(row(k * 1000 + i))
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in futures:
        f.result(timeout=10)
    assert ledger.count() == 1000
    assert ledger.rows_written == 1000
    assert ledger.commits < 1000  # rows share transactions


def test_arecord_does_not_block_the_event_loop(ledger: Ledger) -> None:
    async def main() -> float:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        await asyncio.gather(*(ledger.arecord(row(i)) for i in range(200)))
        t.cancel()
        return ticks

    assert asyncio.run(main()) > 0
    assert ledger.count() == 200


def test_queries_filter_and_order(ledger: Ledger) -> None:
    for i in range(10):
        ledger.record(row(i, model="small" if i % 2 else "large", device="cpu0" if i < 5 else "gpu0", api_key_id="a" if i < 3 else "b"))
    ledger.record(row(99)).result(timeout=5)
    assert [r["request_id"] for r in ledger.requests(limit=3)] == ["req-99", "req-9", "req-8"]
    assert {r["request_id"] for r in ledger.requests(model="large", device="gpu0")} == {"req-6", "req-8"}
    assert len(ledger.requests(since=T0 + 2, until=T0 + 5)) == 3  # until is exclusive
    assert len(ledger.requests(api_key="a")) == 3
    assert len(ledger.requests(limit=None)) == 11


def test_summary_math(ledger: Ledger) -> None:
    ledger.record(row(1, model="m1", joules=10.0, dynamic_joules=8.0, idle_joules=2.0, gco2e=1.0, prompt_tokens=5, completion_tokens=15))
    ledger.record(row(2, model="m1", joules=30.0, dynamic_joules=20.0, idle_joules=10.0, gco2e=3.0, prompt_tokens=15, completion_tokens=25))
    # a request on an unmetered device: counted, but not in tokens per joule
    ledger.record(row(3, model="m1", joules=None, dynamic_joules=None, idle_joules=None, gco2e=None, prompt_tokens=100, completion_tokens=100))
    ledger.record(row(3600 * 2, model="m2", joules=4.0, gco2e=0.5, prompt_tokens=1, completion_tokens=1)).result(timeout=5)
    by_model = {r["model"]: r for r in ledger.summary("model")}
    m1 = by_model["m1"]
    assert m1["requests"] == 3 and m1["requests_with_energy"] == 2
    assert m1["joules"] == 40.0 and m1["dynamic_joules"] == 28.0 and m1["idle_joules"] == 12.0
    assert m1["gco2e"] == 4.0
    assert m1["prompt_tokens"] == 120 and m1["completion_tokens"] == 140
    assert m1["tokens_per_joule"] == pytest.approx(60 / 40)
    assert m1["completion_tokens_per_joule"] == pytest.approx(40 / 40)
    by_hour = ledger.summary("hour")
    assert [r["hour"] for r in by_hour] == ["2023-11-14T22:00:00Z", "2023-11-15T00:00:00Z"]
    assert by_hour[0]["requests"] == 3
    assert sum(r["joules"] for r in ledger.summary("device")) == 44.0
    assert ledger.summary("api_key", model="m2")[0]["api_key"] == "team-a"
    with pytest.raises(ValueError):
        ledger.summary("colour")  # type: ignore[arg-type]


def test_export_csv_streams_all_rows(ledger: Ledger) -> None:
    for i in range(1200):
        ledger.record(row(i))
    ledger.record(row(5000, routing_reason='has, "comma"')).result(timeout=10)
    chunks = list(ledger.export_csv(chunk_rows=500))
    assert len(chunks) >= 3
    parsed = list(csv.DictReader(io.StringIO("".join(chunks))))
    assert len(parsed) == 1201
    assert parsed[0]["request_id"] == "req-0" and parsed[-1]["routing_reason"] == 'has, "comma"'
    assert list(parsed[0]) == EXPORT_COLUMNS
    empty = list(ledger.export_csv(model="nobody"))
    assert empty == [",".join(EXPORT_COLUMNS) + "\n"]


def test_close_flushes_and_rejects_later_rows(tmp_path: Path) -> None:
    lg = Ledger(tmp_path / "l.sqlite3", group_commit_seconds=0.05)
    futures = [lg.record(row(i)) for i in range(300)]
    lg.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(LedgerClosedError):
        lg.record(row(1000)).result(timeout=1)
    assert Ledger(tmp_path / "l.sqlite3").count() == 300


WRITER = textwrap.dedent(
    """
    import sys, time
    from scheduler.energy.ledger import Ledger, LedgerRow
    lg = Ledger(sys.argv[1])
    for i in range(100000):
        rid = f"kill-{i}"
        lg.record(LedgerRow(request_id=rid, time_unix_s=time.time(), model="m", device="cpu0", node="n0",
                            status="ok", joules=1.0)).result()
        # only now would the gateway send the response: announce it
        print(rid, flush=True)
    """
)


def test_no_acknowledged_row_is_lost_on_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    acked = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while len(acked) < 300 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # lines printed between our last read and the kill were acknowledged too
    acked += [ln.strip() for ln in proc.stdout.read().splitlines() if ln.strip()]
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 300
    import sqlite3

    with sqlite3.connect(db) as c:
        stored = {r[0] for r in c.execute("SELECT request_id FROM requests")}
    missing = [rid for rid in acked if rid not in stored]
    assert not missing, f"{len(missing)} acknowledged rows lost, e.g. {missing[:3]}"


def test_method_breakdown_separates_measured_estimated_and_unknown(tmp_path):
    from scheduler.energy.ledger import Ledger, LedgerRow

    ledger = Ledger(tmp_path)
    rows = [
        LedgerRow("a", 1000.0, "m", "gpu0", "n", "ok", joules=10.0, energy_method="nvml-counter", energy_scope="gpu", gco2e=1.0),
        LedgerRow("b", 1001.0, "m", "cpu0", "n", "ok", joules=2.0, energy_method="cpu-estimate", energy_scope="cpu", gco2e=0.5),
        LedgerRow("c", 1002.0, "m", "cpu0", "n", "error"),
    ]
    for r in rows:
        ledger.record(r).result(timeout=5)
    out = {(r["model"], r["method_kind"]): r for r in ledger.method_breakdown("model")}
    assert out[("m", "measured")]["joules"] == 10.0 and out[("m", "measured")]["energy_method"] == "nvml-counter"
    assert out[("m", "estimated")]["joules"] == 2.0
    assert out[("m", "none")]["requests"] == 1 and out[("m", "none")]["joules"] == 0
    assert ledger.method_breakdown("model", since=1001.5) == [
        {"model": "m", "energy_method": None, "method_kind": "none", "energy_scope": None, "carbon_source": None,
         "carbon_region": None, "requests": 1, "joules": 0.0, "gco2e": 0.0}]
    ledger.close()


def test_a_reused_request_id_keeps_every_row_and_its_energy(tmp_path: Path) -> None:
    """A client may send the same X-Request-Id twice: both requests stay in the ledger and in its totals."""
    with Ledger(tmp_path) as lg:
        lg.record(row(1, request_id="client-id-1", joules=3.0)).result(timeout=5)
        lg.record(row(2, request_id="client-id-1", joules=5.0)).result(timeout=5)
        found = lg.requests(request_id="client-id-1")
        assert sorted(r["joules"] for r in found) == [3.0, 5.0]
        assert lg.summary("model")[0]["joules"] == pytest.approx(8.0)


def test_a_ledger_written_with_the_old_unique_index_keeps_reused_ids(tmp_path: Path) -> None:
    import sqlite3

    with Ledger(tmp_path) as lg:
        lg.record(row(1, request_id="same")).result(timeout=5)
    con = sqlite3.connect(tmp_path / "ledger.sqlite3")
    con.execute("DROP INDEX IF EXISTS requests_request_id")
    con.execute("CREATE UNIQUE INDEX requests_id ON requests(request_id)")
    con.commit()
    con.close()
    with Ledger(tmp_path) as lg:
        lg.record(row(2, request_id="same")).result(timeout=5)
        assert len(lg.requests(request_id="same")) == 2


def test_a_lone_row_commits_at_once_without_waiting_for_the_group_window(tmp_path: Path) -> None:
    """The commit is on the response path: a row that finds the writer idle must not wait for company."""
    with Ledger(tmp_path / "l.sqlite3", group_commit_seconds=2.0) as lg:
        began = time.monotonic()
        lg.record(row(1)).result(timeout=5)
        assert time.monotonic() - began < 0.5
        assert lg.count() == 1


def test_arecord_commits_on_the_callers_thread_when_idle_and_checkpoints_on_the_writer(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """A hand-over to the writer thread and back costs two thread wake-ups on the response path; the
    checkpoint, the one write that syncs, must still never run in a caller's commit."""
    import scheduler.energy.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY_COMMITS", 5)
    commit_threads: list[str] = []
    checkpoint_threads: list[str] = []
    with Ledger(tmp_path / "l.sqlite3") as lg:
        real_commit, real_checkpoint = lg._commit, lg._checkpoint

        def commit(rows):
            commit_threads.append(threading.current_thread().name)
            real_commit(rows)

        def checkpoint():
            checkpoint_threads.append(threading.current_thread().name)
            real_checkpoint()

        lg._commit, lg._checkpoint = commit, checkpoint

        async def main() -> None:
            for i in range(12):
                await lg.arecord(row(i))
                assert lg.count() == i + 1  # durable when arecord returns

        asyncio.run(main())
        deadline = time.monotonic() + 5
        while len(checkpoint_threads) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert commit_threads[:5] == ["MainThread"] * 5
    # a row that arrives while a checkpoint holds the connection queues for the writer instead of waiting
    assert commit_threads.count("wattlane-ledger-writer") <= len(checkpoint_threads)
    assert checkpoint_threads and set(checkpoint_threads) == {"wattlane-ledger-writer"}
    assert Ledger(tmp_path / "l.sqlite3").count() == 12


class _SlowCheckpoints:
    """A connection whose checkpoints take `seconds` (a slow disk's syncs); everything else passes through."""

    def __init__(self, conn, seconds: float, ran: list[float]):
        self._conn, self._seconds, self._ran = conn, seconds, ran

    def execute(self, sql, *args):
        if "wal_checkpoint" in sql:
            time.sleep(self._seconds)
            self._ran.append(time.monotonic())
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __enter__(self):
        return self._conn.__enter__()

    def __exit__(self, *exc):
        return self._conn.__exit__(*exc)


def test_a_request_never_waits_for_a_checkpoints_syncs(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint syncs the WAL and the database file; on a slow disk that takes a while, and a request
    whose row arrived then waited for it before its last byte (the checkpoint held the write connection)."""
    import scheduler.energy.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY_COMMITS", 1)
    checkpoints: list[float] = []
    with Ledger(tmp_path / "l.sqlite3") as lg:
        for name in ("_conn", "_checkpoint_conn"):  # whichever connection the checkpoint runs on
            if hasattr(lg, name):
                setattr(lg, name, _SlowCheckpoints(getattr(lg, name), 0.6, checkpoints))
        lg.record(row(0)).result(timeout=5)  # its commit asks the writer for a checkpoint: 0.6 s from now

        async def timed_row() -> float:
            await asyncio.sleep(0.1)  # the checkpoint is under way
            began = time.monotonic()
            await lg.arecord(row(1))
            return time.monotonic() - began

        took_s = asyncio.run(timed_row())
        assert lg.count() == 2
    assert took_s < 0.2, f"the row waited {took_s:.2f} s for a checkpoint"
    assert checkpoints, "the checkpoint ran"


def test_checkpoints_keep_coming_when_their_request_arrives_while_the_writer_gathers_a_batch(
        tmp_path: Path, monkeypatch) -> None:
    """The writer gathering a group commit skipped a checkpoint request it met; the commit counter, past the
    threshold, never matched it again, and the WAL grew for as long as the gateway ran."""
    import scheduler.energy.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY_COMMITS", 2)
    checkpoints: list[str] = []
    with Ledger(tmp_path / "l.sqlite3") as lg:
        real_commit, real_checkpoint = lg._commit, lg._checkpoint
        slow = threading.Event()
        slow.set()

        def commit(rows):
            if slow.is_set():
                time.sleep(0.15)  # rows queue up behind a slow commit
            real_commit(rows)

        def checkpoint():
            checkpoints.append(threading.current_thread().name)
            real_checkpoint()

        lg._commit, lg._checkpoint = commit, checkpoint
        futures = [lg.record(row(0))]  # record(): through the writer thread's queue, as rows go under load  # commit 1 (slow); rows 1-3 queue meanwhile
        time.sleep(0.05)
        futures += [lg.record(row(i)) for i in (1, 2, 3)]
        futures[0].result(timeout=5)
        time.sleep(0.05)  # commit 2 (rows 1-3, slow) asks for a checkpoint; rows 4-5 queue ahead of it
        futures += [lg.record(row(i)) for i in (4, 5)]
        for f in futures:
            f.result(timeout=5)
        slow.clear()
        for i in range(6, 16):  # ten more commits, one at a time: five more checkpoints are due
            lg.record(row(i)).result(timeout=5)
        deadline = time.monotonic() + 5
        while len(checkpoints) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(checkpoints) >= 5, checkpoints

"""Ledger schema 2: team and baseline columns, the migration of older files, and savings in the summary."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from scheduler.energy.ledger import (
    COLUMNS,
    FIRST_COLUMNS,
    SCHEMA_VERSION,
    Ledger,
    LedgerRow,
    NotALedgerError,
    _sql_type,
)

#: the requests table as schema version 1 wrote it (before team and the baseline columns)
V1_TABLE = (
    "CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, time_unix_s REAL NOT NULL, "
    "time_iso TEXT NOT NULL, model TEXT NOT NULL, device TEXT NOT NULL, node TEXT NOT NULL, status TEXT NOT NULL, "
    "api_key_id TEXT, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, ttft_seconds REAL, "
    "tpot_seconds REAL, latency_seconds REAL, joules REAL, dynamic_joules REAL, idle_joules REAL, energy_method TEXT, "
    "energy_scope TEXT, gco2e REAL, intensity_gco2e_per_kwh REAL, pue REAL, carbon_source TEXT, carbon_region TEXT, "
    "power_limit_watts REAL, routing_reason TEXT, priority TEXT)"
)


def row(i: int, **kw) -> LedgerRow:
    base = dict(request_id=f"r{i}", time_unix_s=1_800_000_000.0 + i, model="small", device="gpu0", node="n0",
                status="ok", prompt_tokens=10, completion_tokens=10)
    base.update(kw)
    return LedgerRow(**base)


def v1_ledger(tmp_path: Path) -> Path:
    """A ledger as version 1 wrote it, with one row ('old', 2 J)."""
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(V1_TABLE)
    conn.execute("INSERT INTO requests (request_id, time_unix_s, time_iso, model, device, node, status, prompt_tokens, "
                 "completion_tokens, joules, gco2e) VALUES ('old', 1.0, 'x', 'small', 'gpu0', 'n0', 'ok', 3, 4, 2.0, 0.5)")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    return path


def test_a_version_1_ledger_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path):
    path = v1_ledger(tmp_path)
    with Ledger(path) as ledger:
        ledger.record(row(1, team="blue", joules=1.0, gco2e=0.1, baseline_model="big", baseline_joules=4.0,
                          baseline_method="largest-model/size-prior")).result(timeout=10)
        rows = {r["request_id"]: r for r in ledger.requests(limit=None)}
        totals = ledger.totals()
    assert rows["old"]["joules"] == 2.0 and rows["old"]["team"] is None and rows["old"]["baseline_joules"] is None
    assert rows["r1"]["team"] == "blue" and rows["r1"]["baseline_method"] == "largest-model/size-prior"
    # the old row has no baseline: it counts in energy, never as a saving
    assert totals["requests"] == 2 and totals["joules"] == 3.0
    assert totals["requests_with_baseline"] == 1 and totals["baseline_joules"] == 4.0 and totals["saved_joules"] == 3.0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_version_1_ledger_opened_for_reading_is_migrated_and_read(tmp_path: Path):
    """A report of an old ledger: its columns are added (as the gateway would), not its reads failed."""
    path = v1_ledger(tmp_path)
    with Ledger.for_reading(path) as ledger:
        totals = ledger.totals()
    assert totals["requests"] == 1 and totals["joules"] == 2.0 and totals["requests_with_baseline"] == 0


@pytest.mark.parametrize("open_ledger", [Ledger.for_reading, Ledger], ids=["report", "gateway"])
def test_another_programs_requests_table_is_refused_and_left_as_it_was(tmp_path: Path, open_ledger):
    """A requests table of (request_id, time_unix_s, model) was taken for an old ledger: its "migration" added
    our indexes and startups table, then failed on a NOT NULL column (OperationalError)."""
    path = tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE requests (request_id TEXT, time_unix_s REAL, model TEXT)")
        conn.execute("INSERT INTO requests VALUES ('a', 1.0, 'm')")
        conn.commit()
    before = path.read_bytes()
    lacks = r"its requests table lacks the columns every ledger has \(time_iso, device, node, status and 19 more\)"
    with pytest.raises(NotALedgerError, match=r"other.sqlite3 is not a Wattlane ledger: " + lacks):
        open_ledger(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite3"]


@pytest.mark.parametrize("open_ledger", [Ledger.for_reading, Ledger], ids=["report", "gateway"])
def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path: Path, open_ledger):
    """The gateway's start raised sqlite3.DatabaseError ("file is not a database") without saying which file."""
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"not a database at all, " * 100)
    before = path.read_bytes()
    with pytest.raises(NotALedgerError, match=r"ledger.sqlite3 is not a Wattlane ledger: file is not a database"):
        open_ledger(path)
    assert path.read_bytes() == before


def test_every_column_a_migration_adds_is_nullable():
    """What makes an old ledger migratable: all it may lack can be added to a table that has rows."""
    assert FIRST_COLUMNS < set(COLUMNS) and set(V1_TABLE.split("(", 1)[1].replace(",", " ").split()) >= FIRST_COLUMNS
    assert all("NOT NULL" not in _sql_type(c) for c in set(COLUMNS) - FIRST_COLUMNS)


def test_savings_count_only_rows_with_both_figures_and_group_by_team(tmp_path: Path):
    with Ledger(tmp_path) as ledger:
        for f in [
            ledger.record(row(1, team="blue", joules=1.0, gco2e=0.2, baseline_joules=5.0)),  # saved 4 J, 0.8 g
            ledger.record(row(2, team="blue", joules=2.0, gco2e=0.2, baseline_joules=None)),  # no estimate
            ledger.record(row(3, team="blue", joules=None, baseline_joules=None, status="error")),
            ledger.record(row(4, team=None, joules=3.0, gco2e=0.3, baseline_joules=0.0)),  # a cascade repeat: -3 J
        ]:
            f.result(timeout=10)
        teams = {r["team"]: r for r in ledger.summary("team")}
        methods = ledger.baseline_methods()
    blue = teams["blue"]
    assert blue["requests"] == 3 and blue["requests_with_energy"] == 2 and blue["requests_with_baseline"] == 1
    assert blue["joules"] == 3.0 and blue["baseline_joules"] == 5.0 and blue["saved_joules"] == 4.0
    assert blue["saved_gco2e"] == pytest.approx(0.8)  # at the request's own 0.2 g/J
    assert blue["saved_fraction"] == pytest.approx(0.8)
    none = teams[""]  # rows without a team group under "", as api_key does
    assert none["saved_joules"] == -3.0 and none["saved_fraction"] is None
    assert sum(m["requests"] for m in methods) == 2


def test_totals_of_an_empty_window_are_zeros(tmp_path: Path):
    with Ledger(tmp_path) as ledger:
        t = ledger.totals(since=1.0, until=2.0)
    assert t["requests"] == 0 and t["joules"] == 0.0 and t["saved_joules"] == 0.0 and t["tokens_per_joule"] is None

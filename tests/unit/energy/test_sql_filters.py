"""A row not in the store yet passes the same report filter as the store's own rows (start-up rows that the
summary shows before the ledger has them)."""

from __future__ import annotations

import itertools
import sqlite3

import pytest

from scheduler.energy.ledger import startup_window
from scheduler.sql_filters import row_matches, where_clause

ROWS = [{"device": d, "ready_unix_s": t} for d, t in itertools.product(["gpu0", "gpu1"], [10.0, 20.0, 30.0])]


@pytest.mark.parametrize(("since", "until", "device"), [
    (None, None, None), (20.0, None, None), (None, 20.0, None), (20.0, 30.0, "gpu1"), (30.0, 20.0, None),
    (None, None, "gpu9"),
])
def test_row_matches_keeps_exactly_the_rows_the_where_clause_keeps(since, until, device):
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE startups (device TEXT, ready_unix_s REAL)")
    conn.executemany("INSERT INTO startups VALUES (:device, :ready_unix_s)", ROWS)
    window = startup_window(since, until, device)
    where, params = where_clause(window)
    in_sql = [tuple(r) for r in conn.execute(f"SELECT device, ready_unix_s FROM startups{where} ORDER BY rowid", params)]
    in_memory = [(r["device"], r["ready_unix_s"]) for r in ROWS if row_matches(r, window)]
    assert in_memory == in_sql
    # the window is a half-open interval on the ready time
    assert all((since is None or t >= since) and (until is None or t < until) for _, t in in_memory)

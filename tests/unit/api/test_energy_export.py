"""GET /v1/energy/export.csv: many downloads at once each get the whole file, from a real SQLite ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import threading

import httpx
import pytest

from scheduler.energy.ledger import EXPORT_COLUMNS, LedgerRow
from tests.support.gateway_app import bearer, build

ROWS = 4000  # the route reads 500 rows per chunk: each export streams in 8+ chunks
PARALLEL = 30


@pytest.fixture
def app_and_gateway(tmp_path):
    app, gw = build(tmp_path)
    futures = [gw.ledger.record(LedgerRow(request_id=f"req-{i}", time_unix_s=1_700_000_000.0 + i, model="small",
                                          device="cpu0", node="n0", status="ok", prompt_tokens=i, joules=0.5 * i))
               for i in range(ROWS)]
    for f in futures:
        f.result(timeout=30)
    yield app, gw
    gw.close()


async def _download_all(app) -> list[tuple[int, str | Exception]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://wattlane", headers=bearer("reader"),
                                 timeout=60) as client:
        async def one():
            try:
                r = await client.get("/v1/energy/export.csv")
                return r.status_code, r.text
            except Exception as exc:  # a body cut off mid-stream surfaces here
                return 0, exc
        return await asyncio.gather(*(one() for _ in range(PARALLEL)))


def test_thirty_parallel_exports_are_each_complete(app_and_gateway):
    app, _ = app_and_gateway
    results = asyncio.run(_download_all(app))
    broken = [r for r in results if r[0] != 200]
    assert not broken, f"{len(broken)} of {PARALLEL} downloads failed: {broken[0][1]!r}"
    for _, text in results:
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == EXPORT_COLUMNS
        assert len(rows) == ROWS + 1
        assert [r[0] for r in rows[1:]] == [f"req-{i}" for i in range(ROWS)]


def test_an_abandoned_export_closes_its_connection_in_its_own_thread(app_and_gateway):
    _, gw = app_and_gateway

    async def read_two_chunks_then_stop():
        chunks = gw.ledger.aexport_csv()
        got = [await chunks.__anext__(), await chunks.__anext__()]
        await chunks.aclose()
        return got

    before = {t.ident for t in threading.enumerate()}
    got = asyncio.run(read_two_chunks_then_stop())
    assert got[0].startswith(",".join(EXPORT_COLUMNS))
    # the export's thread sees the stop, closes its connection and ends
    for t in threading.enumerate():
        if t.ident not in before and t.name == "wattlane-ledger-export":
            t.join(timeout=5)
            assert not t.is_alive()

"""The built-in sustainability dashboard: GET /dashboard (one self-contained page) and the method breakdown it reads.

The HTML itself needs no key (it holds no data); every data call it makes carries the reader's key.
GET /v1/energy/methods tells, per model, device or hour, how much of the energy was measured,
estimated or simulated, so that the page can label every figure and show where methods mix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import sqlite3
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from scheduler.api.auth import Principal, require
from scheduler.api.routes.energy import _time

router = APIRouter()

PAGE_PATH = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"

#: how each energy method is presented: measured by a hardware counter, estimated from load, or simulated
METHOD_KINDS = {"nvml-counter": "measured", "rapl": "measured", "cpu-estimate": "estimated", "simulated": "simulated"}

# the same hour key as Ledger.summary(group_by="hour"), so the page can join the two
_GROUP_SQL = {
    "model": "model",
    "device": "device",
    "api_key": "COALESCE(api_key_id, '')",
    "hour": "strftime('%Y-%m-%dT%H:00:00Z', CAST(time_unix_s AS INTEGER), 'unixepoch')",
}


@lru_cache(maxsize=1)
def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: only its own inline script and style (by hash) may run."""
    html = PAGE_PATH.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), csp


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    body, csp = _page()
    return HTMLResponse(body, headers={
        "Content-Security-Policy": csp,
        # the page may carry a key in its #fragment for a moment; never leak the URL onwards
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    })


def method_breakdown(ledger_path: Path, group_by: str, since: float | None, until: float | None) -> list[dict[str, Any]]:
    """Requests, joules and gCO2e per (group, energy method, scope, carbon source, region) from the ledger."""
    clauses, params = [], []
    for col, op, val in (("time_unix_s", ">=", since), ("time_unix_s", "<", until)):
        if val is not None:
            clauses.append(f"{col} {op} ?")
            params.append(val)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = (f"SELECT {_GROUP_SQL[group_by]} AS grp, energy_method, energy_scope, carbon_source, carbon_region, "
           "COUNT(*) AS requests, TOTAL(joules) AS joules, TOTAL(gco2e) AS gco2e "
           f"FROM requests{where} GROUP BY grp, energy_method, energy_scope, carbon_source, carbon_region "
           "ORDER BY grp, joules DESC")
    if not ledger_path.exists():
        return []
    # read-only, beside the ledger's writer (WAL lets readers run while it commits)
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.close()
    out = []
    for r in rows:
        method = r["energy_method"]
        out.append({
            group_by: r["grp"],
            "energy_method": method,
            # rows without an energy figure are counted, never silently folded into a method
            "method_kind": METHOD_KINDS.get(method, "unknown") if method else "none",
            "energy_scope": r["energy_scope"],
            "carbon_source": r["carbon_source"],
            "carbon_region": r["carbon_region"],
            "requests": r["requests"],
            "joules": r["joules"],
            "gco2e": r["gco2e"],
        })
    return out


@router.get("/v1/energy/methods")
async def energy_methods(
    request: Request,
    group_by: Literal["model", "device", "api_key", "hour"] = "model",
    since: str | None = None, until: str | None = None,
    _: Principal = Depends(require("reader")),
):
    ledger = request.app.state.gateway.ledger
    rows = await asyncio.to_thread(method_breakdown, Path(ledger.path), group_by, _time(since, "since"),
                                   _time(until, "until"))
    return {"object": "list", "group_by": group_by, "data": rows}

"""Reports from the ledger: GET /v1/energy/requests, /v1/energy/summary, /v1/energy/export.csv; GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from scheduler.api.auth import Principal, require
from scheduler.api.errors import AUTH_ERRORS, ApiError, error_responses
from scheduler.api.schemas import EnergyRequestList, MethodList, SummaryList
from scheduler.energy.ledger import GroupBy, startup_window
from scheduler.energy.report import parse_time
from scheduler.sql_filters import row_matches

router = APIRouter()


def _time(value: str | None, name: str) -> float | None:
    """Unix seconds or ISO 8601 (naive means UTC), read as `wattlane report` reads them."""
    try:
        return parse_time(value)
    except ValueError as exc:
        raise ApiError(400, f"'{name}' {exc}", param=name, code="invalid_value") from None


#: how since/until are documented: what _time() reads (the parameter itself stays a string so that a bad
#: value gets _time's message, naming both forms)
_TIME_SCHEMA = {"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"},
                          {"type": "string", "maxLength": 0}],
                "description": "unix seconds or ISO 8601 (naive means UTC); empty means no bound"}
TimeQuery = Annotated[str | None, Query(json_schema_extra=_TIME_SCHEMA)]


def report_filters(since: TimeQuery = None, until: TimeQuery = None, model: str | None = None,
                   device: str | None = None, api_key: str | None = None) -> dict:
    """The filters every report takes (a FastAPI dependency): time window, model, device, API key id."""
    return {"since": _time(since, "since"), "until": _time(until, "until"), "model": model, "device": device,
            "api_key": api_key}


_ERRORS = error_responses(400, *AUTH_ERRORS, 413)


class CsvResponse(StreamingResponse):
    media_type = "text/csv"


class PrometheusResponse(Response):
    media_type = "text/plain"


@router.get("/v1/energy/requests", response_model=EnergyRequestList, responses=_ERRORS)
async def energy_requests(request: Request, limit: int = Query(100, ge=1, le=10000),
                          id: str | None = Query(None, description="one request's id (its X-Request-Id)"),
                          _: Principal = Depends(require("reader")), filters: dict = Depends(report_filters)):
    rows = await asyncio.to_thread(request.app.state.gateway.ledger.requests, limit=limit, request_id=id, **filters)
    return {"object": "list", "data": rows}


@router.get("/v1/energy/summary", response_model=SummaryList, response_model_exclude_unset=True, responses=_ERRORS)
async def energy_summary(request: Request, group_by: GroupBy = "model", _: Principal = Depends(require("reader")),
                         filters: dict = Depends(report_filters)):
    """Per group: requests, joules, gCO2e, tokens, tokens per joule, and energy saved against the baseline
    (an estimate: docs/energy.md, Savings). The same figures as `wattlane report` for the same window.
    Start-up energy (docs/energy.md, Start-up energy) is beside the groups, never inside them."""
    gw = request.app.state.gateway
    rows = await asyncio.to_thread(gw.ledger.summary, group_by, **filters)
    await gw.record_startups()
    # start-up energy belongs to no model or API key: a filter on either leaves it out
    by_owner = bool(filters["model"] or filters["api_key"])
    startup = [] if by_owner else [row | {"settled": True} for row in await asyncio.to_thread(
        gw.ledger.startups, since=filters["since"], until=filters["until"], device=filters["device"])]
    if not by_owner:
        window = startup_window(filters["since"], filters["until"], filters["device"])
        startup += [row for row in gw.pending_startups() if row_matches(row, window)]
    return {"object": "list", "group_by": group_by, "data": rows, "startup": startup,
            "startup_joules": sum(s["joules"] for s in startup)}


@router.get("/v1/energy/methods", response_model=MethodList, response_model_exclude_unset=True, responses=_ERRORS)
async def energy_methods(request: Request, group_by: GroupBy = "model", _: Principal = Depends(require("reader")),
                         filters: dict = Depends(report_filters)):
    """How much of each group's energy was measured, estimated or simulated (for labelling reports)."""
    rows = await asyncio.to_thread(request.app.state.gateway.ledger.method_breakdown, group_by, **filters)
    return {"object": "list", "group_by": group_by, "data": rows}


@router.get("/v1/energy/export.csv", response_class=CsvResponse, responses=_ERRORS)
async def energy_export(request: Request, _: Principal = Depends(require("reader")),
                        filters: dict = Depends(report_filters)):
    chunks = request.app.state.gateway.ledger.aexport_csv(**filters)
    return CsvResponse(chunks,
                             headers={"Content-Disposition": 'attachment; filename="wattlane-energy.csv"'})


@router.get("/metrics", response_class=PrometheusResponse, responses=error_responses(413))
async def metrics(request: Request):
    gw = request.app.state.gateway
    gw.ensure_refresher()
    if not gw.device_snapshots:
        await gw.refresh_devices()
    body, content_type = gw.metrics.render()
    return Response(body, media_type=content_type)

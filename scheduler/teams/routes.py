"""Operator API for run-time keys and the teams' use: POST/GET /v1/keys, DELETE /v1/keys/{id}, POST /v1/keys/{id}/rotate, GET /v1/teams.

A key is in the answer only to POST /v1/keys and to rotate, once; everything else shows its record.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from scheduler.api.auth import Principal, require
from scheduler.api.errors import AUTH_ERRORS, ApiError, error_responses
from scheduler.teams import budgets
from scheduler.teams.keys import KeyError_, expiry_in_days, validate_key_fields
from scheduler.teams.quotas import parse_key_quota, quota_for

router = APIRouter()
_ERRORS = error_responses(400, *AUTH_ERRORS, 404, 409, 413)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="the key's id (default: key-<8 hex>)")
    role: Literal["client", "reader", "operator"] = "client"
    team: str | None = Field(None, description="one of the config's teams")
    expires_at: datetime | None = Field(None, description="ISO 8601; after it the key is refused")
    expires_in_days: Annotated[float, Field(gt=0)] | None = None
    defaults: dict[str, Any] = Field(default_factory=dict, description="min_quality, slo, priority, max_energy_joules")
    limits: dict[str, Any] = Field(default_factory=dict,
                                   description="requests_per_minute, tokens_per_minute, concurrent_requests")
    budgets: list[dict[str, Any]] = Field(default_factory=list,
                                          description='e.g. [{"energy_joules": 3.6e6, "period": "day"}]')


class ApiKeyOut(BaseModel):
    """A key's record; `key` only in the answer to create and rotate."""

    object: Literal["api_key"] = "api_key"
    id: str
    role: str
    team: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    budgets: list[dict[str, Any]] = Field(default_factory=list)
    created_unix_s: float | None = None
    expires_unix_s: float | None = None
    revoked_unix_s: float | None = None
    status: Literal["active", "revoked", "expired"]
    source: Literal["config", "runtime"]
    key: str | None = Field(None, description="the key itself: shown once, never stored")


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyOut]


class BudgetUseOut(BaseModel):
    energy_joules: float | None = None
    gco2e: float | None = None
    period: Literal["day", "month"]
    spent: float
    reserved: float
    fraction_used: float
    resets_unix_s: float


class SubjectUseOut(BaseModel):
    subject: str = Field(description="'team:<name>' or 'key:<id>'")
    limits: dict[str, Any]
    budgets: list[BudgetUseOut]


class TeamUseList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SubjectUseOut]


def _fail(exc: KeyError_) -> ApiError:
    code = {404: "key_not_found", 409: "conflict"}.get(exc.status, "invalid_value")
    return ApiError(exc.status, str(exc), param=exc.param, code=code)


def _config_keys(request: Request) -> list[dict[str, Any]]:
    return [{"id": k.id, "role": k.role, "team": k.team, "defaults": k.defaults,
             "limits": k.limits.model_dump(exclude_none=True), "budgets": [b.model_dump(exclude_none=True) for b in k.budgets],
             "status": "active", "source": "config"} for k in request.app.state.gateway.config.server.api_keys]


@router.post("/v1/keys", response_model=ApiKeyOut, response_model_exclude_none=True, responses=_ERRORS)
async def create_key(body: KeyCreate, request: Request, _: Principal = Depends(require("operator"))):
    """Create a key; the answer shows it once (only its sha256 is stored)."""
    gateway = request.app.state.gateway
    try:
        expires = body.expires_at.timestamp() if body.expires_at else None
        if body.expires_in_days is not None:
            expires = expiry_in_days(body.expires_in_days)
        limits, budgets = validate_key_fields(gateway.config, body.team, body.defaults, body.limits, body.budgets)
        record, secret = await asyncio.to_thread(
            gateway.key_registry.create, role=body.role, team=body.team, key_id=body.id, defaults=body.defaults,
            limits=limits, budgets=budgets, expires_unix_s=expires)
    except KeyError_ as exc:
        raise _fail(exc) from None
    gateway.key_cache.expire()  # the key works on this replica at once
    return {"object": "api_key", **record.public(), "key": secret}


@router.get("/v1/keys", response_model=ApiKeyList, response_model_exclude_none=True, responses=_ERRORS)
async def list_keys(request: Request, _: Principal = Depends(require("operator"))):
    """Every key: the config's and the run-time ones (revoked and expired included), never a key or its hash."""
    records = await asyncio.to_thread(request.app.state.gateway.key_registry.list)
    now_s = time.time()
    return {"object": "list", "data": _config_keys(request) + [r.public(now_s) for r in records]}


@router.delete("/v1/keys/{key_id}", response_model=ApiKeyOut, response_model_exclude_none=True, responses=_ERRORS)
async def revoke_key(key_id: str, request: Request, _: Principal = Depends(require("operator"))):
    """Revoke a run-time key: every gateway replica refuses it within a second."""
    try:
        record = await asyncio.to_thread(request.app.state.gateway.key_registry.revoke, key_id)
    except KeyError_ as exc:
        raise _fail(exc) from None
    return {"object": "api_key", **record.public()}


@router.post("/v1/keys/{key_id}/rotate", response_model=ApiKeyOut, response_model_exclude_none=True, responses=_ERRORS)
async def rotate_key(key_id: str, request: Request, _: Principal = Depends(require("operator"))):
    """A new key for the same id (role, team, limits and spend kept); the old one is refused within a second."""
    try:
        record, secret = await asyncio.to_thread(request.app.state.gateway.key_registry.rotate, key_id)
    except KeyError_ as exc:
        raise _fail(exc) from None
    request.app.state.gateway.key_cache.expire()  # the new key works, and the old one is refused, here at once
    return {"object": "api_key", **record.public(), "key": secret}


@router.get("/v1/teams", response_model=TeamUseList, responses=error_responses(*AUTH_ERRORS, 413))
async def team_use(request: Request, _: Principal = Depends(require("reader"))):
    """Each team's and each limited key's budgets now: spent, reserved by running requests, and when they reset."""
    gateway = request.app.state.gateway
    config = gateway.config
    records = await asyncio.to_thread(gateway.key_registry.list)
    now_s = time.time()
    subjects = []
    for t in config.teams:
        q = quota_for(config, "-", parse_key_quota(t.name, {}, []))
        subjects += [s for s in (q.subjects if q else ()) if s.name.startswith("team:")]
    for k in config.server.api_keys:
        q = quota_for(config, k.id, parse_key_quota(None, k.limits.model_dump(), [b.model_dump() for b in k.budgets]))
        subjects += list(q.subjects) if q else []
    for r in records:
        if r.revoked_unix_s is None:
            q = quota_for(config, r.key_id, parse_key_quota(None, r.limits, r.budgets))
            subjects += list(q.subjects) if q else []

    def read() -> list[dict[str, Any]]:
        conn = gateway.teams_store.conn()
        out = []
        for s in subjects:
            uses = [budgets.use(conn, s, b, now_s) for b in s.budgets]
            out.append({"subject": s.name, "limits": s.limits.model_dump(exclude_none=True),
                        "budgets": [{**u.budget.model_dump(exclude_none=True), "spent": u.spent, "reserved": u.reserved,
                                     "fraction_used": u.fraction, "resets_unix_s": u.reset_unix_s} for u in uses]})
        return out

    return {"object": "list", "data": await asyncio.to_thread(read)}

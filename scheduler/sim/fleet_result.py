"""What a fleet replay measured: energy, tokens, latency percentiles, SLO attainment, per device and replica."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FleetResult:
    requests: int
    completed: int
    rejected: int
    virtual_seconds: float
    wall_seconds: float
    energy_joules: float
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: np.ndarray
    tpot_seconds: np.ndarray
    slo_ok: int
    slo: dict[str, float]
    devices: dict[str, dict[str, Any]]
    timeline: dict[str, dict[str, list[float]]]
    replicas: dict[str, dict[str, Any]]
    preemptions: int
    governor_steps: int
    settings: dict[str, Any] = field(default_factory=dict)
    #: model selection and label-implied quality (route mode); empty for placement-only runs
    routing: dict[str, Any] = field(default_factory=dict)
    #: per device: busy / idle / parked seconds and joules (scheduler.sim.metered.MeteredGpu.accounting_at)
    accounting: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the completed requests (latencies per request; not in summary())
    done: list[Any] = field(default_factory=list, repr=False)
    #: times a replica parked its GPUs
    parks: int = 0

    def summary(self) -> dict[str, Any]:
        def pct(a: np.ndarray, q: float) -> float | None:
            return float(np.percentile(a, q)) if len(a) else None

        return {
            "method": "simulated",
            "requests": self.requests,
            "completed": self.completed,
            "rejected": self.rejected,
            "virtual_seconds": self.virtual_seconds,
            "wall_seconds": self.wall_seconds,
            "energy_joules": self.energy_joules,
            # None when nothing completed: the fleet's energy then belongs to no request
            "energy_per_request_joules": self.energy_joules / self.completed if self.completed else None,
            "tokens_per_joule": self.completion_tokens / self.energy_joules if self.energy_joules else None,
            "total_tokens_per_joule": (self.prompt_tokens + self.completion_tokens) / self.energy_joules if self.energy_joules else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_p50_seconds": pct(self.ttft_seconds, 50),
            "ttft_p90_seconds": pct(self.ttft_seconds, 90),
            "ttft_p99_seconds": pct(self.ttft_seconds, 99),
            "tpot_p50_seconds": pct(self.tpot_seconds, 50),
            "tpot_p90_seconds": pct(self.tpot_seconds, 90),
            "tpot_p99_seconds": pct(self.tpot_seconds, 99),
            "slo": self.slo,
            "slo_attainment": self.slo_ok / self.requests if self.requests else None,
            "preemptions": self.preemptions,
            "governor_steps": self.governor_steps,
            "replicas": self.replicas,
            "devices": self.devices,
            "timeline": self.timeline,
            "settings": self.settings,
            "routing": {k: v for k, v in self.routing.items() if not isinstance(v, np.ndarray)},
            "accounting": self.accounting,
            "parks": self.parks,
        }

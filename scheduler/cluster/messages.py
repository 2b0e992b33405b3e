"""The typed messages that cross Ray boundaries on the request path: gateway <-> replica <-> node agent.

The gateway sends a replica an engines.base.GenerationRequest; the replica answers with a stream of
ReplicaStart, ReplicaDelta... then one ReplicaEnd or ReplicaError. The node agent answers a finished
request with an EnergyReport and keeps an abandoned one's AbandonedWork for the gateway. Errors carry
a kind, never an HTTP status: the gateway alone maps kinds to statuses (api.errors.replica_error).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ReplicaErrorKind(str, Enum):
    #: the prompt plus max_tokens does not fit the model's context (the client can fix it)
    CONTEXT_LENGTH = "context_length"
    #: the engine failed (out of memory, a bug, a dead process): a capacity problem, not the client's
    ENGINE = "engine"
    #: the replica cannot run work now (its node agent is gone with its node) and generated nothing:
    #: the gateway tries another replica before it answers
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class EnergyReport:
    """What the node agent charged one request with (DESIGN.md, Energy accounting)."""

    joules: float
    dynamic_joules: float
    idle_joules: float
    #: EnergyMethod value: nvml-counter, rapl, cpu-estimate, simulated
    method: str | None
    #: EnergyScope value: gpu, cpu, cpu+dram
    scope: str | None
    #: the device ids, comma-separated (a tensor-parallel replica has several)
    device: str
    node: str
    #: False when no meter reported on the device: the joules mean "unknown"
    metered: bool
    #: False when the request's end was not covered by a reading: its tail is not charged
    complete: bool
    #: weighted tokens the attribution used (decode + prefill x prefill_token_weight)
    work_tokens: float
    power_limit_watts: float | None = None

    def public(self) -> dict[str, object]:
        """usage.energy of a response (protocol.EnergyUsage)."""
        return {"joules": self.joules, "dynamic_joules": self.dynamic_joules, "idle_joules": self.idle_joules,
                "method": self.method, "scope": self.scope, "device": self.device}


@dataclass(frozen=True)
class AbandonedWork:
    """An abandoned request's energy and tokens, as its replica left them with the node agent."""

    energy: EnergyReport | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ReplicaStart:
    replica: str
    device: str
    node: str
    time_s: float
    #: None unless the engine promises that a seed reproduces the text
    system_fingerprint: str | None = None


@dataclass(frozen=True)
class ReplicaDelta:
    text: str
    prompt_tokens: int
    completion_tokens: int
    time_s: float


@dataclass(frozen=True)
class ReplicaEnd:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    time_s: float
    mean_logprob: float | None
    energy: EnergyReport | None


@dataclass(frozen=True)
class ReplicaError:
    """The request failed on the replica; it was settled there, with the energy of the work done."""

    kind: ReplicaErrorKind
    message: str
    prompt_tokens: int
    completion_tokens: int
    energy: EnergyReport | None
    #: the request field at fault, for CONTEXT_LENGTH ("messages" or "prompt")
    param: str | None = None


ReplicaEvent = ReplicaStart | ReplicaDelta | ReplicaEnd | ReplicaError


@dataclass(frozen=True)
class SimEngineStats:
    """A simulated engine's stats, sent with its last token by the node agent that hosts it."""

    stats: dict


@dataclass(frozen=True)
class SimEngineFailure:
    """A simulated engine's failure, raised again as the same EngineError in the replica."""

    kind: ReplicaErrorKind
    message: str
    #: ContextLengthError's (prompt_tokens, max_tokens, context_length)
    context: tuple[int, int, int] | None = None

"""The typed messages that cross Ray boundaries on the request path: gateway <-> replica <-> node agent.

The gateway sends a replica an engines.base.GenerationRequest; the replica answers with a stream of
ReplicaStart, ReplicaDelta... then one ReplicaEnd or ReplicaError (a request that wants no deltas, a
non-streaming one, gets ReplicaStart and the end only, or, in one unary call, the end carrying its
start: ModelServer.generate_whole). The replica tells its node agent about the
request with RequestStart, RequestProgress and RequestFinish; the agent answers the finish with an
EnergyReport and keeps an abandoned request's AbandonedWork for the gateway, which pulls a GatewayView
from every agent each second. Errors carry a kind, never an HTTP status: the gateway alone maps kinds
to statuses (api.errors.replica_error).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from scheduler.engines.base import TokenLogprob


class ReplicaErrorKind(str, Enum):
    #: the prompt plus max_tokens does not fit the model's context (the client can fix it)
    CONTEXT_LENGTH = "context_length"
    #: the backend refused the request as invalid (an upstream server's 400): the client can fix it
    INVALID_REQUEST = "invalid_request"
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
class RequestStart:
    """A request began on a replica's devices (sent once its engine has taken it, or after a short wait)."""

    request_id: str
    device_ids: tuple[str, ...]
    #: when the replica received it (time.time() on the node)
    t_s: float
    #: cumulative work already done when this is sent, at progress_t_s: the prompt the engine took
    prompt_tokens: int = 0
    completion_tokens: int = 0
    progress_t_s: float | None = None


@dataclass(frozen=True)
class RequestProgress:
    """A running request's cumulative token counts at t_s (every PROGRESS_INTERVAL_SECONDS at most)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    t_s: float


@dataclass(frozen=True)
class RequestFinish:
    """A request ended at t_s with these final counts (they act as its last progress report).

    `start` is set when the agent was not told of the request yet (its start message had not been
    sent when it ended): the agent starts it then, so a request is never lost for want of its start."""

    request_id: str
    t_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    start: RequestStart | None = None
    #: how the counts were obtained (engines.base.TokenCountMethod values), kept with an abandoned request's work
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None


@dataclass(frozen=True)
class ReplicaStats:
    """A replica's load and energy figures (ModelServer.record_routing_stats), for routing and the governor."""

    replica_id: str
    stats: dict


@dataclass(frozen=True)
class AbandonRequest:
    """A request whose client went away: its finish, and its energy if the replica already had it."""

    finish: RequestFinish
    energy: EnergyReport | None = None


@dataclass(frozen=True)
class GatewayView:
    """What the gateway refreshes from one node agent each second, in one round trip."""

    #: one dict per device: its DeviceSnapshot fields plus energy_joules_metered, running_requests, agent_node
    devices: list[dict]
    #: replica id -> the ReplicaStats it last pushed
    replica_stats: dict[str, dict]
    #: "device|action" -> how many power actions the agent has applied or recommended
    power_action_totals: dict[str, int]


@dataclass(frozen=True)
class AbandonedWork:
    """An abandoned request's energy and tokens, as its replica left them with the node agent."""

    energy: EnergyReport | None
    prompt_tokens: int
    completion_tokens: int
    #: how the counts were obtained, as in ReplicaEnd (None: not said, or the agent settled it without them)
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None


@dataclass(frozen=True)
class ReplicaStart:
    replica: str
    device: str
    node: str
    time_s: float
    #: None unless the engine promises that a seed reproduces the text
    system_fingerprint: str | None = None
    #: the node whose agent keeps the work of a request whose client leaves, when not `node` (no agent
    #: runs there: an upstream server's host without Wattlane); None: `node`'s agent
    abandoned_node: str | None = None


@dataclass(frozen=True)
class ReplicaDelta:
    text: str
    prompt_tokens: int
    completion_tokens: int
    time_s: float
    #: the client asked for token log-probabilities: those of the tokens in this delta
    token_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class ReplicaEnd:
    #: the last piece of text; the whole text when the request asked for no deltas
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    time_s: float
    mean_logprob: float | None
    energy: EnergyReport | None
    #: seconds from the first token to this event (the replica's monotonic clock), when the gateway did
    #: not see that token arrive (no deltas were sent): it dates the first token on its own clock from it
    first_token_to_end_seconds: float | None = None
    #: how the counts above were obtained (engines.base.TokenCountMethod values; None: not said)
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None
    #: the request's start, when it did not go ahead as an event of its own (a unary call, or a request
    #: without deltas that ended within START_EVENT_DELAY_SECONDS: cluster/replica.py)
    start: ReplicaStart | None = None
    #: seconds from handing the request to the engine to its last event (the replica's monotonic clock)
    engine_seconds: float | None = None
    #: seconds the replica waited for the node agent's answer with the request's energy
    energy_seconds: float | None = None
    #: the client asked for token log-probabilities: those of `text`'s tokens (all of them without deltas)
    token_logprobs: tuple[TokenLogprob, ...] | None = None


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
    #: how the counts above were obtained, as in ReplicaEnd
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None
    #: the request's start, as in ReplicaEnd
    start: ReplicaStart | None = None


ReplicaEvent = ReplicaStart | ReplicaDelta | ReplicaEnd | ReplicaError


@dataclass(frozen=True)
class SimEngineStats:
    """A simulated engine's stats, sent with its last token by the node agent that hosts it."""

    stats: dict


@dataclass(frozen=True)
class SimEngineFailure:
    """A simulated engine's failure, raised again as the same error in the replica (a refusal stays the client's)."""

    kind: ReplicaErrorKind
    message: str
    #: ContextLengthError's (prompt_tokens, max_tokens, context_length)
    context: tuple[int, int, int] | None = None
    #: INVALID_REQUEST (RequestRejectedError): the request field at fault
    param: str | None = None

"""The engine interface every model backend implements (llama.cpp, simulated, upstream, vLLM).

An engine turns one GenerationRequest into a stream of EngineEvents. It knows nothing of HTTP,
routing or energy: the replica that hosts it forwards the events' work counts to the node agent
for attribution and the text to the gateway. Token counts and per-token timing come from the
engine because only it knows them exactly.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypedDict


#: when a client gives no max_tokens, generate at most this many: a small CPU model would otherwise
#: babble until the context is full, and a simulated one has no end-of-sequence of its own
DEFAULT_MAX_TOKENS = 256


class ModelKind(str, Enum):
    CHAT = "chat"
    COMPLETION = "completion"


class EngineError(Exception):
    """A failure inside the engine that is not the caller's fault (maps to 503 / retry)."""


class RequestRejectedError(ValueError):
    """The backend refused the request as invalid (an upstream server's 400): the client's to fix (maps to 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        self.param = param
        self.code = code
        super().__init__(message)


class EngineUnavailable(EngineError):
    """The engine cannot take work now (the process that hosts it, or its node, is gone); nothing was generated."""


class ContextLengthError(ValueError):
    """The prompt plus max_tokens does not fit the model's context (maps to 400)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens."
        )


@dataclass
class SamplingParams:
    #: None: the engine picks a default capped at the remaining context
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    #: compute the completion's mean log-probability (the cascade reads it; EngineEvent.mean_logprob)
    logprobs: bool = False
    #: the client asked for each token's log-probability (EngineEvent.token_logprobs), with this many
    #: most likely alternatives per token (chat top_logprobs 0-20, completions logprobs 0-5)
    return_logprobs: bool = False
    top_logprobs: int = 0
    #: the prompt's own tokens too, each with its log-probability given the tokens before it (legacy
    #: completions' echo with logprobs): they come first in the first event's token_logprobs, in_prompt set.
    #: An engine that cannot score a prompt refuses it (RequestRejectedError), never ignores it
    prompt_logprobs: bool = False
    #: OpenAI's response_format when it constrains the output: {"type": "json_object"} or {"type": "json_schema",
    #: "json_schema": {"name", "schema", ...}}; None for free text. Routing sends it only to a model that
    #: supports_json; an engine that cannot honour it refuses it (RequestRejectedError), never ignores it
    response_format: dict[str, Any] | None = None
    #: OpenAI's penalties in [-2, 2] (0: none) and logit_bias (token id -> bias in [-100, 100])
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    #: replay and simulation force an exact output length (ignore EOS); never set by clients
    force_output_tokens: int | None = None


@dataclass
class GenerationRequest:
    request_id: str
    kind: ModelKind
    #: chat: list of {"role", "content"}; completion: None
    messages: list[dict[str, str]] | None = None
    #: completion: the prompt text; chat: None
    prompt: str | None = None
    #: completion: the prompt as token ids of this request's model (the client named it), instead of text
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    #: a prompt given as a token count only (trace replay); engines that need text may refuse it
    prompt_tokens_hint: int | None = None


FinishReason = Literal["stop", "length", "error"]


class TokenCountMethod(str, Enum):
    """How a request's token counts were obtained: usage.prompt_tokens_method and completion_tokens_method.

    As with energy methods, a count that was estimated never carries the name of one that was counted.
    """

    #: the model's own tokenizer, in the engine (llama.cpp): exact
    TOKENIZER = "tokenizer"
    #: the upstream server's usage report: exact as that server counts
    SERVER = "server"
    #: the simulator's prompt model and output length
    SIMULATED = "simulated"
    #: a count given with the request itself (trace replay)
    REQUEST_HINT = "request-hint"
    #: a prompt the server reported no count for: its UTF-8 bytes / 4 (engines/openai_upstream.py)
    BYTES_ESTIMATE = "utf8-bytes-estimate"
    #: output the server reported no count for: one token per streamed content chunk
    CHUNK_ESTIMATE = "stream-chunk-estimate"


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and its most likely alternatives: a generated token, or
    a prompt token when the client asked for the prompt's (SamplingParams.prompt_logprobs)."""

    #: the token's text (its UTF-8 bytes decoded; a token that ends inside a character shows U+FFFD)
    token: str
    #: None only for the prompt's first token, which nothing before it predicts (OpenAI's null)
    logprob: float | None
    #: the token's raw bytes (OpenAI's `bytes`: a client joins them to rebuild split characters)
    token_bytes: bytes
    #: the most likely tokens at this position, most likely first: (text, logprob, bytes)
    top: tuple[tuple[str, float, bytes], ...] = ()
    #: a token of the prompt (echoed), not of the completion
    in_prompt: bool = False


@dataclass
class EngineEvent:
    """One step of a generation.

    `text` is the new text since the previous event (may be empty). Token counts are cumulative,
    so a consumer that drops events still knows the total work done.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    #: wall-clock time (time.time()) the event was produced
    time_s: float
    finished: bool = False
    finish_reason: FinishReason | None = None
    #: mean log-probability of the completion tokens so far, when the engine can report it
    mean_logprob: float | None = None
    #: with params.return_logprobs: the tokens generated since the previous event, each with its logprob
    token_logprobs: list[TokenLogprob] | None = None
    #: TokenCountMethod values of the counts above; None: the engine's token_counts_method
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None


class ReplicaStats(TypedDict, total=False):
    """What a replica publishes about itself for placement (router) and control (governor).

    Plain numbers only: it crosses process boundaries (Ray Serve routing stats, node agent).
    Every key is optional; consumers treat a missing key as unknown, not zero.
    """

    model_id: str
    replica_id: str
    device_ids: list[str]
    node: str
    running: int  # requests generating now
    waiting: int  # requests admitted but not yet running
    queued_prefill_tokens: int  # prompt tokens of the waiting requests (placement's TTFT queue term)
    kv_cache_free_fraction: float
    # live predictions for one more request at the current load
    prefill_tokens_per_second: float
    decode_seconds_per_token: float  # TPOT at the current batch size
    decode_seconds_per_token_per_sequence: float  # how that TPOT grows per extra sequence in the batch
    # recent load (exponentially weighted), so placement can see the batch a request will actually meet
    arrival_rate_per_second: float  # requests admitted per second
    arrival_prompt_tokens_per_second: float  # their prompt tokens per second (prefill that interleaves with decode)
    # energy figures at the current operating point (device power split by work)
    power_watts: float  # current draw of the replica's devices together
    idle_power_watts: float
    joules_per_prefill_token: float
    joules_per_decode_token: float
    # recent measured service levels (sliding window), for the governor's slack
    ttft_p99_seconds: float
    tpot_p99_seconds: float
    requests_completed: int
    #: an upstream endpoint left out after failures (placement skips it until it is re-admitted)
    ejected: bool


class Engine(abc.ABC):
    """A loaded model that generates text. One instance per replica."""

    model_id: str
    kind: ModelKind
    context_length: int
    #: OpenAI's system_fingerprint: set only by an engine that promises the same request with the
    #: same seed gives the same text (it changes with anything that could change that text); None
    #: (the default) tells clients a seed promises nothing here
    system_fingerprint: str | None = None
    #: how its token counts are obtained (TokenCountMethod), when its events do not say (they do where
    #: it varies by request: an upstream server that sends usage or not)
    token_counts_method: str | None = None

    def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """Tokens the prompt occupies after templating (used for context checks and routing).

        An engine that tokenizes locally (llama.cpp, simulated) overrides this and returns the exact
        count. One that cannot count before sending (an upstream server) keeps this default, None:
        the server enforces its own context and reports prompt tokens in its usage, which the
        engine then gives in its EngineEvents; check_fits() skips the local check.
        """
        return None

    def check_fits(self, request: GenerationRequest) -> int | None:
        """Raise ContextLengthError if prompt + max_tokens exceeds the context; return prompt tokens.

        None when this engine cannot count the prompt locally (see count_prompt_tokens).
        """
        n = self.count_prompt_tokens(request)
        if n is None:
            return None
        wanted = 1 if request.params.max_tokens is None else request.params.max_tokens
        if n + wanted > self.context_length:
            raise ContextLengthError(n, wanted, self.context_length)
        return n

    def resolve_max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """The client's max_tokens, or DEFAULT_MAX_TOKENS capped at the context left after the prompt."""
        if request.params.max_tokens is not None:  # 0 is a prompt scored, not generated from (echo)
            return request.params.max_tokens
        return max(1, min(DEFAULT_MAX_TOKENS, self.context_length - prompt_tokens))

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Yield events; the last has finished=True. Cancel by closing the iterator."""

    def stats(self) -> ReplicaStats:
        """Live load and energy figures for placement and the governor (see ReplicaStats)."""
        return ReplicaStats(running=0, waiting=0)

    def take_unreported_work(self, request_id: str) -> EngineEvent | None:
        """The work a request stopped before its first event had already handed on, once; None: none.

        A generation cancelled before it yielded anything has no counts in the replica, but its backend
        may already be working on it: an upstream server that was sent the prompt is prefilling it. The
        replica asks here when its client leaves so that work is charged. Engines whose first event
        comes as soon as they take the prompt (llama.cpp) keep this default.
        """
        return None

    async def close(self) -> None:
        """Free the model."""


#: A model's `engine` in the config -> "module:function" that builds that engine for one replica,
#: called as function(model, config, state_dir, devices, replica_index) -> Engine. The config's
#: allowed engine names are these keys. Entries name the module instead of importing it so that
#: reading a config does not load llama.cpp (vLLM's model registry is lazy for the same reason).
#: Adding an engine: one new module with an Engine subclass and its builder, and one line here.
ENGINE_BUILDERS: dict[str, str] = {
    "llamacpp": "scheduler.engines.llamacpp:build_llamacpp_engine",
    "simulated": "scheduler.engines.simulated:build_simulated_replica_engine",
    "openai": "scheduler.engines.openai_upstream:build_upstream_engine",
}
#: how an engine honours response_format (JSON mode): "grammar" constrains its own sampling (a model's
#: supports_json defaults to true), "upstream" passes it to the server, which must honour it (llama.cpp's
#: server and vLLM do; supports_json defaults to false until the operator says so); an engine absent here
#: cannot (the simulator generates no real text), and supports_json: true on it is a config error
ENGINE_JSON_MODE: dict[str, str] = {"llamacpp": "grammar", "openai": "upstream"}

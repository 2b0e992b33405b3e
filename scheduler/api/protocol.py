"""OpenAI-compatible request and response models, plus Wattlane's extension fields.

Kept apart from serving logic (as vLLM does): this module only describes shapes. Unknown request
fields are ignored, as OpenAI-compatible servers do, so newer clients keep working; fields we know
but cannot honour (n > 1, best_of > 1, image content, tools, a completion's suffix) are rejected with a
clear 400, never ignored: a client that asked for them would take a plain answer for theirs.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


def _first_invalid_text(value: Any, path: str) -> tuple[str, str, int] | None:
    """(path, text, index) of the first string in a JSON value holding a lone UTF-16 surrogate.

    JSON's \\uD800 escapes can spell half of a surrogate pair; Python keeps it as a code point that
    no UTF-8 encoder (tokenizers, llama.cpp, the ledger) accepts, so it must stop at validation.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, value, exc.start
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_invalid_text(item, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, dict):
        for k, item in value.items():
            found = _first_invalid_text(k, path) or _first_invalid_text(item, f"{path}.{k}" if path else str(k))
            if found:
                return found
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = _first_invalid_text(data, "")
        if found is None:
            return data
        path, text, index = found
        # one error at the exact field, e.g. loc ("messages[0].content",): the envelope's param
        raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
            type=PydanticCustomError(
                "invalid_unicode",
                "text is not valid Unicode: a lone surrogate U+{code} at character {index}; send UTF-8 text "
                "(a JSON \\uD800-\\uDFFF escape must be half of a surrogate pair)",
                {"code": f"{ord(text[index]):04X}", "index": index},
            ),
            loc=(path or "body",), input=text,
        )])


class Slo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"content part type '{p.type}' is not supported; only text parts are")
            parts.append(p.text)
        return "".join(parts)


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: the schema the answer must follow (OpenAI's structured outputs)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    # "schema" would shadow BaseModel.schema(): the field is schema_, spelled "schema" on the wire
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    # the schema says what the validator checks (json_schema comes with type json_schema), so that clients and
    # schema-driven tools generate valid requests; the validator keeps the message plain
    model_config = ConfigDict(extra="ignore", json_schema_extra={"anyOf": [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"properties": {"type": {"const": "json_schema"}}, "required": ["json_schema"]}]})
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return self

    def constraint(self) -> dict[str, Any] | None:
        """What the engine is asked for (SamplingParams.response_format): None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        assert self.json_schema is not None
        return {"type": "json_schema", "json_schema": self.json_schema.model_dump(by_alias=True, exclude_none=True)}


class WattlaneControls(_Request):
    """Extension fields (sent by OpenAI clients through extra_body)."""

    min_quality: Annotated[float, Field(ge=0, le=1)] | None = None
    slo: Slo | None = None
    priority: Literal["interactive", "batch"] | None = None
    max_energy_joules: Annotated[float, Field(gt=0)] | None = None


class _SamplingFields(WattlaneControls):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    #: token id (as a string, as JSON keys are) -> bias added to its logit, in [-100, 100]
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > 300:
            raise ValueError("at most 300 tokens may be biased")
        for key in v:
            if not key.isdigit():
                raise ValueError(f"keys are token ids (non-negative integers), got {key!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return items


def _not_supported(message: str) -> Any:
    """A validator that refuses a field we know but cannot honour (an empty list or null asks for nothing)."""
    def check(v: Any) -> Any:
        if v:
            raise ValueError(message)
        return v
    return check


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    #: each output token's log-probability in choices[].logprobs.content, with top_logprobs alternatives
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    #: the legacy spelling of tools
    functions: list[Any] | None = None

    _no_tools = field_validator("tools", "functions")(_not_supported(
        "tools (function calling) are not supported: no configured engine returns tool calls, so the answer "
        "would silently be plain text; remove the field"))

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


#: a token id of the named model's vocabulary (strict: true or "5" is not one)
TokenId = Annotated[int, Field(strict=True, ge=0)]


class CompletionRequest(_SamplingFields):
    #: text, a list of one text, or token ids of the named model (a list of ints, or a list of one such list);
    #: the lengths are in the schema so that clients and schema-driven tools make prompts that are accepted
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)])
    #: 0 with echo: the prompt alone (scored, with logprobs), as OpenAI's legacy completions allowed
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    #: each output token's log-probability in choices[].logprobs, with this many alternatives (0-5); with
    #: echo, the prompt's tokens' too
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    #: checked when absent too: max_tokens 0 needs it
    echo: Annotated[bool, Field(validate_default=True)] = False
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    suffix: str | None = None

    _no_suffix = field_validator("suffix")(_not_supported(
        "suffix (text insertion) is not supported: no configured engine fills in text before a suffix; remove the field"))

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind_of_prompt(cls, v: Any) -> Any:
        # checked here, so that a bad one is named plainly instead of by each member of the union it missed
        def is_id(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def whole(x: Any) -> Any:  # JSON's integer includes 5.0; true and "5" stay what they are
            return int(x) if isinstance(x, float) and x.is_integer() else x

        if not isinstance(v, list):
            return v
        v = [[whole(y) for y in x] if isinstance(x, list) else whole(x) for x in v]
        if not v or (all(isinstance(x, (str, list)) for x in v) and len(v) != 1):
            raise ValueError("exactly one prompt per request is supported")
        ids = v[0] if isinstance(v[0], list) else v
        if not all(isinstance(x, str) for x in v) and not all(is_id(x) for x in ids):
            raise ValueError("a prompt is text, a list of one text, or token ids (a list of integers, or a list "
                             "holding one such list)")
        if isinstance(v[0], list) and not ids:
            raise ValueError("the token-id prompt is empty")
        if ids and all(is_id(x) for x in ids) and (min(ids) < 0 or max(ids) >= 2**31):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"token ids are 0 to 2^31 - 1 (a vocabulary's indices); got {bad}")
        return v

    def prompt_token_ids(self) -> list[int] | None:
        """The prompt's token ids when it was given as ids, else None (text)."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], list):
            return list(self.prompt[0])
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int):
            return list(self.prompt)  # type: ignore[arg-type]
        return None

    @field_validator("echo")
    @classmethod
    def _something_to_answer(cls, v: bool, info: ValidationInfo) -> bool:
        if info.data.get("max_tokens") == 0 and not v:
            raise ValueError("max_tokens 0 generates nothing: it is for scoring a prompt (echo: true, with logprobs "
                             "for its tokens' log-probabilities); otherwise set max_tokens to 1 or more")
        return v

    def effective_max_tokens(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens
        return self.max_tokens if self.max_tokens is not None else 16


class RouteExplainRequest(WattlaneControls):
    # the route checks "exactly one of messages or prompt"; the schema says so too
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "oneOf": [{"required": ["messages"], "not": {"required": ["prompt"]}},
                  {"required": ["prompt"], "not": {"required": ["messages"]}}]})

    model: str = "auto"
    messages: list[ChatMessage] | None = None
    prompt: str | list[str] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    #: JSON mode narrows the models routing may pick
    response_format: ResponseFormat | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise ValueError("route explain reads the prompt as text: routing's predictor reads words, and token ids "
                             "are one model's (a completion with token ids goes to the model it names)")
        return v


# --- response pieces -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_block(
    prompt_tokens: int, completion_tokens: int, energy: dict[str, Any] | None, carbon: dict[str, Any] | None,
    prompt_tokens_method: str | None = None, completion_tokens_method: str | None = None,
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if prompt_tokens_method is not None:
        usage["prompt_tokens_method"] = prompt_tokens_method
    if completion_tokens_method is not None:
        usage["completion_tokens_method"] = completion_tokens_method
    if energy is not None:
        usage["energy"] = energy
    if carbon is not None:
        usage["carbon"] = carbon
    return usage


# --- response models (what the routes send; they also describe it in /openapi.json) ------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnergyUsage(_Response):
    """usage.energy: the joules this request used, and how they were obtained."""

    joules: float | None = Field(description="dynamic_joules + idle_joules")
    dynamic_joules: float | None
    idle_joules: float | None
    method: str | None = Field(
        description="nvml-counter, rapl (measured); cpu-estimate or another named estimate; simulated")
    scope: str | None = Field(description="what the figure covers: gpu, cpu, cpu+dram; an upstream estimate "
                                          "for a server on both CPU and GPUs: cpu+gpu")
    device: str | None


class CarbonUsage(_Response):
    """usage.carbon: gCO2e = joules / 3.6e6 x PUE x grid intensity."""

    gco2e: float
    intensity_gco2e_per_kwh: float
    pue: float
    source: str
    region: str


_TOKENS_METHOD = ("how the count was obtained: tokenizer or server (counted); simulated; request-hint; "
                  "utf8-bytes-estimate or stream-chunk-estimate (estimated: an upstream server sent no usage)")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_method: str | None = Field(default=None, description=_TOKENS_METHOD)
    completion_tokens_method: str | None = Field(default=None, description=_TOKENS_METHOD)
    energy: EnergyUsage | None = None
    carbon: CarbonUsage | None = None


class Routing(_Response):
    """Where the request ran and why."""

    model: str
    device: str | None
    node: str | None
    reason: str


class ChatMessageOut(_Response):
    role: Literal["assistant"]
    content: str


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = Field(None, description="with logprobs: true, each output token's log-probability")


class CompletionLogprobs(_Response):
    """Parallel lists, one entry per token: the echoed prompt's tokens first (with echo), then the output's.
    The prompt's first token has null in token_logprobs and top_logprobs: nothing before it predicts it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class ChatCompletionResponse(_Response):
    id: str = Field(description="the request id: also the X-Request-Id header and the ledger's request_id")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    routing: Routing
    system_fingerprint: str | None = Field(
        None, description="the engine's build and settings when it promises that a seed reproduces the output; "
                          "null where it does not (docs: Reproducible output)")


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = Field(
        None, description="with logprobs: N, each output token's log-probability (with echo, the prompt's tokens' first)")


class CompletionResponse(_Response):
    id: str = Field(description="the request id: also the X-Request-Id header and the ledger's request_id")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    routing: Routing
    system_fingerprint: str | None = Field(
        None, description="the engine's build and settings when it promises that a seed reproduces the output; "
                          "null where it does not (docs: Reproducible output)")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    wattlane: dict[str, Any] = Field(
        description="kind (router or the model's kind), engine, context_length, params_b, devices, and "
                    "supports_json (whether it follows response_format)")


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelInfo]


#: what a streamed response is: `data: <chunk JSON>` events, then `data: [DONE]`
SSE_DESCRIPTION = ("With stream=true: server-sent events, one `data: <chunk>` per piece of text (chunks carry the "
                   "same id as the X-Request-Id header, and routing), the final chunk carries usage.energy and "
                   "usage.carbon when stream_options.include_usage is set, then `data: [DONE]`.")

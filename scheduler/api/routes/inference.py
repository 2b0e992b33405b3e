"""POST /v1/chat/completions, /v1/completions and /v1/route/explain: thin handlers over api.serving.

Each handler turns its validated body into a Job (one function, generation_request, for every
endpoint), hands it to the Serving object, and renders the result as OpenAI JSON or an SSE stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from scheduler.api.auth import Principal, require
from scheduler.api.errors import AUTH_ERRORS, ApiError, error_responses
from scheduler.api.serving import InferenceResult, Job, StreamSession
from scheduler.api.protocol import (
    SSE_DESCRIPTION,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    RouteExplainRequest,
    usage_block,
)
from scheduler.api.request_ids import attempt_id, request_id_of
from scheduler.api.schemas import RouteExplanation
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams, TokenLogprob

router = APIRouter()
#: 200 is JSON, or with stream=true an SSE stream (the handlers return the Response themselves)
#: OpenAPI 3.1 reads an event stream's schema as the schema of one event (data, event, id, retry)
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "contentMediaType": "application/json",
             "description": "one chunk as JSON (chat.completion.chunk or text_completion), or [DONE] at the end"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}
_INFERENCE_200 = {"description": "The completion; " + SSE_DESCRIPTION,
                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}}
_INFERENCE_ERRORS = error_responses(400, *AUTH_ERRORS, 404, 413, 429, 503)


def _controls(body: Any) -> dict[str, Any]:
    """The request's own routing controls; API-key defaults are merged by the router."""
    out: dict[str, Any] = {}
    for name in ("min_quality", "priority", "max_energy_joules"):
        value = getattr(body, name)
        if value is not None:
            out[name] = value
    if body.slo is not None:
        out["slo"] = body.slo.model_dump(exclude_none=True)
    return out


def _params(body: Any) -> SamplingParams:
    if isinstance(body, RouteExplainRequest):  # nothing runs: only the length matters to routing
        return SamplingParams(max_tokens=body.max_tokens, response_format=body.response_format.constraint()
                              if body.response_format is not None else None)
    return SamplingParams(
        max_tokens=body.effective_max_tokens(),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=list(body.stop or []),
        # chat: logprobs is a bool and top_logprobs the alternatives; completions: logprobs is the alternatives
        return_logprobs=body.logprobs is not None and body.logprobs is not False,
        top_logprobs=(body.top_logprobs or 0) if isinstance(body, ChatCompletionRequest) else (body.logprobs or 0),
        prompt_logprobs=bool(getattr(body, "echo", False)) and body.logprobs is not None,
        response_format=fmt.constraint() if (fmt := getattr(body, "response_format", None)) is not None else None,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
    )


def generation_request(body: Any, request_id: str) -> GenerationRequest:
    """The one mapping from a chat, completion or route-explain body to what an engine runs (and routing reads)."""
    if getattr(body, "messages", None) is not None:
        try:
            # OpenAI's newer "developer" role is the system prompt to every chat template we run
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages", code="unsupported_content") from None
        return GenerationRequest(request_id=request_id, kind=ModelKind.CHAT, messages=messages, params=_params(body))
    ids = body.prompt_token_ids() if isinstance(body, CompletionRequest) else None
    if ids is not None:
        return GenerationRequest(request_id=request_id, kind=ModelKind.COMPLETION, prompt_token_ids=ids,
                                 params=_params(body))
    prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt or [])
    return GenerationRequest(request_id=request_id, kind=ModelKind.COMPLETION, prompt=prompt, params=_params(body))


#: W3C Trace Context headers (https://www.w3.org/TR/trace-context/) a caller's span is carried in
TRACE_HEADERS = ("traceparent", "tracestate")


def _job(body: Any, request_id: str, principal: Principal, request: Request | None = None) -> Job:
    trace = {h: request.headers[h] for h in TRACE_HEADERS if h in request.headers} if request is not None else {}
    return Job(request_id=request_id, model=body.model, request=generation_request(body, attempt_id(request_id)),
               api_key_id=principal.key_id, team=principal.team, controls=_controls(body),
               key_defaults=dict(principal.defaults), quota=principal.quota, trace_context=trace)


def _headers(result_or_session: Any, job: Job) -> dict[str, str]:
    routing = result_or_session.routing
    headers = {"X-Wattlane-Model": routing["model"]}
    if job.admission is not None:  # x-wattlane-budget-warning when a budget of the caller runs low
        headers.update(job.admission.header())
    if routing.get("device"):
        headers["X-Wattlane-Device"] = str(routing["device"])
    return headers


def _energy_headers(result: InferenceResult) -> dict[str, str]:
    h = {}
    if result.energy is not None and result.energy.joules is not None:
        h["X-Wattlane-Energy-Joules"] = f"{result.energy.joules:.6g}"
    if result.carbon is not None and result.carbon.gco2e is not None:
        h["X-Wattlane-Carbon-gCO2e"] = f"{result.carbon.gco2e:.6g}"
    return h


#: the stages of Server-Timing, in the order a request passes them (what each measures: README, "headers")
TIMING_STAGES = ("route", "replica", "engine", "energy", "accounting")


def server_timing(stage_seconds: dict[str, float], accepted_monotonic_s: float) -> str:
    """The W3C Server-Timing header (https://www.w3.org/TR/server-timing/): each measured stage and the
    gateway's total, in milliseconds, so a client (or a browser's network panel) sees where the time went."""
    total_s = time.monotonic() - accepted_monotonic_s
    parts = [f"{name};dur={stage_seconds[name] * 1000:.3f}" for name in TIMING_STAGES if name in stage_seconds]
    parts.append(f"total;dur={total_s * 1000:.3f}")
    return ", ".join(parts)


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


#: (text, finish_reason, the log-probabilities of text's tokens or None when the client asked for none) -> a choice
ChoiceFn = Callable[[str, "str | None", "list[TokenLogprob] | None"], dict[str, Any]]


def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """choices[].logprobs of a chat completion (or chunk): one entry per token, with its alternatives."""
    if entries is None:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes),
                         "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(b)} for a, lp, b in t.top]}
                        for t in entries], "refusal": None}


def _chat_choice(text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text} if finish_reason is None else {}, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = _chat_logprobs(logprobs)
    return choice


class _CompletionLogprobs:
    """choices[].logprobs of a legacy completion: tokens, their logprobs, alternatives and character offsets.

    Offsets count from the start of the returned text (the echoed prompt included) across a stream's chunks:
    the prompt's tokens (with echo and logprobs) from 0, the output's from the end of the echoed prompt."""

    def __init__(self, echoed_chars: int, alternatives: int, prompt_scored: bool):
        self.offset = 0 if prompt_scored else echoed_chars
        self.echoed_chars = echoed_chars
        self.alternatives = alternatives
        self.in_output = not prompt_scored

    def __call__(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for t in entries:
            if not t.in_prompt and not self.in_output:
                # the prompt's pieces decoded one by one need not add up to its text (a leading space the
                # tokenizer adds, a character split across tokens): the output starts where the prompt ends
                self.offset, self.in_output = self.echoed_chars, True
            offsets.append(self.offset)
            self.offset += len(t.token)
        return {"tokens": [t.token for t in entries], "token_logprobs": [t.logprob for t in entries],
                "top_logprobs": [None if t.logprob is None else {a: lp for a, lp, _ in t.top} for t in entries]
                if self.alternatives else None,
                "text_offset": offsets}


def _completion_choice_fn(logprobs: _CompletionLogprobs | None, prefix_with_prompt_logprobs: str | None = None,
                          prefix_from_prompt_tokens: bool = False) -> ChoiceFn:
    """A choice maker; `prefix_with_prompt_logprobs`: the echoed prompt, sent with its tokens' logprobs (the first
    entries, in_prompt), in the first chunk that has them, or with the finish when there are none;
    `prefix_from_prompt_tokens` (a prompt given as token ids): the echoed prompt is the text those entries spell."""
    echoing = prefix_with_prompt_logprobs is not None or prefix_from_prompt_tokens
    pending = [prefix_with_prompt_logprobs] if echoing else []

    def choice(text: str, finish_reason: str | None, entries: list[TokenLogprob] | None = None) -> dict[str, Any]:
        if pending and ((entries and entries[0].in_prompt) or finish_reason is not None):
            prefix = pending.pop()
            if prefix is None:
                # bytes first: a character split across two tokens is whole in the echoed text
                prefix = b"".join(t.token_bytes for t in entries or [] if t.in_prompt).decode("utf-8", "replace")
                if logprobs is not None:
                    logprobs.echoed_chars = len(prefix)
            text = prefix + text
        lp = logprobs(entries or []) if logprobs is not None and entries is not None else None
        return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": lp}
    return choice


async def _respond(request: Request, job: Job, *, stream: bool, include_usage: bool, obj: str,
                   message: Callable[[InferenceResult], dict[str, Any]], chunk: ChoiceFn, opening: dict[str, Any] | None):
    """Run the job and answer as JSON, or as an SSE stream of `obj`.chunk objects."""
    serving = request.app.state.serving
    if not stream:
        result = await serving.run(job)
        payload = {
            "id": job.request_id, "object": obj, "created": result.created_s, "model": result.model,
            "choices": [message(result)],
            "usage": _usage(result),
            "routing": result.routing, "system_fingerprint": result.system_fingerprint,
        }
        return JSONResponse(payload, headers={**_headers(result, job), **_energy_headers(result),
                                              "Server-Timing": server_timing(result.timings, job.accepted_monotonic_s)})
    session = await serving.open(job)
    chunk_obj = obj + ".chunk" if obj == "chat.completion" else obj
    return StreamingResponse(_stream(session, include_usage, chunk_obj, chunk, opening), media_type="text/event-stream",
                             headers={**_headers(session, job), "Cache-Control": "no-cache"})


async def _stream(session: StreamSession, include_usage: bool, obj: str, chunk: ChoiceFn,
                  opening: dict[str, Any] | None) -> AsyncIterator[bytes]:
    base = {"id": session.job.request_id, "object": obj, "created": int(session.started_s), "model": session.routed.model,
            "routing": session.routing, "system_fingerprint": session.system_fingerprint}
    if opening is not None:
        yield _sse({**base, "choices": [opening]})
    want_logprobs = session.job.request.params.return_logprobs
    try:
        async for text in session.deltas():
            yield _sse({**base, "choices": [chunk(text, None, session.take_logprobs() if want_logprobs else None)]})
    except ApiError as exc:  # headers are gone: report in-band, as OpenAI does
        yield _sse(exc.body())
        yield b"data: [DONE]\n\n"
        return
    result = session.result
    assert result is not None
    final = {**base, "choices": [chunk("", result.finish_reason, session.take_logprobs() if want_logprobs else None)]}
    if include_usage:
        _attach_footprint(final, result)
    yield _sse(final)
    if include_usage:
        yield _sse({**base, "choices": [],
                    "usage": _usage(result)})
    yield b"data: [DONE]\n\n"


def _usage(result: InferenceResult) -> dict[str, Any]:
    return usage_block(result.prompt_tokens, result.completion_tokens, result.usage_energy(), result.usage_carbon(),
                       result.prompt_tokens_method, result.completion_tokens_method)


def _attach_footprint(final_chunk: dict[str, Any], result: InferenceResult) -> None:
    """Put the energy and carbon on the chunk that carries finish_reason, where client libraries keep them.

    The usage chunk after it has them too (usage.energy, usage.carbon), but LiteLLM rebuilds a streamed
    usage from the token counts, and LangChain keeps only token counts of it. From the finish_reason
    chunk, LiteLLM keeps top-level fields it does not know (chunk.energy, chunk.carbon) and LangChain
    keeps the choice's `logprobs` object (response_metadata["logprobs"]); Wattlane returns no token
    logprobs, so that object's OpenAI keys stay null and the figures ride beside them.
    """
    footprint = {k: v for k, v in (("energy", result.usage_energy()), ("carbon", result.usage_carbon())) if v is not None}
    if not footprint:
        return
    final_chunk.update(footprint)
    choice = final_chunk["choices"][0]
    logprobs = choice.get("logprobs") or ({"content": None, "refusal": None} if final_chunk["object"].startswith("chat.") else {})
    choice["logprobs"] = {**logprobs, **footprint}


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: _INFERENCE_200, **_INFERENCE_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(require("client"))):
    job = _job(body, request_id_of(request), principal, request)
    return await _respond(
        request, job, stream=body.stream, include_usage=_include_usage(body), obj="chat.completion",
        message=lambda r: {"index": 0, "message": {"role": "assistant", "content": r.text},
                           "finish_reason": r.finish_reason, "logprobs": _chat_logprobs(r.token_logprobs)},
        chunk=_chat_choice,
        opening={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
    )


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: _INFERENCE_200, **_INFERENCE_ERRORS})
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(require("client"))):
    job = _job(body, request_id_of(request), principal, request)
    params = job.request.params
    by_ids = job.request.prompt_token_ids is not None
    if by_ids and body.model == "auto":
        raise ApiError(400, "a token-id prompt is in one model's vocabulary: name that model instead of 'auto' "
                            "(GET /v1/models lists them)", param="model", code="invalid_value")
    if by_ids and body.echo and not params.prompt_logprobs:
        raise ApiError(400, "echo of a token-id prompt needs logprobs (its text comes from its scored tokens); "
                            "send logprobs: 0 or more, or the prompt as text", param="echo", code="invalid_value")
    prefix = (job.request.prompt or "") if body.echo and not by_ids else ""
    offsets = _CompletionLogprobs(len(prefix), params.top_logprobs, params.prompt_logprobs) if params.return_logprobs else None
    if params.prompt_logprobs:
        # the echoed prompt goes with its tokens' logprobs, which the engine sends with its first output
        def echoing() -> ChoiceFn:
            return _completion_choice_fn(offsets, None if by_ids else prefix, prefix_from_prompt_tokens=by_ids)

        chunk = echoing()
        message = lambda r: echoing()(r.text, r.finish_reason, r.token_logprobs)  # noqa: E731
        opening = None
    else:
        chunk = _completion_choice_fn(offsets)
        message = lambda r: chunk(prefix + r.text, r.finish_reason, r.token_logprobs)  # noqa: E731
        opening = chunk(prefix, None) if prefix else None
    return await _respond(request, job, stream=body.stream, include_usage=_include_usage(body), obj="text_completion",
                          message=message, chunk=chunk, opening=opening)


@router.post("/v1/route/explain", response_model=RouteExplanation,
             responses=error_responses(400, *AUTH_ERRORS, 413))
async def route_explain(body: RouteExplainRequest, request: Request, principal: Principal = Depends(require("client"))):
    """The routing decision for a request, without running it: candidates, predictions, reasons."""
    if (body.messages is None) == (body.prompt is None):
        raise ApiError(400, "give exactly one of 'messages' (chat) or 'prompt' (completion)", param="messages",
                       code="invalid_value")
    serving = request.app.state.serving
    controls, decision = serving.explain(_job(body, "explain", principal))
    out = decision.to_dict()
    out["object"] = "route.decision"
    out["controls"] = controls.to_dict()
    return out

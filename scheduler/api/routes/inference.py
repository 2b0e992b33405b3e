"""POST /v1/chat/completions and POST /v1/completions: OpenAI-shaped JSON and SSE streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from scheduler.api.auth import Principal, require
from scheduler.api.errors import ApiError
from scheduler.api.inference import InferenceResult, Job, StreamSession
from scheduler.api.protocol import ChatCompletionRequest, CompletionRequest, RouteExplainRequest, new_id, usage_block

router = APIRouter()


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


def _params(body: Any, max_tokens: int | None) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "stop": body.stop or [],
        "logprobs": bool(body.logprobs),
    }


def _headers(result_or_session: Any, request_id: str) -> dict[str, str]:
    routing = result_or_session.routing
    headers = {"X-Wattlane-Model": routing["model"]}
    if routing.get("device"):
        headers["X-Wattlane-Device"] = str(routing["device"])
    return headers


def _energy_headers(result: InferenceResult) -> dict[str, str]:
    h = {}
    if result.energy and result.energy.get("joules") is not None:
        h["X-Wattlane-Energy-Joules"] = f"{result.energy['joules']:.6g}"
    if result.carbon and result.carbon.get("gco2e") is not None:
        h["X-Wattlane-Carbon-gCO2e"] = f"{result.carbon['gco2e']:.6g}"
    return h


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(require("client"))):
    try:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages", code="unsupported_content") from None
    rid = new_id("chatcmpl")
    job = Job(
        request_id=rid, endpoint="chat", model=body.model, api_key_id=principal.key_id,
        controls=_controls(body), key_defaults=dict(principal.defaults),
        payload={"request_id": rid, "kind": "chat", "messages": messages,
                 "params": _params(body, body.effective_max_tokens())},
        prompt_text="\n".join(m["content"] for m in messages),
    )
    service = request.app.state.service
    if not body.stream:
        result = await service.run(job)
        payload = {
            "id": rid, "object": "chat.completion", "created": result.created_s, "model": result.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage_block(result.prompt_tokens, result.completion_tokens, result.energy, result.carbon),
            "routing": result.routing,
        }
        return JSONResponse(payload, headers={**_headers(result, rid), **_energy_headers(result)})
    session = await service.open(job)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_chat_stream(session, include_usage), media_type="text/event-stream",
                             headers={**_headers(session, rid), "Cache-Control": "no-cache"})


async def _chat_stream(session: StreamSession, include_usage: bool) -> AsyncIterator[bytes]:
    rid = session.job.request_id
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(session._t0), "model": session.routed.model,
            "routing": session.routing}
    yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    try:
        async for text in session.deltas():
            yield _sse({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
    except ApiError as exc:  # headers are gone: report in-band, as OpenAI does
        yield _sse(exc.body())
        yield b"data: [DONE]\n\n"
        return
    result = session.result
    assert result is not None
    yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": result.finish_reason}]})
    if include_usage:
        yield _sse({**base, "choices": [],
                    "usage": usage_block(result.prompt_tokens, result.completion_tokens, result.energy, result.carbon)})
    yield b"data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(require("client"))):
    rid = new_id("cmpl")
    prompt = body.prompt_text()
    job = Job(
        request_id=rid, endpoint="completion", model=body.model, api_key_id=principal.key_id,
        controls=_controls(body), key_defaults=dict(principal.defaults),
        payload={"request_id": rid, "kind": "completion", "prompt": prompt,
                 "params": _params(body, body.effective_max_tokens())},
        prompt_text=prompt,
    )
    service = request.app.state.service
    prefix = prompt if body.echo else ""
    if not body.stream:
        result = await service.run(job)
        payload = {
            "id": rid, "object": "text_completion", "created": result.created_s, "model": result.model,
            "choices": [{"index": 0, "text": prefix + result.text, "finish_reason": result.finish_reason,
                         "logprobs": None}],
            "usage": usage_block(result.prompt_tokens, result.completion_tokens, result.energy, result.carbon),
            "routing": result.routing,
        }
        return JSONResponse(payload, headers={**_headers(result, rid), **_energy_headers(result)})
    session = await service.open(job)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_completion_stream(session, include_usage, prefix), media_type="text/event-stream",
                             headers={**_headers(session, rid), "Cache-Control": "no-cache"})


async def _completion_stream(session: StreamSession, include_usage: bool, prefix: str) -> AsyncIterator[bytes]:
    rid = session.job.request_id
    base = {"id": rid, "object": "text_completion", "created": int(session._t0), "model": session.routed.model,
            "routing": session.routing}
    if prefix:
        yield _sse({**base, "choices": [{"index": 0, "text": prefix, "finish_reason": None, "logprobs": None}]})
    try:
        async for text in session.deltas():
            yield _sse({**base, "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]})
    except ApiError as exc:
        yield _sse(exc.body())
        yield b"data: [DONE]\n\n"
        return
    result = session.result
    assert result is not None
    yield _sse({**base, "choices": [{"index": 0, "text": "", "finish_reason": result.finish_reason, "logprobs": None}]})
    if include_usage:
        yield _sse({**base, "choices": [],
                    "usage": usage_block(result.prompt_tokens, result.completion_tokens, result.energy, result.carbon)})
    yield b"data: [DONE]\n\n"


@router.post("/v1/route/explain")
async def route_explain(body: RouteExplainRequest, request: Request, principal: Principal = Depends(require("client"))):
    """The routing decision for a request, without running it: candidates, predictions, reasons."""
    if (body.messages is None) == (body.prompt is None):
        raise ApiError(400, "give exactly one of 'messages' (chat) or 'prompt' (completion)", param="messages",
                       code="invalid_value")
    if body.messages is not None:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages", code="unsupported_content") from None
        payload = {"kind": "chat", "messages": messages, "params": {"max_tokens": body.max_tokens}}
        endpoint = "chat"
    else:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt or [])
        payload = {"kind": "completion", "prompt": prompt, "params": {"max_tokens": body.max_tokens}}
        endpoint = "completion"
    job = Job(request_id="explain", endpoint=endpoint, model=body.model, payload=payload,
              api_key_id=principal.key_id, controls=_controls(body), key_defaults=dict(principal.defaults))
    gw = request.app.state.gateway
    gw.ensure_refresher()
    decision = gw.router.decide(job, gw.replicas_by_model())
    out = decision.to_dict()
    out["object"] = "route.decision"
    out["controls"] = gw.router.controls(job).to_dict()
    return out

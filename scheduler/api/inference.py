"""The inference path behind the HTTP routes: choose a model, run it on a replica, account, record.

request -> route (routing.select) -> engine replica (Serve handle, streamed events) ->
attribution (joules from the node agent) -> carbon -> ledger row -> metrics -> response.
The routes turn an InferenceResult (or its stream of deltas) into OpenAI-shaped JSON or SSE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from scheduler.api.errors import ApiError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One accepted request, as the service sees it."""

    request_id: str
    endpoint: str  # "chat" | "completion"
    model: str  # requested: an id or "auto"
    payload: dict[str, Any]  # what the replica gets (kind, messages/prompt, params)
    api_key_id: str
    controls: dict[str, Any] = field(default_factory=dict)  # min_quality, slo, priority, max_energy_joules
    prompt_text: str = ""


@dataclass
class Routed:
    model: str
    reason: str
    candidates: list[str]


@dataclass
class InferenceResult:
    request_id: str
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    routing: dict[str, Any]
    energy: dict[str, Any] | None
    carbon: dict[str, Any] | None
    ttft_seconds: float | None
    tpot_seconds: float | None
    latency_seconds: float
    created_s: int
    mean_logprob: float | None = None


class StreamSession:
    """A running generation: iterate deltas, then read .result once exhausted."""

    def __init__(self, service: "InferenceService", job: Job, routed: Routed, events: Any, start: dict[str, Any],
                 first: dict[str, Any]):
        self.service, self.job, self.routed = service, job, routed
        self._events = events
        self.start = start
        self._first = first
        self.result: InferenceResult | None = None
        self.routing = {"model": routed.model, "device": start.get("device"), "node": start.get("node"),
                        "reason": routed.reason}
        self._t0 = time.time()
        self._first_token_s: float | None = None
        self._text: list[str] = []

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text pieces; ends after the result is recorded in the ledger."""
        status = "error"
        try:
            ev = self._first
            while True:
                if ev["type"] == "error":
                    raise ApiError(ev["status"], ev["message"], param=ev.get("param"), code=ev.get("code"))
                if ev.get("completion_tokens", 0) > 0 and self._first_token_s is None:
                    self._first_token_s = ev["time_s"]
                if ev.get("text"):
                    self._text.append(ev["text"])
                    yield ev["text"]
                if ev["type"] == "end":
                    self.result = await self.service.complete(self, ev)
                    status = "ok"
                    return
                ev = await self._events.__anext__()
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            if status != "ok":
                self._events.cancel()
                await self.service.record_failure(self, status)


class InferenceService:
    def __init__(self, gateway: Any):
        self.gw = gateway

    # --- routing ------------------------------------------------------------------------------
    def route(self, job: Job) -> Routed:
        return self.gw.router.route(job)

    # --- running ------------------------------------------------------------------------------
    async def open(self, job: Job) -> StreamSession:
        """Route and start the generation; raises ApiError before any byte is sent."""
        routed = self.route(job)
        handle = self.gw.model_handles[routed.model]
        self.gw.metrics_waiting(routed.model, +1)
        try:
            events = handle.options(stream=True).generate.remote(job.payload)
            start = await events.__anext__()
            first = await events.__anext__()
        except StopAsyncIteration:
            raise ApiError(503, f"model {routed.model} ended the stream without a result", code="engine_error") from None
        except ApiError:
            raise
        except Exception as exc:  # replica died, actor unavailable: capacity problem, not the client's
            log.warning("replica of %s failed for %s: %s", routed.model, job.request_id, exc)
            raise ApiError(503, f"no replica of model {routed.model} could serve the request: {type(exc).__name__}",
                           code="no_capacity", headers={"Retry-After": "5"}) from None
        finally:
            self.gw.metrics_waiting(routed.model, -1)
        if first["type"] == "error":
            raise ApiError(first["status"], first["message"], param=first.get("param"), code=first.get("code"))
        return StreamSession(self, job, routed, events, start, first)

    async def run(self, job: Job) -> InferenceResult:
        session = await self.open(job)
        async for _ in session.deltas():
            pass
        assert session.result is not None
        return session.result

    # --- accounting ---------------------------------------------------------------------------
    async def complete(self, s: StreamSession, end: dict[str, Any]) -> InferenceResult:
        latency = end["time_s"] - s._t0
        n_out = end["completion_tokens"]
        ttft = (s._first_token_s - s._t0) if s._first_token_s is not None else None
        tpot = ((end["time_s"] - s._first_token_s) / (n_out - 1)) if (s._first_token_s is not None and n_out > 1) else None
        energy = end.get("energy")
        carbon = await self.gw.carbon_for(energy, end["time_s"]) if energy else None
        result = InferenceResult(
            request_id=s.job.request_id,
            model=s.routed.model,
            text="".join(s._text),
            finish_reason=end.get("finish_reason") or "stop",
            prompt_tokens=end["prompt_tokens"],
            completion_tokens=n_out,
            routing=s.routing,
            energy=_public_energy(energy),
            carbon=carbon,
            ttft_seconds=ttft,
            tpot_seconds=tpot,
            latency_seconds=latency,
            created_s=int(s._t0),
            mean_logprob=end.get("mean_logprob"),
        )
        await self.gw.record(s.job, result, status="ok", energy_raw=energy)
        return result

    async def record_failure(self, s: StreamSession, status: str) -> None:
        result = InferenceResult(
            request_id=s.job.request_id, model=s.routed.model, text="".join(s._text), finish_reason="error",
            prompt_tokens=0, completion_tokens=0, routing=s.routing, energy=None, carbon=None,
            ttft_seconds=None, tpot_seconds=None, latency_seconds=time.time() - s._t0, created_s=int(s._t0),
        )
        try:
            await self.gw.record(s.job, result, status=status)
        except Exception:  # recording a failure must never mask the failure itself
            log.exception("could not record %s request %s", status, s.job.request_id)


def _public_energy(energy: dict[str, Any] | None) -> dict[str, Any] | None:
    if not energy:
        return None
    keys = ("joules", "dynamic_joules", "idle_joules", "method", "scope", "device")
    return {k: energy.get(k) for k in keys}

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

from ray.serve.exceptions import BackPressureError

from scheduler.api.errors import ApiError
from scheduler.api.router import Routed

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One accepted request, as the service sees it."""

    request_id: str
    endpoint: str  # "chat" | "completion"
    model: str  # requested: an id or "auto"
    payload: dict[str, Any]  # what the replica gets (kind, messages/prompt, params)
    api_key_id: str
    #: the request's own controls (min_quality, slo, priority, max_energy_joules), as sent
    controls: dict[str, Any] = field(default_factory=dict)
    #: the API key's defaults for the same controls
    key_defaults: dict[str, Any] = field(default_factory=dict)
    prompt_text: str = ""
    #: when the gateway accepted it (time.monotonic()): TTFT and latency count from here, on one clock
    accepted_monotonic_s: float = field(default_factory=time.monotonic)


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
    system_fingerprint: str | None = None


class _ReplicaFailure(Exception):
    """A replica failed before producing anything; the request may be retried elsewhere."""


class StreamSession:
    """A running generation: iterate deltas, then read .result once exhausted.

    Timing is taken on the gateway's monotonic clock when each event arrives (the engines' clocks may
    be another machine's, or simulated), so TTFT and latency are what the client saw and never negative.
    """

    def __init__(self, service: "InferenceService", job: Job, routed: Routed, events: Any, start: dict[str, Any],
                 first: dict[str, Any]):
        self.service, self.job, self.routed = service, job, routed
        self._events = events
        self.start = start
        self._first = first
        self.result: InferenceResult | None = None
        self.routing = {"model": routed.model, "device": start.get("device"), "node": start.get("node"),
                        "reason": routed.reason}
        #: None unless the engine promises that a seed reproduces the text
        self.system_fingerprint: str | None = start.get("system_fingerprint")
        self.started_s = time.time()
        #: time.monotonic() when the latest event reached the gateway (the first one just did)
        self._received_s = time.monotonic()
        self._first_token_s: float | None = None
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._text: list[str] = []

    def _seen(self, ev: dict[str, Any]) -> None:
        self._prompt_tokens = max(self._prompt_tokens, int(ev.get("prompt_tokens") or 0))
        self._completion_tokens = max(self._completion_tokens, int(ev.get("completion_tokens") or 0))
        if self._completion_tokens > 0 and self._first_token_s is None:
            self._first_token_s = self._received_s

    async def _next(self) -> dict[str, Any]:
        try:
            ev = await self._events.__anext__()
        except StopAsyncIteration:
            raise ApiError(503, f"model {self.routed.model} ended the stream without a result",
                           code="engine_error") from None
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the replica died mid-stream: answer in the envelope, not with a traceback
            raise ApiError(503, f"model {self.routed.model} failed: {type(exc).__name__}", code="engine_error") from None
        self._received_s = time.monotonic()
        return ev

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text pieces; ends after the result is recorded in the ledger.

        However it ends, the request gets a ledger row: ok (here), error (with the energy and tokens
        of the work done, before the error reaches the client) or cancelled (the client went away:
        the generation is stopped and a background task records what it cost).
        """
        status = "error"
        failure: dict[str, Any] | None = None
        try:
            ev = self._first
            while True:
                self._seen(ev)
                if ev["type"] == "error":
                    failure = ev
                    raise ApiError(ev["status"], ev["message"], param=ev.get("param"), code=ev.get("code"))
                if ev.get("text"):
                    self._text.append(ev["text"])
                    yield ev["text"]
                if ev["type"] == "end":
                    self.result = await self.service.complete(self, ev)
                    status = "ok"
                    return
                ev = await self._next()
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            if status != "ok":
                self._events.cancel()
            if status == "cancelled":
                # no await here: a cancelled task (or a closing generator) cannot wait for the ledger
                self.service.settle_abandoned(self.job, self.routing, self.started_s, self._partial())
            elif status == "error":
                await self.service.record_ended(self.job, self.routing, self.started_s, "error",
                                                failure or self._partial(), text="".join(self._text))

    def _partial(self) -> dict[str, Any]:
        """What the gateway itself saw of the work, for when the replica's own figures are missing."""
        return {"prompt_tokens": self._prompt_tokens, "completion_tokens": self._completion_tokens,
                "first_token_s": self._first_token_s}


class InferenceService:
    def __init__(self, gateway: Any):
        self.gw = gateway
        #: background tasks that record abandoned requests (kept referenced until they finish)
        self._settling: set[asyncio.Task] = set()

    # --- running ------------------------------------------------------------------------------
    async def open(self, job: Job, routed: Routed | None = None) -> StreamSession:
        """Route and start the generation; raises ApiError before any byte is sent.

        A replica that fails or times out before its first event is retried once on the next
        candidate model of the routing decision; if that fails too, 503 with the reason.
        """
        self.gw.ensure_refresher()
        routed = routed or self.gw.router.route(job, self.gw.replicas_by_model())
        attempts = [routed.model] + routed.fallback_models[:1]
        failures: list[str] = []
        for i, model in enumerate(attempts):
            try:
                events, start, first = await self._start(job, model, routed)
            except _ReplicaFailure as exc:
                failures.append(f"{model}: {exc}")
                log.warning("request %s: %s failed (%s)%s", job.request_id, model, exc,
                            "; retrying on " + attempts[i + 1] if i + 1 < len(attempts) else "")
                continue
            if model != routed.model:
                routed.reason += f"; retried on {model} after {routed.model} failed"
                routed.model = model
            session = StreamSession(self, job, routed, events, start, first)
            if first["type"] == "error":
                session._seen(first)
                await self.record_ended(job, session.routing, session.started_s, "error", first)
                raise ApiError(first["status"], first["message"], param=first.get("param"), code=first.get("code"))
            return session
        raise ApiError(503, "no replica could serve the request: " + "; ".join(failures), code="no_capacity",
                       headers={"Retry-After": "5"})

    async def _start(self, job: Job, model: str, routed: Routed) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        handle = self.gw.model_handles[model]
        start: dict[str, Any] | None = None
        try:
            with self.gw.router.starts.track(model) as started:  # admission's view of Serve's queue
                events = handle.options(stream=True).generate.remote(job.payload, placement=routed.placement)
                start = await asyncio.wait_for(events.__anext__(), self.gw.config.routing.replica_timeout_seconds)
                started()
            first = await asyncio.wait_for(events.__anext__(), self.gw.config.routing.replica_timeout_seconds)
            return events, start, first
        except asyncio.CancelledError:  # the client left while the request waited for its replica
            events.cancel()
            routing = {"model": model, "device": (start or {}).get("device"), "node": (start or {}).get("node"),
                       "reason": routed.reason}
            self.settle_abandoned(job, routing, time.time(), {})
            raise
        except StopAsyncIteration:
            raise _ReplicaFailure("ended the stream without a result") from None
        except asyncio.TimeoutError:
            events.cancel()
            raise _ReplicaFailure(f"no answer within {self.gw.config.routing.replica_timeout_seconds:g} s") from None
        except ApiError:
            raise
        except BackPressureError:
            raise _ReplicaFailure(f"queue full ({self.gw.config.model(model).max_queued_requests} requests waiting)") from None
        except Exception as exc:  # replica died, actor unavailable: a capacity problem, not the client's
            raise _ReplicaFailure(type(exc).__name__) from None

    async def run(self, job: Job) -> InferenceResult:
        routed = self.gw.router.route(job, self.gw.replicas_by_model())
        cascade = self._cascade_target(job, routed)
        if cascade:
            job.payload["params"]["logprobs"] = True
        session = await self.open(job, routed)
        async for _ in session.deltas():
            pass
        assert session.result is not None
        if cascade:
            return await self._maybe_escalate(job, routed, session.result, cascade)
        return session.result

    # --- cascade (priority "batch") --------------------------------------------------------------
    def _cascade_target(self, job: Job, routed: Routed) -> str | None:
        from scheduler.routing.cascade import cascade_applies

        nxt = routed.decision.next_model if job.model == "auto" else None
        return nxt if cascade_applies(routed.controls.priority, self.gw.config.routing, nxt) else None

    async def _maybe_escalate(self, job: Job, routed: Routed, first: InferenceResult, target: str) -> InferenceResult:
        """Run the next model when the small one was unsure; both attempts' energy is charged."""
        from scheduler.routing.cascade import should_escalate

        verdict = should_escalate(first.mean_logprob, self.gw.config.routing.cascade_min_mean_logprob,
                                  completion_tokens=first.completion_tokens)
        if not verdict.escalate:
            first.routing["reason"] += f"; cascade: kept ({verdict.reason})"
            return first
        second_job = Job(request_id=f"{job.request_id}-cascade", endpoint=job.endpoint, model=target,
                         payload={**job.payload, "request_id": f"{job.request_id}-cascade"}, api_key_id=job.api_key_id,
                         controls=job.controls, key_defaults=job.key_defaults, prompt_text=job.prompt_text)
        second = await self.run(second_job)
        second.request_id = job.request_id
        second.routing["reason"] = (f"{routed.reason}; cascade: escalated from {first.model} to {second.model} "
                                    f"({verdict.reason})")
        if first.energy and second.energy:
            for k in ("joules", "dynamic_joules", "idle_joules"):
                second.energy[k] = (first.energy.get(k) or 0.0) + (second.energy.get(k) or 0.0)
        if first.carbon and second.carbon:
            second.carbon["gco2e"] = first.carbon["gco2e"] + second.carbon["gco2e"]
        second.prompt_tokens += first.prompt_tokens
        second.completion_tokens += first.completion_tokens
        return second

    # --- accounting ---------------------------------------------------------------------------
    async def complete(self, s: StreamSession, end: dict[str, Any]) -> InferenceResult:
        n_out = end["completion_tokens"]
        ended_s = s._received_s
        latency, ttft, tpot = _timing(s.job.accepted_monotonic_s, s._first_token_s, ended_s, n_out)
        energy = end.get("energy")
        carbon = await self.gw.carbon_for(energy, time.time()) if energy else None
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
            created_s=int(s.started_s),
            mean_logprob=end.get("mean_logprob"),
            system_fingerprint=s.system_fingerprint,
        )
        await self.gw.record(s.job, result, status="ok", energy_raw=energy)
        return result

    async def record_ended(self, job: Job, routing: dict[str, Any], created_s: float, status: str,
                           outcome: dict[str, Any] | None, *, text: str = "") -> None:
        """Ledger row for a request that did not finish normally, with the energy and tokens of the work
        it did (`outcome`: an error event, or what the node agent kept for an abandoned request)."""
        outcome = outcome or {}
        ended_s = time.monotonic()
        energy = outcome.get("energy")
        first_token_s = outcome.get("first_token_s")
        latency, ttft, _ = _timing(job.accepted_monotonic_s, first_token_s, ended_s, 0)
        try:
            carbon = await self.gw.carbon_for(energy, time.time()) if energy else None
            result = InferenceResult(
                request_id=job.request_id, model=routing["model"], text=text, finish_reason=status,
                prompt_tokens=int(outcome.get("prompt_tokens") or 0),
                completion_tokens=int(outcome.get("completion_tokens") or 0), routing=routing,
                energy=_public_energy(energy), carbon=carbon, ttft_seconds=ttft, tpot_seconds=None,
                latency_seconds=latency, created_s=int(created_s),
            )
            await self.gw.record(job, result, status=status, energy_raw=energy)
        except Exception:  # recording a failure must never mask the failure itself
            log.exception("could not record %s request %s", status, job.request_id)

    def settle_abandoned(self, job: Job, routing: dict[str, Any], created_s: float, seen: dict[str, Any]) -> None:
        """Record a request its client abandoned, in the background: the replica stops it and leaves the
        energy and tokens of the work done with its node agent, which this collects for the ledger."""
        task = asyncio.get_running_loop().create_task(self._settle_abandoned(job, routing, created_s, seen),
                                                      name=f"settle-{job.request_id}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_abandoned(self, job: Job, routing: dict[str, Any], created_s: float, seen: dict[str, Any]) -> None:
        outcome: dict[str, Any] | None = None
        try:
            outcome = await self.gw.abandoned_outcome(routing.get("node"), job.request_id)
        except Exception as exc:  # the row is still written, without the energy
            log.warning("request %s: energy of the abandoned work is unknown (%s)", job.request_id, exc)
        outcome = outcome or {}
        merged = {**seen, "energy": outcome.get("energy")}
        for k in ("prompt_tokens", "completion_tokens"):  # the replica saw at least what reached the gateway
            merged[k] = max(int(seen.get(k) or 0), int(outcome.get(k) or 0))
        await self.record_ended(job, routing, created_s, "cancelled", merged)

    async def settled(self) -> None:
        """Wait until every abandoned request so far is in the ledger (shutdown, tests)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


def _timing(accepted_s: float, first_token_s: float | None, ended_s: float, completion_tokens: int
            ) -> tuple[float, float | None, float | None]:
    """(latency, TTFT, TPOT) in seconds from gateway-side monotonic times."""
    latency = max(0.0, ended_s - accepted_s)
    ttft = None if first_token_s is None else min(latency, max(0.0, first_token_s - accepted_s))
    tpot = None
    if first_token_s is not None and completion_tokens > 1:
        tpot = max(0.0, ended_s - first_token_s) / (completion_tokens - 1)
    return latency, ttft, tpot


def _public_energy(energy: dict[str, Any] | None) -> dict[str, Any] | None:
    if not energy:
        return None
    keys = ("joules", "dynamic_joules", "idle_joules", "method", "scope", "device")
    return {k: energy.get(k) for k in keys}

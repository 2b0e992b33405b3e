"""Serve one chat or completion request: choose a model, run it on a replica, account for it.

route handler -> Serving.run / Serving.open -> ModelSelection.select -> the model's deployment handle
(a GenerationRequest in, typed events out: cluster.messages) -> Accounting.record -> the result.
Serving owns the request's logic (retry on the next candidate, cascade, timing, the row every ended
request gets); the routes (api/routes/inference.py) only turn its results into OpenAI JSON or SSE.
Its dependencies are given, not looked up: tests drive it with in-process handles and no Ray.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.api.accounting import Accounting
from scheduler.api.errors import ApiError, replica_error
from scheduler.api.model_selection import ModelSelection, Routed
from scheduler.cluster.messages import (
    AbandonedWork,
    EnergyReport,
    ReplicaEnd,
    ReplicaError,
    ReplicaErrorKind,
    ReplicaEvent,
    ReplicaStart,
)
from scheduler.config import WattlaneConfig
from scheduler.energy.carbon import CarbonFootprint
from scheduler.engines.base import GenerationRequest, TokenLogprob

log = logging.getLogger(__name__)

#: a retry that lands on the endpoint it avoids (see Serving.open) tries again, at most this many times,
#: waiting this long times the count first: together longer than Serve's 1 s routing-stats period
MAX_AVOIDED_LANDINGS = 4
AVOIDED_LANDING_WAIT_SECONDS = 0.25
#: how many times a request goes back to its model after a replica answered "unavailable" or died
UNAVAILABLE_RETRIES = 2

ReplicasByModel = Callable[[], "dict[str, list[dict[str, Any]]] | None"]


@dataclass
class Job:
    """One accepted request, as the serving path sees it."""

    request_id: str
    #: requested: a model id or "auto"
    model: str
    #: what the replica gets: chat messages or a completion prompt, and the sampling parameters
    request: GenerationRequest
    api_key_id: str
    #: the API key's team (None: the key has none)
    team: str | None = None
    #: a cascade's second attempt: the request id of the first (its baseline already counts the request)
    cascade_of: str | None = None
    #: the row of a retried request's failed attempt: the request id whose own row carries its baseline
    attempt_of: str | None = None
    #: the request's own controls (min_quality, slo, priority, max_energy_joules), as sent
    controls: dict[str, Any] = field(default_factory=dict)
    #: the API key's defaults for the same controls
    key_defaults: dict[str, Any] = field(default_factory=dict)
    #: when the gateway accepted it (time.monotonic()): TTFT and latency count from here, on one clock
    accepted_monotonic_s: float = field(default_factory=time.monotonic)
    #: the caller's limits and budgets (teams.quotas.Quota), None when nothing limits it
    quota: Any = None
    #: what teams admission decided and holds for it (teams.guard.Ticket): settled with its ledger row
    admission: Any = None
    #: the caller's W3C trace context (traceparent, tracestate headers), so the request's span joins its trace
    trace_context: dict[str, str] = field(default_factory=dict)
    #: when routing had chosen its model (time.monotonic()), for the response's Server-Timing
    routed_monotonic_s: float | None = None


@dataclass
class InferenceResult:
    request_id: str
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    routing: dict[str, Any]
    #: what the node agent charged (usage.energy is its .public()); None when nothing attributed it
    energy: EnergyReport | None
    #: the energy's footprint (usage.carbon is its .as_usage()); filled in by Accounting.record
    carbon: CarbonFootprint | None
    ttft_seconds: float | None
    tpot_seconds: float | None
    latency_seconds: float
    created_s: int
    mean_logprob: float | None = None
    system_fingerprint: str | None = None
    #: how the token counts were obtained (engines.base.TokenCountMethod values): usage.*_tokens_method
    prompt_tokens_method: str | None = None
    completion_tokens_method: str | None = None
    #: seconds per stage of the request's path (route, replica, engine, energy, accounting): the
    #: response's Server-Timing header; a stage that did not run, or was not measured, is absent
    timings: dict[str, float] = field(default_factory=dict)
    #: each generated token's log-probability, when the client asked for them (None: it did not)
    token_logprobs: list[TokenLogprob] | None = None

    def usage_energy(self) -> dict[str, Any] | None:
        """usage.energy of the response (protocol.EnergyUsage)."""
        return None if self.energy is None else self.energy.public()

    def usage_carbon(self) -> dict[str, Any] | None:
        """usage.carbon of the response (protocol.CarbonUsage)."""
        return None if self.carbon is None else self.carbon.as_usage()


class _ReplicaFailure(Exception):
    """A replica failed before producing anything; the request may be retried elsewhere.

    replica_gone: the replica itself is gone (its actor died, as with its node) or cannot run anything (its
    node agent left with its node): the model's other replicas can take the request. Serve's router stops
    choosing a dead actor at once, but a live replica whose node agent left only once Serve's health probe
    has failed it: the retries ask the router to pass it over (Serving.open)."""

    def __init__(self, message: str, replica: str | None = None, replica_gone: bool = False):
        super().__init__(message)
        #: the replica that failed, when its start event named it
        self.replica = replica
        self.replica_gone = replica_gone


class StreamSession:
    """A running generation: iterate deltas, then read .result once exhausted.

    Timing is taken on the gateway's monotonic clock when each event arrives (the engines' clocks may
    be another machine's, or simulated), so TTFT and latency are what the client saw and never negative.
    """

    def __init__(self, serving: "Serving", job: Job, routed: Routed, events: Any, start: ReplicaStart,
                 first: ReplicaEvent, dispatched_s: float):
        self._serving, self.job, self.routed = serving, job, routed
        self._events = events
        self._first = first
        self.result: InferenceResult | None = None
        self.routing = _attempt_routing(routed.model, start, routed)
        #: whose node agent keeps the work if the client leaves
        self._abandoned_node = _abandoned_node(start)
        #: None unless the engine promises that a seed reproduces the text
        self.system_fingerprint: str | None = start.system_fingerprint
        self.started_s = time.time()
        #: time.monotonic() when the latest event reached the gateway (the first one just did)
        self._received_s = time.monotonic()
        #: time.monotonic() when the request went to its replica (the attempt that answered)
        self.dispatched_s = dispatched_s
        self._first_token_s: float | None = None
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._text: list[str] = []
        #: token log-probabilities received (when the client asked), and how many of them went out in chunks
        self._logprobs: list[TokenLogprob] = []
        self._logprobs_sent = 0
        self._end: ReplicaEnd | None = None
        self._recording: asyncio.Task | None = None

    def _record_finished(self) -> asyncio.Task:
        """The finished request's ledger row, written once, in a task the serving object tracks to the end."""
        if self._recording is None:
            self._recording = self._serving._in_background(self._serving._complete(self, self._end),
                                                           f"record-{self.job.request_id}")
        return self._recording

    def take_logprobs(self) -> list[TokenLogprob]:
        """The token log-probabilities received since the last call (a streamed chunk carries its tokens')."""
        out = self._logprobs[self._logprobs_sent:]
        self._logprobs_sent = len(self._logprobs)
        return out

    def _seen(self, ev: ReplicaEvent) -> None:
        logprobs = getattr(ev, "token_logprobs", None)
        if logprobs:
            self._logprobs.extend(logprobs)
        self._prompt_tokens = max(self._prompt_tokens, getattr(ev, "prompt_tokens", 0))
        self._completion_tokens = max(self._completion_tokens, getattr(ev, "completion_tokens", 0))
        if self._completion_tokens > 0 and self._first_token_s is None:
            # without deltas the first token never arrived on its own: date it back from the end event
            self._first_token_s = self._received_s - (getattr(ev, "first_token_to_end_seconds", None) or 0.0)

    async def _next(self) -> ReplicaEvent:
        model = self.routed.model
        try:
            ev = await self._events.__anext__()
        except StopAsyncIteration:
            raise replica_error(ReplicaErrorKind.ENGINE, f"model {model} ended the stream without a result") from None
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the replica died mid-stream: answer in the envelope, not with a traceback
            raise replica_error(ReplicaErrorKind.ENGINE, f"model {model} failed: {type(exc).__name__}") from None
        self._received_s = time.monotonic()
        return ev

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text pieces; ends after the result is recorded in the ledger.

        However it ends, the request gets a ledger row: ok (here), error (with the energy and tokens
        of the work done, before the error reaches the client) or cancelled (the client went away:
        the generation is stopped and a background task records what it cost).
        """
        status = "error"
        failure: ReplicaError | None = None
        try:
            ev = self._first
            while True:
                self._seen(ev)
                if isinstance(ev, ReplicaError):
                    failure = ev
                    raise replica_error(ev.kind, ev.message, ev.param)
                if isinstance(ev, ReplicaEnd):
                    self._end = ev  # the work is done: from here on the request's row is the finished one
                if ev.text:
                    self._text.append(ev.text)
                    yield ev.text
                if isinstance(ev, ReplicaEnd):
                    # shielded: a client that leaves now must not stop the row of work that is finished
                    self.result = await asyncio.shield(self._record_finished())
                    status = "ok"
                    return
                ev = await self._next()
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            if status != "ok":
                self._events.cancel()
            if status == "cancelled" and self._end is not None:
                self._record_finished()  # finished work whose client left: one row, the finished one
            elif status == "cancelled":
                # no await here: a cancelled task (or a closing generator) cannot wait for the ledger
                self._serving._settle_abandoned(self.job, self.routing, self.started_s, self._prompt_tokens,
                                                self._completion_tokens, self._first_token_s, self._abandoned_node)
            elif status == "error":
                await self._serving._record_ended(
                    self.job, self.routing, self.started_s, "error",
                    prompt_tokens=failure.prompt_tokens if failure else self._prompt_tokens,
                    completion_tokens=failure.completion_tokens if failure else self._completion_tokens,
                    energy=failure.energy if failure else None, first_token_s=self._first_token_s,
                    text="".join(self._text), counted=failure)


class Serving:
    """The serving object: its dependencies are explicit (see the module docstring)."""

    def __init__(self, config: WattlaneConfig, selection: ModelSelection, accounting: Accounting,
                 handles: Mapping[str, Any], replicas_by_model: ReplicasByModel = lambda: None,
                 on_request: Callable[[], None] = lambda: None, teams: Any = None):
        self.config = config
        #: teams admission (teams.guard.TeamGuard): limits and budgets before routing; None: none configured
        self.teams = teams
        self.selection = selection
        self.accounting = accounting
        #: model id -> its deployment handle (Serve's DeploymentHandle, or an in-process stand-in)
        self.handles = handles
        self._replicas_by_model = replicas_by_model
        #: called on every request (the gateway starts its device refresher lazily)
        self._on_request = on_request
        #: model id -> (its handle, that handle with stream=True)
        self._stream_handles: dict[str, tuple[Any, Any]] = {}
        #: background tasks that record abandoned requests (kept referenced until they finish)
        self._settling: set[asyncio.Task] = set()

    def select(self, job: Job) -> Routed:
        self._on_request()
        routed = self.selection.select(job, self._replicas_by_model())
        if self.selection.quality_budget is not None:
            self.accounting.metrics.set_quality_budget(self.selection.quality_budget.state())
        return routed

    async def _admitted(self, job: Job) -> Routed:
        """select(), behind the caller's limits and budgets (429, or a downgraded route) when it has any."""
        if self.teams is None or job.quota is None:
            routed = self.select(job)
        else:
            routed = await self.teams.admit(job, self.select)
        job.routed_monotonic_s = time.monotonic()
        return routed

    def explain(self, job: Job) -> tuple[Any, Any]:
        """(controls, decision) for /v1/route/explain: the same selection, without running anything."""
        self._on_request()
        return self.selection.explain(job, self._replicas_by_model())

    # --- running ------------------------------------------------------------------------------
    async def open(self, job: Job, routed: Routed | None = None, deltas: bool = True) -> StreamSession:
        """Route and start the generation; raises ApiError before any byte is sent.

        deltas=False asks the replica for the whole text in its end event (run() does: a non-streaming
        answer needs nothing earlier), so the session yields it as one piece.

        A replica that fails or times out before its first event is retried once: on another endpoint of
        the same model when it is an upstream model with more than one (that replica is avoided), else on
        the next candidate model of the routing decision; if that fails too, 503 with the reason. An
        upstream replica that answers with an engine error before any token is retried the same way. A
        replica that answers "unavailable" (its node left; it generated nothing), or whose actor died, is
        retried on its own model, whose other replicas can take the request (up to UNAVAILABLE_RETRIES
        times, besides the one retry).
        """
        routed = routed or await self._admitted(job)
        failures: list[str] = []
        model, avoid = routed.model, []
        #: replicas that answered "unavailable" (their node left): Serve's router keeps offering them, by their
        #: last published stats, until its controller notices, so the retries ask it to pass them over
        gone: list[str] = []
        attempt = landings = unavailable_retries = tries = 0
        first_attempt_id = job.request.request_id
        while attempt < 2:
            if tries:  # each attempt is work of its own to its replica and node agent: its own id there
                job.request = replace(job.request, request_id=f"{first_attempt_id}-retry{tries}")
            tries += 1
            try:
                dispatched_s = time.monotonic()
                events, start, first = await self._start(job, model, routed, deltas, avoid + gone)
                if isinstance(first, ReplicaError) and first.kind is ReplicaErrorKind.UNAVAILABLE:
                    raise _ReplicaFailure(first.message, start.replica, replica_gone=True)
            except _ReplicaFailure as exc:
                failures.append(f"{model}: {exc}")
                if exc.replica_gone and unavailable_retries < UNAVAILABLE_RETRIES:
                    unavailable_retries += 1
                    if exc.replica and exc.replica not in gone:
                        gone.append(exc.replica)
                    log.warning("request %s: a replica of %s is gone (%s); retrying on %s", job.request_id, model,
                                exc, model)
                    continue
                retry = self._retry_target(routed, model, exc.replica) if attempt == 0 else None
                log.warning("request %s: %s failed (%s)%s", job.request_id, model, exc,
                            f"; retrying on {retry[0]}" if retry else "")
                if retry is None:
                    break
                model, avoid = retry
                attempt += 1
                continue
            failed_early = (isinstance(first, ReplicaError) and first.kind == ReplicaErrorKind.ENGINE
                            and first.completion_tokens == 0 and self._is_upstream(model))
            if failed_early and start.replica in avoid and landings < MAX_AVOIDED_LANDINGS:
                # Serve's FIFO router gives a free replica to the oldest waiting request whatever that request's
                # hint said, so until its next stats period shows the failed endpoint ejected a retry can land
                # there again: that is not the retry on another endpoint yet
                landings += 1
                await self._record_failed_attempt(job, model, start, first, routed)
                await asyncio.sleep(AVOIDED_LANDING_WAIT_SECONDS * landings)
                continue
            if attempt == 0 and failed_early:
                retry = self._retry_target(routed, model, start.replica)
                if retry is not None:
                    failures.append(f"{model}: {first.message}")
                    log.warning("request %s: %s failed before any token (%s); retrying on %s",
                                job.request_id, start.replica, first.message, retry[0])
                    await self._record_failed_attempt(job, model, start, first, routed)
                    model, avoid = retry
                    attempt += 1
                    continue
            if model != routed.model:
                routed.reason += f"; retried on {model} after {routed.model} failed"
                routed.model = model
            elif avoid:
                routed.reason += f"; retried on another endpoint after {', '.join(avoid)} failed"
            elif failures:
                routed.reason += f"; retried after {failures[-1]}"
            session = StreamSession(self, job, routed, events, start, first, dispatched_s)
            if isinstance(first, ReplicaError):
                session._seen(first)
                await self._record_ended(job, session.routing, session.started_s, "error",
                                         prompt_tokens=first.prompt_tokens, completion_tokens=first.completion_tokens,
                                         energy=first.energy, counted=first)
                earlier = f" (first attempt: {'; '.join(failures)})" if failures else ""
                raise replica_error(first.kind, first.message + earlier, first.param)
            return session
        if job.admission is not None:
            job.admission.release()  # nothing ran: the request holds no limit or budget
        raise ApiError(503, "no replica could serve the request: " + "; ".join(failures), code="no_capacity",
                       headers={"Retry-After": "5"})

    def _stream_handle(self, model: str) -> Any:
        """The model's handle with stream=True, made once: options() builds a new handle on every call."""
        base = self.handles[model]
        cached = self._stream_handles.get(model)
        if cached is None or cached[0] is not base:
            cached = self._stream_handles[model] = (base, base.options(stream=True))
        return cached[1]

    async def _record_failed_attempt(self, job: Job, model: str, start: ReplicaStart, first: ReplicaError,
                                     routed: Routed) -> None:
        """An attempt that failed before any token and is retried: the work it did is charged, in a row of its own."""
        await self._charge_attempt(job, _attempt_routing(model, start, routed), start.time_s, first.prompt_tokens, 0,
                                   first.energy, first)

    async def _charge_attempt(self, job: Job, routing: dict[str, Any], created_s: float, prompt_tokens: int,
                              completion_tokens: int, energy: EnergyReport | None,
                              counted: ReplicaError | AbandonedWork) -> None:
        """A retried attempt's work, in an "error" row of its own; none for an attempt that did no work (a row
        counts as a request)."""
        if energy is not None and energy.joules > 0:
            # admission=None: the request's ticket settles once, with the row of the attempt that ends it
            await self._record_ended(replace(job, request_id=f"{job.request_id}-failed-attempt", admission=None,
                                             attempt_of=job.request_id),
                                     routing, created_s, "error", prompt_tokens=prompt_tokens,
                                     completion_tokens=completion_tokens, energy=energy, counted=counted)

    def _is_upstream(self, model: str) -> bool:
        m = self.config.model(model)
        return m is not None and m.engine == "openai"

    def _retry_target(self, routed: Routed, model: str, failed_replica: str | None) -> tuple[str, list[str]] | None:
        """Where a failed first attempt goes: another endpoint of an upstream model (endpoints fail one by
        one, where a local model's replicas share one host), else the next candidate model, else nowhere."""
        m = self.config.model(model)
        if self._is_upstream(model) and m is not None and m.replicas > 1:
            return model, [failed_replica] if failed_replica else []
        nxt = routed.fallback_models[:1]
        return (nxt[0], []) if nxt and nxt[0] != model else None

    async def _start(self, job: Job, model: str, routed: Routed, deltas: bool = True,
                     avoid: list[str] | None = None
                     ) -> tuple[Any, ReplicaStart, ReplicaEvent]:
        """Call the model: (its events, the request's start, the first event after the start).

        A request without deltas (non-streaming) is one unary call, ModelServer.generate_whole, whose answer is
        its end event: a streaming call costs the gateway and the replica more Ray work even for one item. It
        then has to be answered within replica_timeout_seconds, and the gateway hears of its start only with its
        end. So it stays a stream, whose start event comes once it has run START_EVENT_DELAY_SECONDS
        (cluster/replica.py), with admission "slo", which predicts waits from how fast Serve starts requests,
        and for an upstream model, whose replica sends its start at once when no node agent meters the
        server's host: the start says where the estimate of an abandoned request's work is kept."""
        from ray.serve.exceptions import BackPressureError

        timeout_s = self.config.routing.replica_timeout_seconds
        start: ReplicaStart | None = None
        try:
            with self.selection.starts.track(model) as started:  # admission's view of Serve's queue
                placement = {**routed.placement, "avoid_replicas": avoid} if avoid else routed.placement
                if deltas or self.config.routing.admission == "slo" or self._is_upstream(model):
                    events = self._stream_handle(model).generate.remote(job.request, placement=placement,
                                                                        deltas=deltas)
                else:  # one unary call: its answer is the end event, carrying the start (see the docstring)
                    events = _WholeAnswer(self.handles[model].generate_whole.remote(job.request, placement=placement))
                # asyncio.timeout, not wait_for: wait_for (Python 3.11) wraps the wait in a task of its own,
                # one more task and loop round on every request
                async with asyncio.timeout(timeout_s):
                    item = await events.__anext__()
                # a request without deltas that ended soon sends one event, its end, carrying its start
                start = item if isinstance(item, ReplicaStart) else getattr(item, "start", None)
                if start is None:
                    raise _ReplicaFailure(f"answered {type(item).__name__} before its start")
                started()
            if item is not start:
                return events, start, item
            async with asyncio.timeout(timeout_s):
                return events, start, await events.__anext__()
        except asyncio.CancelledError:  # the client left while the request waited for its replica
            events.cancel()
            self._settle_abandoned(job, _attempt_routing(model, start, routed), time.time(), 0, 0, None,
                                   _abandoned_node(start))
            raise
        except StopAsyncIteration:
            raise _ReplicaFailure("ended the stream without a result", start.replica if start else None) from None
        except asyncio.TimeoutError:
            events.cancel()
            # the replica stops the attempt and leaves its work with the node agent: charged in a row of its own
            # (on a copy of the job: the retry gives its request an id of its own while this runs)
            self._in_background(self._settle_timed_out(replace(job), _attempt_routing(model, start, routed),
                                                       _abandoned_node(start)), f"settle-{job.request.request_id}")
            raise _ReplicaFailure(f"no answer within {timeout_s:g} s", start.replica if start else None) from None
        except ApiError:
            raise
        except BackPressureError:
            raise _ReplicaFailure(f"queue full ({self.config.model(model).max_queued_requests} requests waiting)") from None
        except Exception as exc:  # replica died, actor unavailable: a capacity problem, not the client's
            from ray.exceptions import RayActorError

            raise _ReplicaFailure(type(exc).__name__, replica_gone=isinstance(exc, RayActorError)) from None

    async def run(self, job: Job) -> InferenceResult:
        routed = await self._admitted(job)
        cascade = self._cascade_target(job, routed)
        if cascade:
            job.request.params.logprobs = True
        session = await self.open(job, routed, deltas=False)
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
        if job.request.params.max_tokens == 0:  # a prompt scored (echo): no answer to judge, nothing to escalate
            return None
        return nxt if cascade_applies(routed.controls.priority, self.config.routing, nxt) else None

    async def _maybe_escalate(self, job: Job, routed: Routed, first: InferenceResult, target: str) -> InferenceResult:
        """Run the next model when the small one was unsure; both attempts' energy is charged."""
        from scheduler.routing.cascade import should_escalate

        verdict = should_escalate(first.mean_logprob, self.config.routing.cascade_min_mean_logprob,
                                  completion_tokens=first.completion_tokens)
        if not verdict.escalate:
            first.routing["reason"] += f"; cascade: kept ({verdict.reason})"
            return first
        second_id = f"{job.request_id}-cascade"
        second_job = Job(request_id=second_id, model=target,
                         request=replace(job.request, request_id=f"{job.request.request_id}-cascade"),
                         api_key_id=job.api_key_id, team=job.team, cascade_of=job.request_id,
                         controls=job.controls, key_defaults=job.key_defaults, quota=job.quota,
                         trace_context=job.trace_context)
        try:
            second = await self.run(second_job)
        except ApiError as exc:
            if exc.status != 429:
                raise
            # the caller's limits or budgets allow no second attempt: the first answer stands
            first.routing["reason"] += f"; cascade: not escalated ({exc.message})"
            return first
        second.request_id = job.request_id
        second.routing["reason"] = (f"{routed.reason}; cascade: escalated from {first.model} to {second.model} "
                                    f"({verdict.reason})")
        if first.energy and second.energy:
            a, b = first.energy, second.energy
            second.energy = replace(b, joules=a.joules + b.joules, dynamic_joules=a.dynamic_joules + b.dynamic_joules,
                                    idle_joules=a.idle_joules + b.idle_joules, work_tokens=a.work_tokens + b.work_tokens)
        if first.carbon and second.carbon:
            second.carbon = replace(second.carbon, gco2e=first.carbon.gco2e + second.carbon.gco2e)
        second.prompt_tokens += first.prompt_tokens
        second.completion_tokens += first.completion_tokens
        second.prompt_tokens_method = _joined(first.prompt_tokens_method, second.prompt_tokens_method)
        second.completion_tokens_method = _joined(first.completion_tokens_method, second.completion_tokens_method)
        return second

    # --- accounting (one Accounting.record per ended request) -------------------------------------
    async def _complete(self, s: StreamSession, end: ReplicaEnd) -> InferenceResult:
        latency, ttft, tpot = _timing(s.job.accepted_monotonic_s, s._first_token_s, s._received_s,
                                      end.completion_tokens)
        result = InferenceResult(
            request_id=s.job.request_id,
            model=s.routed.model,
            text="".join(s._text),
            finish_reason=end.finish_reason or "stop",
            prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            routing=s.routing,
            energy=end.energy,
            carbon=None,
            ttft_seconds=ttft,
            tpot_seconds=tpot,
            latency_seconds=latency,
            created_s=int(s.started_s),
            mean_logprob=end.mean_logprob,
            system_fingerprint=s.system_fingerprint,
            prompt_tokens_method=end.prompt_tokens_method,
            completion_tokens_method=end.completion_tokens_method,
            timings=_stage_seconds(s, end),
            token_logprobs=list(s._logprobs) if s.job.request.params.return_logprobs else None,
        )
        accounting_started_s = time.monotonic()
        result = await self.accounting.record(s.job, result, "ok", end.energy)
        result.timings["accounting"] = time.monotonic() - accounting_started_s
        return result

    async def _record_ended(self, job: Job, routing: dict[str, Any], created_s: float, status: str, *,
                            prompt_tokens: int, completion_tokens: int, energy: EnergyReport | None,
                            first_token_s: float | None = None, text: str = "",
                            counted: ReplicaError | AbandonedWork | None = None) -> None:
        """Ledger row for a request that did not finish normally, with the energy and tokens of the work it did
        (and, from the replica's error event or abandoned work `counted`, how those tokens were counted)."""
        latency, ttft, _ = _timing(job.accepted_monotonic_s, first_token_s, time.monotonic(), 0)
        result = InferenceResult(
            request_id=job.request_id, model=routing["model"], text=text, finish_reason=status,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, routing=routing,
            energy=energy, carbon=None, ttft_seconds=ttft, tpot_seconds=None,
            latency_seconds=latency, created_s=int(created_s),
            prompt_tokens_method=counted.prompt_tokens_method if counted else None,
            completion_tokens_method=counted.completion_tokens_method if counted else None,
        )
        try:
            await self.accounting.record(job, result, status, energy)
        except Exception:  # recording a failure must never mask the failure itself
            log.exception("could not record %s request %s", status, job.request_id)

    def _settle_abandoned(self, job: Job, routing: dict[str, Any], created_s: float, prompt_tokens: int,
                          completion_tokens: int, first_token_s: float | None, node: str | None) -> None:
        """Record a request its client abandoned, in the background: the replica stops it and leaves the
        energy and tokens of the work done with the agent of `node` under the attempt's id
        (job.request.request_id), which this collects for the ledger."""
        self._in_background(self._settle(job, routing, created_s, prompt_tokens, completion_tokens, first_token_s,
                                         node), f"settle-{job.request_id}")

    async def _settle_timed_out(self, job: Job, routing: dict[str, Any], node: str | None) -> None:
        """An attempt the gateway stopped (no answer in time; the request went on to a retry): the work it did,
        if any, is charged in a row of its own, as a failed attempt's is."""
        try:
            work = await self.accounting.abandoned_work(node, job.request.request_id)
        except Exception as exc:
            log.warning("request %s: energy of the attempt that timed out is unknown (%s)", job.request_id, exc)
            return
        if work is not None:  # None: it never ran
            await self._charge_attempt(job, routing, time.time(), work.prompt_tokens, work.completion_tokens,
                                       work.energy, work)

    def _in_background(self, coro: Any, name: str) -> asyncio.Task:
        """A ledger write that must finish whatever happens to the request's own task (shutdown waits for it).

        It runs in a fresh context: Ray finds the task that makes a remote call through a context
        variable, and when a client leaves it cancels the calls of that request's task, a background
        task created from it included (the abandoned work's energy was lost that way)."""
        task = asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle(self, job: Job, routing: dict[str, Any], created_s: float, prompt_tokens: int,
                      completion_tokens: int, first_token_s: float | None, node: str | None) -> None:
        work = None
        try:
            work = await self.accounting.abandoned_work(node, job.request.request_id)
        except Exception as exc:  # the row is still written, without the energy
            log.warning("request %s: energy of the abandoned work is unknown (%s)", job.request_id, exc)
        # the replica saw at least what reached the gateway; its counts' methods hold where its counts stand
        replica_counts = (work is not None and work.prompt_tokens >= prompt_tokens
                          and work.completion_tokens >= completion_tokens)
        await self._record_ended(
            job, routing, created_s, "cancelled",
            prompt_tokens=max(prompt_tokens, work.prompt_tokens if work else 0),
            completion_tokens=max(completion_tokens, work.completion_tokens if work else 0),
            energy=work.energy if work else None, first_token_s=first_token_s,
            counted=work if replica_counts else None)

    async def settled(self) -> None:
        """Wait until every abandoned request so far is in the ledger (shutdown, tests)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


def _attempt_routing(model: str, start: ReplicaStart | None, routed: Routed) -> dict[str, Any]:
    """An attempt's `routing` (its row's model, device and node; the latter two unknown before its start)."""
    return {"model": model, "device": start.device if start else None, "node": start.node if start else None,
            "reason": routed.reason}


def _abandoned_node(start: ReplicaStart | None) -> str | None:
    """Whose node agent keeps an attempt's work when it is stopped (None before its start: any agent's)."""
    return (start.abandoned_node or start.node) if start else None


class _WholeAnswer:
    """A unary call's answer in the shape of a replica's event stream: one event, then the end."""

    def __init__(self, response: Any):
        self._response = response
        self._answered = False

    def __aiter__(self) -> "_WholeAnswer":
        return self

    async def __anext__(self) -> ReplicaEvent:
        if self._answered:
            raise StopAsyncIteration
        self._answered = True
        return await self._response

    def cancel(self) -> None:
        self._response.cancel()


def _joined(first: str | None, second: str | None) -> str | None:
    """The method of a sum of two counts: theirs if they agree, else both names ("tokenizer+server")."""
    return first if first == second else "+".join(m or "unknown" for m in (first, second))


def _timing(accepted_s: float, first_token_s: float | None, ended_s: float, completion_tokens: int
            ) -> tuple[float, float | None, float | None]:
    """(latency, TTFT, TPOT) in seconds from gateway-side monotonic times."""
    latency = max(0.0, ended_s - accepted_s)
    ttft = None if first_token_s is None else min(latency, max(0.0, first_token_s - accepted_s))
    tpot = None
    if first_token_s is not None and completion_tokens > 1:
        tpot = max(0.0, ended_s - first_token_s) / (completion_tokens - 1)
    return latency, ttft, tpot


def _stage_seconds(session: StreamSession, end: ReplicaEnd) -> dict[str, float]:
    """The finished request's stages on the gateway's clock, and the two its replica measured on its own."""
    job = session.job
    stages: dict[str, float] = {}
    if job.routed_monotonic_s is not None:
        stages["route"] = max(0.0, job.routed_monotonic_s - job.accepted_monotonic_s)
    # from the handle call to the end event: Serve's queue and transport both ways, the engine, the energy
    stages["replica"] = max(0.0, session._received_s - session.dispatched_s)
    if end.engine_seconds is not None:
        stages["engine"] = end.engine_seconds
    if end.energy_seconds is not None:
        stages["energy"] = end.energy_seconds
    return stages

"""The model replica: a Ray Serve deployment that hosts one Engine and reports its work for attribution.

It takes an engines.base.GenerationRequest and streams typed events back (cluster.messages: start,
deltas, then end or error; an error has a kind, and the gateway alone picks the HTTP status), and it
tells the node agent which device its work ran on, so the agent can share each metering interval's
joules among the requests that ran in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import serve

from scheduler.cluster import runtime
from scheduler.cluster.agent_link import AgentLink
from scheduler.cluster.messages import (
    AbandonRequest,
    EnergyReport,
    ReplicaDelta,
    ReplicaEnd,
    ReplicaError,
    ReplicaErrorKind,
    ReplicaEvent,
    ReplicaStart,
    ReplicaStats,
    RequestFinish,
    RequestProgress,
    RequestStart,
)
from scheduler.config import ModelConfig, WattlaneConfig
from scheduler.engines.base import (
    ContextLengthError,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    GenerationRequest,
    ModelKind,
    RequestRejectedError,
)

log = logging.getLogger(__name__)

#: how often a running request reports its cumulative work to the node agent
PROGRESS_INTERVAL_SECONDS = 0.1
#: how long a request's start waits to travel with its engine's first event (the prompt it took on)
#: before it goes alone: the agent counts a queued request as running, and a parked device wakes for it
START_REPORT_DELAY_SECONDS = 0.05
#: how long after its engine's first event a request's start goes to the agent (with the work done by
#: then), unless the request has ended by then: its finish carries the start, one message instead of two
START_WITH_WORK_DELAY_SECONDS = 0.01
#: how long a request without deltas runs before its start goes to the gateway as an event of its own;
#: one that ends sooner sends one event, its end carrying its start (each event is a Ray round)
START_EVENT_DELAY_SECONDS = 0.05
#: stands in the engine's events for "the start event is due" (see _with_start_due)
_START_DUE = object()
#: how long a replica waits before it tries again to connect to its node agent's link
LINK_RETRY_SECONDS = 10.0
#: how often, at most, the replica pushes its stats to the node agent
STATS_PUSH_INTERVAL_SECONDS = 0.1
#: how long Serve's health probe waits for the node agent (it answers at once unless its node is gone)
HEALTH_TIMEOUT_SECONDS = 5.0
#: how long a replica that found its node agent gone keeps itself out of Serve's routing (its routing stats
#: say "ejected"), unless the health probe finds the agent back sooner; Serve's router would otherwise keep
#: offering it, by its last published stats, until the probe has failed it three times
AGENT_GONE_EJECT_SECONDS = 30.0


class SurplusReplicaError(RuntimeError):
    """Serve gave a replica a rank past its model's last GPU group or endpoint (see check_rank_has_a_slot)."""


def check_rank_has_a_slot(model: ModelConfig, rank: int) -> None:
    """Refuse a rank with no GPU group (simulated engine) or endpoint (upstream engine) of its own.

    Serve starts the replacement of a failed replica before the failed one has stopped, and releases a
    rank only once its replica has stopped, so the replacement can get rank `replicas` (one past the
    last). Taken modulo, it would double up on replica 0's GPUs or endpoint, and when Serve later
    renumbers it, it would keep them: the failed replica's GPUs or endpoint would never be served again,
    even after its node comes back. Refused, Serve retries it until the old rank is free.
    """
    bound = model.engine == "simulated" or bool(model.endpoints)
    if bound and rank >= model.replicas:
        raise SurplusReplicaError(
            f"replica rank {rank} of model {model.id}: the model has {model.replicas} "
            f"{'endpoint' if model.endpoints else 'GPU group'}(s), ranks 0-{model.replicas - 1}; Serve is "
            "replacing a replica that has not stopped yet and retries this one once its rank is free")


def devices_for_replica(model: ModelConfig, rank: int) -> list[str]:
    """A local-engine replica runs on one of its model's devices, spread by rank; an upstream replica's
    work runs on its endpoint's devices."""
    if model.endpoints:
        return list(model.endpoints[rank % len(model.endpoints)].devices)
    return [model.devices[rank % len(model.devices)]]


def same_slot(model: ModelConfig, rank_a: int, rank_b: int) -> bool:
    """Whether two ranks of a local or upstream model serve the same endpoint or device (ranks share them modulo)."""
    n = len(model.endpoints) if model.endpoints else len(model.devices)
    return n == 0 or rank_a % n == rank_b % n


def resolve_endpoint_devices(agent: Any, model: ModelConfig, rank: int, names: list[str]) -> list[str]:
    """An upstream replica's device names as its node's agent knows them: NVML indices and GPU UUIDs exist
    only there. A GPU the node lacks fails the replica's start with the agent's message (endpoint, GPU)."""
    from scheduler.devices.resolve import is_node_local_name

    if not any(is_node_local_name(n) for n in names):
        return names
    endpoint = model.endpoints[rank % len(model.endpoints)]
    return list(ray.get(agent.resolve_devices.remote(names, f"{endpoint.base_url} of model {model.id}")))


def _token_methods(engine: Any, ev: EngineEvent | None) -> dict[str, str | None]:
    """How an event's token counts were obtained: its own labels, else its engine's (none before any event)."""
    default = getattr(engine, "token_counts_method", None) if ev is not None else None
    return {"prompt_tokens_method": getattr(ev, "prompt_tokens_method", None) or default,
            "completion_tokens_method": getattr(ev, "completion_tokens_method", None) or default}


def _estimated_energy(engine: Any, prompt_tokens: int, completion_tokens: int) -> EnergyReport | None:
    """No meter on the work's node: an engine that can estimate its energy (upstream) labels its own figure."""
    estimate = getattr(engine, "estimate_energy", None)
    return estimate(prompt_tokens or 0, completion_tokens or 0) if estimate is not None else None


class _AgentReports:
    """One request's messages to its node agent, each one-way but the last.

    The start goes START_WITH_WORK_DELAY_SECONDS after the engine's first event, carrying the work done
    by then (the prompt's tokens, and any token since), or alone after START_REPORT_DELAY_SECONDS if the
    engine has not started it by then. A request that ends before its start went sends one message:
    the finish, which carries the start (with the latest counts) and the final counts; the agent starts
    a request it never heard of before finishing it, and ignores a start it already has. Short requests
    are most requests, and a message the agent handles while the engine decodes takes CPU from it.
    Progress follows at most every PROGRESS_INTERVAL_SECONDS. They go over the agent link (one
    connection: in order) or, when it is down, as Ray calls (Ray delivers one caller's calls to an
    actor in order too).
    """

    def __init__(self, agent: Any, link: AgentLink | None, start: RequestStart):
        self.agent = agent
        self.link = link
        self.start = start
        self.started = False
        self.last_report_s = start.t_s
        self._timer = asyncio.get_running_loop().call_later(START_REPORT_DELAY_SECONDS, self._send_start)

    def _send(self, msg: RequestStart | RequestProgress) -> None:
        if self.link is not None:
            try:
                self.link.send(msg)
                return
            except ConnectionError:
                self.link = None
        if isinstance(msg, RequestStart):
            self.agent.start_request.remote(msg)
        else:
            self.agent.progress.remote(msg)

    def _send_start(self) -> None:
        self._timer.cancel()
        self.started = True
        self._send(self.start)

    def progress(self, ev: Any) -> None:
        """A running request's engine event (not its last)."""
        if not self.started:
            if self.start.progress_t_s is None:  # the engine's first event: the start goes soon, not now
                self._timer.cancel()
                self._timer = asyncio.get_running_loop().call_later(START_WITH_WORK_DELAY_SECONDS, self._send_start)
            self.last_report_s = ev.time_s
            self.start = replace(self.start, prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                 progress_t_s=ev.time_s)
        elif ev.time_s - self.last_report_s >= PROGRESS_INTERVAL_SECONDS:
            self.last_report_s = ev.time_s
            self._send(RequestProgress(self.start.request_id, ev.prompt_tokens, ev.completion_tokens, ev.time_s))

    def finish(self, t_s: float, prompt_tokens: int, completion_tokens: int) -> RequestFinish:
        self._timer.cancel()
        return RequestFinish(self.start.request_id, t_s, prompt_tokens, completion_tokens, start=self.start)

    async def energy(self, msg: RequestFinish) -> EnergyReport | None:
        """The agent's answer to the finish: over the link, or a Ray call if the link is down or breaks."""
        if self.link is not None:
            try:
                return await self.link.call(msg)
            except ConnectionError as exc:
                log.warning("agent link lost (%s); request %s goes through Ray", exc, msg.request_id)
        try:
            return await self.agent.finish_request.remote(msg)
        except ray.exceptions.RayError as exc:
            log.warning("node agent could not attribute %s: %s", msg.request_id, exc)
            return None

    def abandon(self, msg: RequestFinish, energy: EnergyReport | None) -> None:
        if self.link is not None:
            try:
                self.link.send(AbandonRequest(msg, energy))
                return
            except ConnectionError:
                pass
        # outside this request's context, or Ray cancels the call along with the request it belongs to
        contextvars.Context().run(self.agent.abandon_request.remote, msg, energy)


async def whole_answer(events: AsyncIterator[ReplicaEvent]) -> ReplicaEnd | ReplicaError:
    """A request's events without deltas, as one answer: its last event (end or error), carrying its start."""
    start: ReplicaStart | None = None
    last: ReplicaEnd | ReplicaError | None = None
    async for ev in events:
        if isinstance(ev, ReplicaStart):
            start = ev
        elif isinstance(ev, (ReplicaEnd, ReplicaError)):
            last = ev
    if last is None:
        raise RuntimeError("the request ended without an answer")
    return last if last.start is not None or start is None else replace(last, start=start)


async def _with_start_due(events: AsyncIterator[EngineEvent], delay_s: float) -> AsyncIterator[Any]:
    """An engine's events, with _START_DUE among them once delay_s has passed (at once, not at the next event:
    an engine may be silent a long while, behind other requests or in a long prompt)."""
    due_mono = time.monotonic() + delay_s
    while (remaining_s := due_mono - time.monotonic()) > 0:
        nxt = asyncio.ensure_future(anext(events, None))
        try:
            done, _ = await asyncio.wait((nxt,), timeout=remaining_s)
            if not done:
                yield _START_DUE
            ev = await nxt
        finally:
            if not nxt.done():  # cancelled: the engine stops where it waits, before its events are closed
                nxt.cancel()
                await asyncio.wait((nxt,))
        if ev is None:
            return
        yield ev
        if not done:
            break
    else:
        yield _START_DUE
    async for ev in events:
        yield ev


def node_for_replica(model: ModelConfig, rank: int) -> str:
    """Where the replica's work runs: its upstream endpoint's node when named, else this process's node."""
    if model.endpoints:
        return model.endpoints[rank % len(model.endpoints)].node or runtime.node_name()
    return runtime.node_name()


class ModelServer:
    """Deployment class; cluster.serve_app.build_app() turns it into one Serve deployment per model."""

    def __init__(self, model: dict[str, Any], config: dict[str, Any], state_dir: str):
        runtime.configure_process_logging()
        self.config = WattlaneConfig.model_validate(config)
        self.model = ModelConfig.model_validate(model)
        self.state_dir = Path(state_dir)
        ctx = serve.get_replica_context()
        here = runtime.this_node()
        self.ray_node_id = here.node_id if here is not None else None
        self._apply(self._bind(ctx.rank.rank if getattr(ctx, "rank", None) is not None else 0))
        self._joules_per_work_token: float | None = None
        self._push_stats()
        log.info("replica %s ready on %s (%s)", self.replica_id, self.node, ",".join(self.device_ids))

    def _bind(self, rank: int, current: Any = None) -> dict[str, Any]:
        """What rank `rank` gives this replica: its id, its devices, the node its work runs on, that node's agent
        and the engine (blocking: Ray calls). `current`: the engine now running, kept when the rank's slot is the
        one it already serves (the same endpoint, device or simulated GPU group)."""
        check_rank_has_a_slot(self.model, rank)
        if self.model.engine == "simulated":
            from scheduler.cluster.sim_host import (
                AgentHostedEngine,
                agent_for_simulated_replica,
                replica_simulated_devices,
            )

            if current is not None and replica_simulated_devices(self.model, self.config, rank) == self.device_ids:
                engine, node, agent = current, self.node, self.agent
            else:
                # the work runs where the simulated GPUs are: that node's agent hosts the engine and meters it
                node, agent = agent_for_simulated_replica(self.model, self.config, rank)
                engine = AgentHostedEngine(agent, self.model.model_dump(mode="json"), rank)
            device_ids = engine.device_ids
        else:
            device_ids = devices_for_replica(self.model, rank)
            node = node_for_replica(self.model, rank)
            # the agent of the node the work runs on meters its devices (an upstream server's host may have none)
            agent = runtime.get_node_agent(node)
            if self.model.endpoints and agent is not None:
                device_ids = resolve_endpoint_devices(agent, self.model, rank, device_ids)
            if current is not None and same_slot(self.model, rank, self.rank):
                engine = current
            else:
                from scheduler.engines.factory import build_engine

                engine = build_engine(self.model, self.config, self.state_dir, replica_index=rank)
        home_node = home_agent = None
        if agent is None and self.model.endpoints:
            # no agent on the server's host: this process's own node agent publishes the replica's stats to the
            # gateway and keeps the engine's estimate of a request whose client leaves (ReplicaStart.abandoned_node)
            home_node = runtime.node_name()
            home_agent = runtime.get_node_agent(home_node)
        return {"rank": rank, "replica_id": f"{self.model.id}#{rank}", "device_ids": list(device_ids), "node": node,
                "agent": agent, "engine": engine, "home_node": home_node, "home_agent": home_agent}

    def _apply(self, binding: dict[str, Any]) -> None:
        for name, value in binding.items():
            setattr(self, name, value)

    async def reconfigure(self, user_config: Any = None, rank: Any = None) -> None:
        """Follow the rank Serve gives this replica (Serve calls this at start and when the rank changes).

        Scaling in, Serve stops the replicas it likes best to stop, whatever their rank, then renumbers the
        others to close the gaps. A replica keeps its slot (endpoint, GPU group, device) by its rank, so one
        that kept its old slot under a new rank would share it with the next replica given that old rank
        when Serve scales out again, and leave another slot idle. So a renumbered replica moves: new requests
        go to the new rank's slot at once, and the old engine closes once the requests it runs have ended."""
        new_rank = getattr(rank, "rank", rank)
        if new_rank is None or new_rank == self.rank:
            return
        old_id, old_engine, old_agent = self.replica_id, self.engine, self._publishing_agent()
        binding = await asyncio.to_thread(self._bind, int(new_rank), old_engine)
        log.info("replica %s is now %s (Serve renumbered it): %s on %s", old_id, binding["replica_id"],
                 ",".join(binding["device_ids"]), binding["node"])
        moved_agent = binding["agent"] is not self.agent
        self._apply(binding)
        if moved_agent:  # the link leads to the old agent: reconnect to the new one on the next request
            if self._link is not None:
                self._link.close()
            self._link, self._link_retry_s = None, 0.0
        if old_agent is not None:
            try:
                await asyncio.wait_for(old_agent.replica_gone.remote(old_id), HEALTH_TIMEOUT_SECONDS)
            except Exception as exc:
                log.info("replica %s: node agent not told of the renumbering: %s", old_id, type(exc).__name__)
        self._stats_pushed_s = float("-inf")
        self._push_stats()
        if old_engine is not self.engine:
            self._retire(old_engine)

    def _retire(self, engine: Any) -> None:
        """Close an engine this replica no longer routes to, once its last request has ended."""
        self._retiring[id(engine)] = engine
        self._close_if_idle(engine)

    def _engine_request_ended(self, engine: Any) -> None:
        left = self._engine_requests[id(engine)] - 1
        if left:
            self._engine_requests[id(engine)] = left
        else:
            del self._engine_requests[id(engine)]
            self._close_if_idle(engine)

    def _close_if_idle(self, engine: Any) -> None:
        if id(engine) not in self._engine_requests and self._retiring.pop(id(engine), None) is not None:
            asyncio.get_running_loop().create_task(engine.close(), context=contextvars.Context())

    def _push_stats(self) -> None:
        """Tell the node agent (governor, gateway routing) how loaded this replica is now.

        At most one push per STATS_PUSH_INTERVAL_SECONDS: its readers look once a second, and a push per
        request start and end would put two actor calls on every request's path. A change inside the
        interval goes out in one trailing push at its end, so the last state is always published.
        """
        agent = self._publishing_agent()
        if agent is None:
            return
        wait_s = getattr(self, "_stats_pushed_s", float("-inf")) + STATS_PUSH_INTERVAL_SECONDS - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the constructor: no loop yet, push now
            wait_s = 0.0
        if wait_s <= 0:
            self._stats_pushed_s = time.monotonic()
            self._send_stats(agent, self.record_routing_stats())
        elif not getattr(self, "_stats_push_pending", False):
            self._stats_push_pending = True
            loop.call_later(wait_s, self._push_trailing_stats)

    def _send_stats(self, agent: Any, stats: dict[str, Any]) -> None:
        """Over the agent link when it reaches this agent (a frame), else a Ray call."""
        link = self._link if agent is self.agent else None
        if link is not None and link.usable_here():
            try:
                link.send(ReplicaStats(self.replica_id, stats))
                return
            except ConnectionError:
                pass
        agent.replica_stats.remote(self.replica_id, stats)

    def _publishing_agent(self) -> Any:
        """The agent the replica's stats go to: its work's node's, else (an upstream server's host without one)
        its own node's, so that the gateway's routing hears of every replica."""
        return self.agent if self.agent is not None else self.home_agent

    def _push_trailing_stats(self) -> None:
        self._stats_push_pending = False
        self._push_stats()

    async def ready(self) -> dict[str, Any]:
        return {"model": self.model.id, "replica": self.replica_id, "devices": self.device_ids, "node": self.node}

    def record_routing_stats(self) -> dict[str, Any]:
        """Published to Serve's request router (see routing/serve_router.py) and the node agent."""
        stats = dict(self.engine.stats())
        stats.update(model_id=self.model.id, replica_id=self.replica_id, device_ids=self.device_ids, node=self.node)
        if "joules_per_decode_token" not in stats and self._joules_per_work_token is not None:
            # engines that cannot predict their own energy (llama.cpp) publish what the meter measured
            weight = self.config.energy.prefill_token_weight
            stats["joules_per_decode_token"] = self._joules_per_work_token
            stats["joules_per_prefill_token"] = self._joules_per_work_token * weight
        if time.monotonic() < self._agent_gone_until_s:
            stats["ejected"] = True  # the router passes it over (routing/serve_router.py)
        ejected = stats.get("ejected")
        agent = self._publishing_agent()
        if agent is not None and ejected != getattr(self, "_published_ejected", None):
            # Serve calls this every stats period: an ejection or re-admission reaches the gateway's
            # routing now, not at this replica's next request (an ejected replica gets none)
            self._published_ejected = ejected
            self._send_stats(agent, stats)
        return stats

    def _learn_energy(self, energy: EnergyReport | None) -> None:
        """Moving average of dynamic joules per unit of work, from this replica's finished requests."""
        if energy is None or not energy.work_tokens:
            return
        sample = energy.dynamic_joules / energy.work_tokens
        prev = self._joules_per_work_token
        self._joules_per_work_token = sample if prev is None else 0.8 * prev + 0.2 * sample

    async def check_health(self) -> None:
        """Serve's periodic probe: a replica whose node agent is gone (its node left the cluster) can neither
        meter its work nor, for a simulated engine, run it, so it reports unhealthy and Serve replaces it."""
        if self.agent is None:
            return
        try:
            await asyncio.wait_for(self.agent.ready.remote(), HEALTH_TIMEOUT_SECONDS)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            raise RuntimeError(f"node agent of {self.node} does not answer: {type(exc).__name__}") from None
        self._agent_gone_until_s = 0.0  # back (Ray restarted it): routable again

    async def stats(self) -> dict[str, Any]:
        return self.record_routing_stats()

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.engine.count_prompt_tokens(request)

    async def generate(self, request: GenerationRequest, placement: dict[str, Any] | None = None,
                       deltas: bool = True) -> AsyncIterator[ReplicaEvent]:
        """Run one request. `placement` is the router's hint for Serve's request router; unused here.

        With deltas=False (a non-streaming request) the text goes in the end event, whole, and the start
        event goes only once the request has run START_EVENT_DELAY_SECONDS: a shorter one is one stream
        item (its end, carrying its start) instead of one per token, each of which costs the gateway a Ray
        round of its own, and CPU the engine may need on a small machine. (The gateway's admission
        counts a request as queued until it hears of its start: a late start overstates that by at
        most the delay.) A replica whose work no node agent meters sends its start at once: the gateway
        needs it to find where an abandoned request's estimate is kept.

        Every way out settles the request with the node agent, so its device's running count comes
        back down and its joules are charged: the end event carries the energy; an error event
        carries the energy and tokens of the work done; a cancelled stream (the client went away)
        leaves them with the agent, where the gateway collects them for the ledger.
        """
        # aclosing: a client that leaves closes this generator, and the request's own must settle it now
        async with contextlib.aclosing(self._events(request, deltas, START_EVENT_DELAY_SECONDS)) as events:
            async for event in events:
                yield event

    async def generate_whole(self, request: GenerationRequest,
                             placement: dict[str, Any] | None = None) -> ReplicaEnd | ReplicaError:
        """Run one non-streaming request in one unary call: its end (or error) event, carrying its start.

        The same request as generate(deltas=False), without the stream: a streaming call costs the
        gateway and the replica more Ray work than a unary one, even for one item, and on a small machine
        that CPU is latency. The gateway uses it unless its admission needs to hear each start as it
        happens (admission "slo": api.serving.Serving._start). A cancelled call (the client left) settles
        the request with the node agent exactly as a cancelled stream does."""
        async with contextlib.aclosing(self._events(request, False, None)) as events:
            return await whole_answer(events)

    async def _events(self, request: GenerationRequest, deltas: bool,
                      start_event_delay_s: float | None) -> AsyncIterator[ReplicaEvent]:
        """generate()'s events; start_event_delay_s None: the start goes only with the end (generate_whole)."""
        rid = request.request_id
        started = time.time()
        # the slot this request runs on, whatever rank Serve gives the replica meanwhile (see reconfigure)
        engine, agent, device_ids = self.engine, self.agent, self.device_ids
        home_agent = self.home_agent if agent is None else None
        requests = self._engine_requests
        requests[id(engine)] = requests.get(id(engine), 0) + 1
        try:
            # aclosing: a client that leaves closes this generator, and the request's own must settle it now
            async with contextlib.aclosing(self._generate(request, deltas, rid, started, engine, agent, device_ids,
                                                          home_agent, start_event_delay_s)) as events:
                async for event in events:
                    yield event
        finally:
            self._engine_request_ended(engine)

    async def _generate(self, request: GenerationRequest, deltas: bool, rid: str, started: float, engine: Any,
                        agent: Any, device_ids: list[str], home_agent: Any,
                        start_event_delay_s: float | None) -> AsyncIterator[ReplicaEvent]:
        first_token_mono: float | None = None
        prompt_tokens = completion_tokens = 0
        texts: list[str] = []
        #: without deltas: every token's log-probability, for the end event (when the client asked)
        token_logprobs: list[Any] = []
        energy: EnergyReport | None = None
        settled = False
        last: EngineEvent | None = None  # the latest event: its counts' methods label an error's counts
        start: ReplicaStart | None = ReplicaStart(
            replica=self.replica_id, device=",".join(device_ids), node=self.node, time_s=started,
            system_fingerprint=engine.system_fingerprint,
            abandoned_node=self.home_node if home_agent is not None else None)
        if deltas or agent is None:
            yield start
            start = None  # from here on: the start still to send (None: sent)
        reports = None
        if agent is not None:
            reports = _AgentReports(agent, self._agent_link(), RequestStart(rid, tuple(device_ids), started))
            self._push_stats()
        engine_started_mono = time.monotonic()
        try:
            # aclosing: a cancelled request stops its engine now, not when the generator is collected
            async with contextlib.aclosing(engine.generate(request)) as engine_events, \
                    contextlib.aclosing(engine_events if start is None or start_event_delay_s is None else
                                        _with_start_due(engine_events, start_event_delay_s)) as events:
                async for ev in events:
                    if ev is _START_DUE:
                        out, start = start, None
                        yield out
                        continue
                    prompt_tokens, completion_tokens, last = ev.prompt_tokens, ev.completion_tokens, ev
                    if first_token_mono is None and completion_tokens > 0:
                        first_token_mono = time.monotonic()
                    if ev.finished:
                        settled = True
                        finished_mono = time.monotonic()
                        energy = await self._finish_energy(reports, ev.time_s, prompt_tokens, completion_tokens, engine)
                        if ev.token_logprobs:
                            token_logprobs.extend(ev.token_logprobs)
                        yield ReplicaEnd(
                            text=ev.text if deltas else "".join(texts) + ev.text, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, finish_reason=ev.finish_reason, time_s=ev.time_s,
                            mean_logprob=ev.mean_logprob, energy=energy,
                            first_token_to_end_seconds=None if deltas or first_token_mono is None
                            else time.monotonic() - first_token_mono, start=start,
                            engine_seconds=finished_mono - engine_started_mono,
                            energy_seconds=time.monotonic() - finished_mono,
                            token_logprobs=tuple(token_logprobs) if request.params.return_logprobs else None,
                            **_token_methods(engine, ev))
                        # after the answer went out: none of this is on its path
                        self._learn_energy(energy)
                        self._push_stats()
                        return
                    if reports is not None:
                        reports.progress(ev)
                    if deltas:
                        yield ReplicaDelta(text=ev.text, prompt_tokens=prompt_tokens,
                                           completion_tokens=completion_tokens, time_s=ev.time_s,
                                           token_logprobs=tuple(ev.token_logprobs) if ev.token_logprobs else None)
                    else:
                        if ev.text:
                            texts.append(ev.text)
                        if ev.token_logprobs:
                            token_logprobs.extend(ev.token_logprobs)
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away: the work done so far still costs energy, and the gateway records it
            if last is None:  # before the engine's first event: what it had handed on (an upstream server's prefill)
                last = engine.take_unreported_work(rid)
                if last is not None:
                    prompt_tokens, completion_tokens = last.prompt_tokens, last.completion_tokens
            self._abandon(reports, prompt_tokens, completion_tokens, energy if settled else None, rid,
                          _token_methods(engine, last), engine, home_agent)
            self._push_stats()
            raise
        except ContextLengthError as exc:
            yield await self._error_event(engine, reports, prompt_tokens, completion_tokens,
                                          ReplicaErrorKind.CONTEXT_LENGTH, str(exc),
                                          param="messages" if request.kind == ModelKind.CHAT else "prompt",
                                          last=last, start=start)
        except RequestRejectedError as exc:
            yield await self._error_event(engine, reports, prompt_tokens, completion_tokens,
                                          ReplicaErrorKind.INVALID_REQUEST, str(exc), param=exc.param, last=last,
                                          start=start)
        except EngineUnavailable as exc:
            self._agent_gone_until_s = time.monotonic() + AGENT_GONE_EJECT_SECONDS
            yield await self._error_event(engine, reports, prompt_tokens, completion_tokens,
                                          ReplicaErrorKind.UNAVAILABLE,
                                          f"model {self.model.id} replica {self.replica_id} unavailable: {exc}",
                                          last=last, start=start)
        except EngineError as exc:
            yield await self._error_event(engine, reports, prompt_tokens, completion_tokens, ReplicaErrorKind.ENGINE,
                                          f"model {self.model.id} failed: {exc}", last=last, start=start)
        except Exception as exc:  # an engine bug must still settle the request and answer in the envelope
            log.exception("request %s on %s failed", rid, self.replica_id)
            yield await self._error_event(engine, reports, prompt_tokens, completion_tokens, ReplicaErrorKind.ENGINE,
                                          f"model {self.model.id} failed: {type(exc).__name__}", last=last, start=start)

    async def _error_event(self, engine: Any, reports: "_AgentReports | None", prompt_tokens: int,
                           completion_tokens: int, kind: ReplicaErrorKind, message: str, param: str | None = None,
                           last: EngineEvent | None = None, start: ReplicaStart | None = None) -> ReplicaError:
        energy = await self._finish_energy(reports, time.time(), prompt_tokens, completion_tokens, engine)
        self._push_stats()
        return ReplicaError(kind=kind, message=message, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, energy=energy, param=param, start=start,
                            **_token_methods(engine, last))

    async def _finish_energy(self, reports: "_AgentReports | None", t_s: float, prompt_tokens: int,
                             completion_tokens: int, engine: Any) -> EnergyReport | None:
        """The request's energy, from its node agent: one round trip, which also carries the final counts."""
        if reports is None:
            return _estimated_energy(engine, prompt_tokens, completion_tokens)
        return await reports.energy(reports.finish(t_s, prompt_tokens, completion_tokens))

    def _abandon(self, reports: "_AgentReports | None", prompt_tokens: int, completion_tokens: int,
                 energy: EnergyReport | None, request_id: str, methods: dict[str, str | None], engine: Any,
                 home_agent: Any) -> None:
        """Settle a cancelled request with the agent (one-way: this task is being cancelled); `methods` say
        how its counts were obtained, for the gateway's ledger row."""
        if reports is not None:
            reports.abandon(replace(reports.finish(time.time(), prompt_tokens, completion_tokens), **methods), energy)
        elif home_agent is not None:  # as ReplicaStart.abandoned_node told the gateway
            # no agent meters the work: the estimate for the tokens seen, left where the gateway looks for it
            finish = RequestFinish(request_id, time.time(), prompt_tokens, completion_tokens, **methods)
            estimate = energy or _estimated_energy(engine, prompt_tokens, completion_tokens)
            contextvars.Context().run(home_agent.abandon_request.remote, finish, estimate)

    # --- the agent link -------------------------------------------------------------------------
    _link: AgentLink | None = None
    _link_retry_s = 0.0
    _link_connecting: "asyncio.Task | None" = None
    #: the Ray node this replica runs on (None outside Ray): the agent's link is offered only on its own
    ray_node_id: str | None = None
    #: this process's node and its agent, for a replica whose work's node has no agent (see __init__)
    home_node: str | None = None
    home_agent: Any = None
    #: until when (time.monotonic()) the replica keeps out of routing: its node agent was found gone
    _agent_gone_until_s = 0.0
    #: the rank whose slot this replica serves (see reconfigure)
    rank = 0

    @property
    def _engine_requests(self) -> dict[int, int]:
        """id(engine) -> requests running on it: an engine a renumbered replica left closes after its last one."""
        return self.__dict__.setdefault("_engine_requests_by_id", {})

    @property
    def _retiring(self) -> dict[int, Any]:
        return self.__dict__.setdefault("_retiring_engines", {})

    def _agent_link(self) -> AgentLink | None:
        """The link to the node agent if it is up; otherwise start (re)connecting, at most every
        LINK_RETRY_SECONDS, and let this request use Ray calls meanwhile."""
        link = self._link
        if link is not None and link.alive:
            return link
        now = time.monotonic()
        if self._link_connecting is None and now >= self._link_retry_s:
            self._link_retry_s = now + LINK_RETRY_SECONDS
            # in a context of its own: Ray would cancel the agent call along with the request that made it
            self._link_connecting = asyncio.get_running_loop().create_task(self._connect_link(),
                                                                          context=contextvars.Context())
        return None

    async def _connect_link(self) -> None:
        agent = self.agent
        try:
            path = await agent.link_address.remote(self.ray_node_id)
            if path is None:  # the agent runs on another machine: its socket cannot be reached from here
                if agent is self.agent:  # Ray calls for good, unless a renumbering moves the replica (reconfigure)
                    self._link_retry_s = math.inf
                log.info("replica %s: node agent of %s is on another Ray node; using Ray calls", self.replica_id,
                         self.node)
                return
            link = await AgentLink.connect(path)
            if agent is not self.agent:  # renumbered meanwhile: that agent meters none of this replica's work now
                link.close()
                return
            self._link = link
        except Exception as exc:  # an agent on another machine, or an old one: Ray calls do the job
            log.warning("replica %s: no link to the node agent (%s); using Ray calls", self.replica_id, exc)
        finally:
            self._link_connecting = None

    async def __del__(self) -> None:  # Serve calls this on graceful replica shutdown
        agent = self._publishing_agent()
        if agent is not None:
            try:
                await asyncio.wait_for(agent.replica_gone.remote(self.replica_id), HEALTH_TIMEOUT_SECONDS)
            except Exception as exc:  # its node agent is gone too: nothing of this replica is left there
                log.info("replica %s: node agent not told of the stop: %s", self.replica_id, type(exc).__name__)
        await self.engine.close()
        for engine in list(self._retiring.values()):  # left by a renumbering, still running requests at shutdown
            await engine.close()


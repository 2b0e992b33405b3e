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
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve

from scheduler.cluster import runtime
from scheduler.cluster.messages import (
    EnergyReport,
    ReplicaDelta,
    ReplicaEnd,
    ReplicaError,
    ReplicaErrorKind,
    ReplicaEvent,
    ReplicaStart,
)
from scheduler.config import ModelConfig, WattlaneConfig
from scheduler.engines.base import (
    ContextLengthError,
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    ModelKind,
)

log = logging.getLogger(__name__)

#: how often a running request reports its cumulative work to the node agent
PROGRESS_INTERVAL_SECONDS = 0.1
#: how often, at most, the replica pushes its stats to the node agent
STATS_PUSH_INTERVAL_SECONDS = 0.1
#: how long Serve's health probe waits for the node agent (it answers at once unless its node is gone)
HEALTH_TIMEOUT_SECONDS = 5.0


def devices_for_replica(model: ModelConfig, rank: int) -> list[str]:
    """A local-engine replica runs on one of its model's devices, spread by rank."""
    return [model.devices[rank % len(model.devices)]]


class ModelServer:
    """Deployment class; cluster.serve_app.build_app() turns it into one Serve deployment per model."""

    def __init__(self, model: dict[str, Any], config: dict[str, Any], state_dir: str):
        runtime.configure_process_logging()
        self.config = WattlaneConfig.model_validate(config)
        self.model = ModelConfig.model_validate(model)
        self.state_dir = Path(state_dir)
        ctx = serve.get_replica_context()
        rank = ctx.rank.rank if getattr(ctx, "rank", None) is not None else 0
        self.replica_id = f"{self.model.id}#{rank}"
        self.device_ids = devices_for_replica(self.model, rank)
        self.node = runtime.node_name()
        self.agent = runtime.get_node_agent()
        if self.model.engine == "simulated":
            from scheduler.cluster.sim_host import AgentHostedEngine, agent_for_simulated_replica

            # the work runs where the simulated GPUs are: that node's agent hosts the engine and meters it
            self.node, self.agent = agent_for_simulated_replica(self.model, self.config, rank)
            self.engine = AgentHostedEngine(self.agent, self.model.model_dump(mode="json"), rank)
            self.device_ids = self.engine.device_ids
        else:
            from scheduler.engines.factory import build_engine

            self.engine = build_engine(self.model, self.config, self.state_dir)
        self._joules_per_work_token: float | None = None
        self._push_stats()
        log.info("replica %s ready on %s (%s)", self.replica_id, self.node, ",".join(self.device_ids))

    def _push_stats(self) -> None:
        """Tell the node agent (governor, gateway routing) how loaded this replica is now.

        At most one push per STATS_PUSH_INTERVAL_SECONDS: its readers look once a second, and a push per
        request start and end would put two actor calls on every request's path. A change inside the
        interval goes out in one trailing push at its end, so the last state is always published.
        """
        if self.agent is None:
            return
        wait_s = getattr(self, "_stats_pushed_s", float("-inf")) + STATS_PUSH_INTERVAL_SECONDS - time.monotonic()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the constructor: no loop yet, push now
            wait_s = 0.0
        if wait_s <= 0:
            self._stats_pushed_s = time.monotonic()
            self.agent.replica_stats.remote(self.replica_id, self.record_routing_stats())
        elif not getattr(self, "_stats_push_pending", False):
            self._stats_push_pending = True
            loop.call_later(wait_s, self._push_trailing_stats)

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

    async def stats(self) -> dict[str, Any]:
        return self.record_routing_stats()

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.engine.count_prompt_tokens(request)

    async def generate(self, request: GenerationRequest, placement: dict[str, Any] | None = None
                       ) -> AsyncIterator[ReplicaEvent]:
        """Run one request. `placement` is the router's hint for Serve's request router; unused here.

        Every way out settles the request with the node agent, so its device's running count comes
        back down and its joules are charged: the end event carries the energy; an error event
        carries the energy and tokens of the work done; a cancelled stream (the client went away)
        leaves them with the agent, where the gateway collects them for the ledger.
        """
        device = ",".join(self.device_ids)
        rid = request.request_id
        agent = self.agent
        started = time.time()
        last_report = 0.0
        prompt_tokens = completion_tokens = 0
        energy: EnergyReport | None = None
        settled = False
        yield ReplicaStart(replica=self.replica_id, device=device, node=self.node, time_s=started,
                           system_fingerprint=self.engine.system_fingerprint)
        if agent is not None:
            agent.start_request.remote(rid, self.device_ids, started)
            self._push_stats()
        try:
            # aclosing: a cancelled request stops its engine now, not when the generator is collected
            async with contextlib.aclosing(self.engine.generate(request)) as events:
                async for ev in events:
                    prompt_tokens, completion_tokens = ev.prompt_tokens, ev.completion_tokens
                    if agent is not None and not ev.finished and ev.time_s - last_report >= PROGRESS_INTERVAL_SECONDS:
                        last_report = ev.time_s
                        agent.progress.remote(rid, ev.prompt_tokens, ev.completion_tokens, ev.time_s)
                    if ev.finished:
                        settled = True
                        # the final counts travel with the finish call: one round trip, not two
                        energy = await self._finish_energy(rid, ev.time_s, ev.prompt_tokens, ev.completion_tokens)
                        self._learn_energy(energy)
                        self._push_stats()
                        yield ReplicaEnd(text=ev.text, prompt_tokens=ev.prompt_tokens,
                                         completion_tokens=ev.completion_tokens, finish_reason=ev.finish_reason,
                                         time_s=ev.time_s, mean_logprob=ev.mean_logprob, energy=energy)
                        return
                    yield ReplicaDelta(text=ev.text, prompt_tokens=ev.prompt_tokens,
                                       completion_tokens=ev.completion_tokens, time_s=ev.time_s)
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away: the work done so far still costs energy, and the gateway records it
            self._abandon(rid, prompt_tokens, completion_tokens, energy if settled else None)
            raise
        except ContextLengthError as exc:
            yield await self._error_event(rid, prompt_tokens, completion_tokens, ReplicaErrorKind.CONTEXT_LENGTH,
                                          str(exc), param="messages" if request.kind == ModelKind.CHAT else "prompt")
        except EngineUnavailable as exc:
            yield await self._error_event(rid, prompt_tokens, completion_tokens, ReplicaErrorKind.UNAVAILABLE,
                                          f"model {self.model.id} replica {self.replica_id} unavailable: {exc}")
        except EngineError as exc:
            yield await self._error_event(rid, prompt_tokens, completion_tokens, ReplicaErrorKind.ENGINE,
                                          f"model {self.model.id} failed: {exc}")
        except Exception as exc:  # an engine bug must still settle the request and answer in the envelope
            log.exception("request %s on %s failed", rid, self.replica_id)
            yield await self._error_event(rid, prompt_tokens, completion_tokens, ReplicaErrorKind.ENGINE,
                                          f"model {self.model.id} failed: {type(exc).__name__}")

    async def _error_event(self, rid: str, prompt_tokens: int, completion_tokens: int, kind: ReplicaErrorKind,
                           message: str, param: str | None = None) -> ReplicaError:
        energy = await self._finish_energy(rid, time.time(), prompt_tokens, completion_tokens)
        self._push_stats()
        return ReplicaError(kind=kind, message=message, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, energy=energy, param=param)

    async def _finish_energy(self, request_id: str, t_s: float, prompt_tokens: int | None = None,
                             completion_tokens: int | None = None) -> EnergyReport | None:
        if self.agent is None:
            return None
        try:
            return await self.agent.finish_request.remote(request_id, t_s, prompt_tokens, completion_tokens)
        except ray.exceptions.RayError as exc:
            log.warning("node agent could not attribute %s: %s", request_id, exc)
            return None

    def _abandon(self, request_id: str, prompt_tokens: int, completion_tokens: int,
                 energy: EnergyReport | None) -> None:
        """Settle a cancelled request with the agent (fire and forget: this task is being cancelled)."""
        if self.agent is not None:
            # outside this request's context, or Ray cancels the call along with the request it belongs to
            contextvars.Context().run(self.agent.abandon_request.remote, request_id, time.time(), prompt_tokens,
                                      completion_tokens, energy)

    async def __del__(self) -> None:  # Serve calls this on graceful replica shutdown
        if self.agent is not None:
            try:
                await asyncio.wait_for(self.agent.replica_gone.remote(self.replica_id), HEALTH_TIMEOUT_SECONDS)
            except Exception as exc:  # its node agent is gone too: nothing of this replica is left there
                log.info("replica %s: node agent not told of the stop: %s", self.replica_id, type(exc).__name__)
        await self.engine.close()


"""Simulated engines run inside the node agent, beside the simulated GPUs they drive.

A simulated GPU is an object in the node agent's process (where the meter reads it and the
governor sets it), so its engine must live there too; the model replica holds a proxy Engine
that streams the agent-hosted engine's events. Real engines (llama.cpp) run in the replica.
In a cluster the replica may run on any node: it finds the agent of the node that owns its GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from scheduler.config import ModelConfig, WattlaneConfig

from scheduler.cluster.messages import ReplicaErrorKind, SimEngineFailure, SimEngineStats
from scheduler.engines.base import (
    ContextLengthError,
    Engine,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    GenerationRequest,
    ModelKind,
    ReplicaStats,
    RequestRejectedError,
    TokenCountMethod,
)


def replica_simulated_devices(model: ModelConfig, config: WattlaneConfig, replica_index: int) -> list[str]:
    """The simulated GPU ids replica `replica_index` of `model` runs on (as build_simulated_engine picks them)."""
    from scheduler.devices.simulated import SimulatedGpu
    from scheduler.sim.builders import replica_device_groups

    pool = {d.id: SimulatedGpu(d.id, d.profile, node=d.node) for d in config.devices.simulated if d.id in model.devices}
    try:
        groups = replica_device_groups(model, config, pool, key=f"models (id {model.id})")
        return [g.device_id for g in groups[replica_index % len(groups)]]
    finally:
        for d in pool.values():
            d.close()


def agent_for_simulated_replica(model: ModelConfig, config: WattlaneConfig, replica_index: int) -> tuple[str, Any]:
    """(node name, node agent) of the node that owns this replica's simulated GPUs.

    Raises RuntimeError when they are not all on one alive node: the replica cannot start until
    that node (and its agent) is up, and Serve retries it.
    """
    from scheduler.cluster import runtime

    device_ids = replica_simulated_devices(model, config, replica_index)
    owners = runtime.simulated_owners(config, runtime.cluster_nodes())
    nodes = {owners.get(d) for d in device_ids}
    if len(nodes) != 1 or None in nodes:
        where = ", ".join(f"{d} on {owners.get(d) or 'no alive node'}" for d in device_ids)
        raise RuntimeError(f"replica {replica_index} of {model.id} needs its simulated GPUs on one alive node ({where})")
    node = nodes.pop()
    agent = runtime.get_node_agent(node)
    if agent is None:
        raise RuntimeError(f"replica {replica_index} of {model.id}: node {node} has no node agent yet")
    return node, agent


def _agent_gone_errors() -> tuple[type[Exception], ...]:
    """What a call to a node agent raises when the agent is gone with its node: its actor died, or Ray cannot
    place its restart (it is pinned to the node that left)."""
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)


def _agent_gone(exc: Exception) -> EngineUnavailable:
    return EngineUnavailable(f"the node agent hosting it is gone ({type(exc).__name__})")


async def _agent_items(gen: Any) -> AsyncIterator[Any]:
    """The items of the agent's streaming generator. Before the first item, an agent gone with its node
    raises EngineUnavailable (the request can run on another replica); after it, its own error."""
    gone = _agent_gone_errors()
    produced = False
    try:
        async for ref in gen:  # iterating raises too: Ray cannot place a pinned agent whose node left
            yield await ref
            produced = True
    except gone as exc:
        if produced:
            raise
        raise _agent_gone(exc) from None


class AgentHostedEngine(Engine):
    """Replica-side proxy of a SimulatedEngine hosted by the node agent."""

    token_counts_method = TokenCountMethod.SIMULATED.value

    def __init__(self, agent: Any, model: dict[str, Any], replica_index: int):
        import ray

        self.agent = agent
        # sent with every call: an agent restarted by Ray (its process died) opens the engine again
        self.spec = (model, replica_index)
        info = ray.get(agent.sim_open.remote(model, replica_index))
        self.key = info["key"]
        self.model_id = model["id"]
        self.kind = ModelKind(model["kind"])
        self.context_length = int(info["context_length"])
        self.device_ids: list[str] = info["device_ids"]
        self._stats: ReplicaStats = ReplicaStats(running=0, waiting=0)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        import ray

        try:
            return int(ray.get(self.agent.sim_count_prompt_tokens.remote(self.key, request, self.spec)))
        except _agent_gone_errors() as exc:
            raise _agent_gone(exc) from None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        import ray

        gen = self.agent.sim_generate.options(num_returns="streaming").remote(self.key, request, self.spec)
        finished = False
        try:
            async with contextlib.aclosing(_agent_items(gen)) as items:
                async for item in items:
                    if isinstance(item, SimEngineFailure):
                        finished = True
                        if item.kind is ReplicaErrorKind.CONTEXT_LENGTH and item.context is not None:
                            raise ContextLengthError(*item.context)
                        if item.kind is ReplicaErrorKind.INVALID_REQUEST:
                            raise RequestRejectedError(item.message, param=item.param)
                        raise EngineError(item.message)
                    if isinstance(item, SimEngineStats):
                        self._stats = ReplicaStats(**item.stats)
                        continue
                    finished = item.finished
                    yield item
        finally:
            if not finished:  # closed early (the client went away): stop the simulated generation too
                ray.cancel(gen)

    def stats(self) -> ReplicaStats:
        return self._stats

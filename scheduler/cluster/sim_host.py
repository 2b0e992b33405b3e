"""Simulated engines run inside the node agent, beside the simulated GPUs they drive.

A simulated GPU is an object in the node agent's process (where the meter reads it and the
governor sets it), so its engine must live there too; the model replica holds a proxy Engine
that streams the agent-hosted engine's events. Real engines (llama.cpp) run in the replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from scheduler.cluster.messages import ReplicaErrorKind, SimEngineFailure, SimEngineStats
from scheduler.engines.base import (
    ContextLengthError,
    Engine,
    EngineError,
    EngineEvent,
    GenerationRequest,
    ModelKind,
    ReplicaStats,
)


class AgentHostedEngine(Engine):
    """Replica-side proxy of a SimulatedEngine hosted by the node agent."""

    def __init__(self, agent: Any, model: dict[str, Any], replica_index: int):
        import ray

        self.agent = agent
        info = ray.get(agent.sim_open.remote(model, replica_index))
        self.key = info["key"]
        self.model_id = model["id"]
        self.kind = ModelKind(model["kind"])
        self.context_length = int(info["context_length"])
        self.device_ids: list[str] = info["device_ids"]
        self._stats: ReplicaStats = ReplicaStats(running=0, waiting=0)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        import ray

        return int(ray.get(self.agent.sim_count_prompt_tokens.remote(self.key, request)))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        import ray

        gen = self.agent.sim_generate.options(num_returns="streaming").remote(self.key, request)
        finished = False
        try:
            async for ref in gen:
                item = await ref
                if isinstance(item, SimEngineFailure):
                    finished = True
                    if item.kind is ReplicaErrorKind.CONTEXT_LENGTH and item.context is not None:
                        raise ContextLengthError(*item.context)
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

"""Simulated engines run inside the node agent, beside the simulated GPUs they drive.

A simulated GPU is an object in the node agent's process (where the meter reads it and the
governor sets it), so its engine must live there too; the model replica holds a proxy Engine
that streams the agent-hosted engine's events. Real engines (llama.cpp) run in the replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from scheduler.engines.base import Engine, EngineEvent, GenerationRequest, ModelKind, ReplicaStats


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

        return int(ray.get(self.agent.sim_count_prompt_tokens.remote(self.key, _payload(request))))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        import ray

        gen = self.agent.sim_generate.options(num_returns="streaming").remote(self.key, _payload(request))
        finished = False
        try:
            async for ref in gen:
                item = await ref
                if "error" in item:
                    from scheduler.engines.base import ContextLengthError, EngineError

                    finished = True
                    if item["error"] == "context":
                        raise ContextLengthError(*item["args"])
                    raise EngineError(item["message"])
                if "stats" in item:
                    self._stats = item["stats"]
                    continue
                event = EngineEvent(**item)
                finished = event.finished
                yield event
        finally:
            if not finished:  # closed early (the client went away): stop the simulated generation too
                ray.cancel(gen)

    def stats(self) -> ReplicaStats:
        return self._stats


def _payload(request: GenerationRequest) -> dict[str, Any]:
    d = asdict(request)
    d["kind"] = request.kind.value
    return d


def request_from_payload(d: dict[str, Any]) -> GenerationRequest:
    from scheduler.engines.base import SamplingParams

    return GenerationRequest(
        request_id=d["request_id"], kind=ModelKind(d["kind"]), messages=d.get("messages"), prompt=d.get("prompt"),
        params=SamplingParams(**d["params"]), prompt_tokens_hint=d.get("prompt_tokens_hint"),
    )

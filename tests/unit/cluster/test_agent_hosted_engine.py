"""A simulated replica's engine runs in its node's agent: when that agent is gone with its node, a request
that has produced nothing is 'unavailable' (the gateway runs it on another replica), whatever form Ray's
error takes; one that has produced tokens ends with the error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import ray
from ray.exceptions import ActorDiedError, ActorUnschedulableError

from scheduler.cluster.sim_host import AgentHostedEngine
from scheduler.engines.base import EngineEvent, EngineUnavailable, GenerationRequest, ModelKind, ReplicaStats


class Stream:
    """What sim_generate.options(num_returns="streaming").remote() gives: an async iterator of object refs."""

    def __init__(self, script: list[Any]):
        self.script = list(script)

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> Any:
        if not self.script:
            raise StopAsyncIteration
        step = self.script.pop(0)
        if step == "unschedulable":  # Ray cannot place the agent's restart: its node left
            raise ActorUnschedulableError("the node it is pinned to is gone")
        return self._ref(step)

    @staticmethod
    async def _ref(step: Any) -> Any:
        if step == "died":
            raise ActorDiedError()
        return step


class Agent:
    def __init__(self, script: list[Any]):
        self.script = script

    @property
    def sim_generate(self) -> "Agent":
        return self

    def options(self, **_: Any) -> "Agent":
        return self

    def remote(self, *_: Any) -> Stream:
        return Stream(self.script)


def engine(script: list[Any]) -> AgentHostedEngine:
    e = object.__new__(AgentHostedEngine)  # __init__ opens the engine in a live agent
    e.agent, e.key, e.spec, e._stats = Agent(script), "k", ({}, 0), ReplicaStats(running=0, waiting=0)
    return e


def run(script: list[Any]) -> list[Any]:
    async def main() -> list[Any]:
        got = []
        request = GenerationRequest(request_id="r", kind=ModelKind.COMPLETION, prompt="hi")
        async for ev in engine(script).generate(request):
            got.append(ev)
        return got

    return asyncio.run(main())


TOKEN = EngineEvent(text="a", prompt_tokens=2, completion_tokens=1, time_s=0.0)


@pytest.fixture(autouse=True)
def no_ray_cancel(monkeypatch):
    monkeypatch.setattr(ray, "cancel", lambda *_: None)


@pytest.mark.parametrize("gone", ["unschedulable", "died"])
def test_an_agent_gone_before_anything_was_produced_makes_the_request_unavailable(gone):
    with pytest.raises(EngineUnavailable, match="node agent hosting it is gone"):
        run([gone])


@pytest.mark.parametrize(("gone", "error"), [("unschedulable", ActorUnschedulableError), ("died", ActorDiedError)])
def test_an_agent_gone_after_tokens_were_produced_ends_the_request_with_its_error(gone, error):
    with pytest.raises(error):
        run([TOKEN, gone])


def test_a_refusal_by_the_hosted_engine_stays_the_clients_400_across_the_agent():
    """A simulated engine's RequestRejectedError (logprobs, echo scoring) crossed the agent as an engine failure:
    the gateway retried it on the next model and answered 503 "model ... failed"."""
    from scheduler.cluster.node_agent import NodeAgent
    from scheduler.engines.base import RequestRejectedError

    class Refusing:
        async def generate(self, _request):
            raise RequestRejectedError("model m is simulated: its placeholder tokens have no log-probabilities",
                                       param="logprobs")
            yield  # an async generator, as engines are

    class Host:  # the agent's state that sim_generate reads
        async def _sim_engine(self, key, spec):
            return Refusing()

    async def agent_side() -> list[Any]:
        sim_generate = NodeAgent.__ray_actor_class__.sim_generate
        return [item async for item in sim_generate(Host(), "k", GenerationRequest("r", ModelKind.COMPLETION, prompt="hi"))]

    sent = asyncio.run(agent_side())
    with pytest.raises(RequestRejectedError) as info:
        run(sent)
    assert info.value.param == "logprobs" and "no log-probabilities" in str(info.value)

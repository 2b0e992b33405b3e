"""A replica that Serve renumbers follows its new rank (ModelServer.reconfigure), without Ray.

Scaling in, Serve stops the replicas it likes best to stop, whatever their rank, and renumbers the others
to close the gaps. A replica that kept the endpoint (or GPU group) of its old rank under its new one would
share it with the next replica Serve starts at the old rank, and leave the new rank's endpoint idle. Here
a replica of an upstream model with three endpoints is renumbered from rank 2 to rank 1 while a request
runs on endpoint 2: the request finishes there, charged, then the old engine closes; new requests go to
endpoint 1; the node agent's routing view drops the old replica id.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from scheduler.cluster import runtime
from scheduler.cluster.messages import ReplicaDelta, ReplicaEnd
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from tests.support.fake_upstream import FakeUpstream
from tests.support.serving import Remote
from tests.support.upstream_serving import REPLICA_NODE, replica, upstream_config


def request(rid: str) -> GenerationRequest:
    return GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": "hi"}],
                             params=SamplingParams(max_tokens=8))


@pytest.fixture()
def endpoints():
    # endpoint 2 stalls mid-stream, so that a request is still running on it when the replica is renumbered
    with FakeUpstream() as a, FakeUpstream() as b, FakeUpstream(stall_seconds=0.6) as c:
        yield [a, b, c]


@pytest.fixture()
def home_agent(monkeypatch):
    from scheduler.cluster.node_agent import NodeAgent

    agent = object.__new__(NodeAgent.__ray_actor_class__)  # request accounting and the routing view only
    agent.node, agent.devices, agent.power_action_counts = REPLICA_NODE, {}, {}
    agent._init_request_accounting()
    agent._replica_stats = {}
    agent.power = SimpleNamespace(report_replica_stats=lambda r, s: None)
    handle = Remote(agent)
    # no node agent on the servers' host; the replica's own node has one
    monkeypatch.setattr(runtime, "get_node_agent", lambda node: handle if node == REPLICA_NODE else None)
    monkeypatch.setattr(runtime, "node_name", lambda: REPLICA_NODE)
    return agent, handle


def three_endpoints(endpoints: list[FakeUpstream], last_mode: str = "ok"):
    """The upstream model on the three fake servers; the last one serves requests in `last_mode`."""
    a, b, c = endpoints
    return upstream_config([(a.base_url, "ok"), (b.base_url, "ok"), (c.base_url, last_mode)])


def test_a_renumbered_replica_moves_to_its_new_ranks_endpoint_and_finishes_what_ran_on_the_old(endpoints, home_agent):
    agent, handle = home_agent
    a, b, c = endpoints
    config = three_endpoints(endpoints, "stall-mid")

    async def main():
        server = replica(config, 2, handle)
        old_engine = server.engine
        first: list = []
        running = asyncio.get_running_loop().create_task(
            _collect(server.generate(request("r-old"), deltas=True), first))
        while not any(isinstance(e, ReplicaDelta) for e in first):  # it is on endpoint 2, stalled mid-stream
            await asyncio.sleep(0.01)

        await server.reconfigure(None, rank=SimpleNamespace(rank=1))
        assert (server.rank, server.replica_id) == (1, "up#1")
        assert server.engine is not old_engine and server.engine.base_url == b.base_url
        await asyncio.gather(*handle.tasks)
        assert "up#2" not in agent._replica_stats and "up#1" in agent._replica_stats

        second: list = []
        await _collect(server.generate(request("r-new"), deltas=False), second)
        # no agent meters the server's host, so the start goes first, naming the replica by its new rank
        assert isinstance(second[-1], ReplicaEnd) and second[0].replica == "up#1"
        assert (b.requests["ok"], c.requests["stall-mid"], a.requests["ok"]) == (1, 1, 0)
        assert not running.done() and not old_engine._client.is_closed  # the old engine still serves its request

        await running  # the request that started on endpoint 2 ends there, whole and charged
        end = first[-1]
        assert isinstance(end, ReplicaEnd) and end.completion_tokens == 5 and end.energy is not None
        assert first[0].replica == "up#2" and first[0].device == ",".join(config.models[0].endpoints[2].devices)
        await asyncio.sleep(0.05)  # the old engine closes once its last request has ended
        assert server._engine_requests == {} and server._retiring == {}
        await server.engine.close()
        return old_engine

    old = asyncio.run(main())
    assert old._client is None  # closed (close() drops its HTTP client)


def test_the_reconfigure_serve_makes_at_start_with_the_same_rank_keeps_everything(endpoints, home_agent):
    config = three_endpoints(endpoints)
    _, handle = home_agent

    async def main():
        server = replica(config, 1, handle)
        engine = server.engine
        await server.reconfigure(None, rank=SimpleNamespace(rank=1))
        assert server.engine is engine and server.replica_id == "up#1"
        await engine.close()

    asyncio.run(main())


async def _collect(events, into: list) -> None:
    async for ev in events:
        into.append(ev)

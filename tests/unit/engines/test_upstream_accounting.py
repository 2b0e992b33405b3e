"""An upstream request's response and ledger row say how its tokens and joules were obtained (no Ray, seconds).

A server that sends no usage leaves the prompt's tokens estimated from its length and the output's
counted from the stream's chunks: usage.prompt_tokens_method and completion_tokens_method name the
estimates (the server's own counts are "server"), the ledger row carries the same names, and the
real openai client still parses the response. A client that leaves a request on a server that no
node agent meters is charged the joules-per-token estimate of the work done, under that estimate's
method name and the scope of the endpoint's devices, kept by the replica's own node agent for the
gateway's ledger row, whose token counts name their methods too. Work done is the prompt as soon as
the server has it, before any token: without an agent it is in the estimate, with one it takes its
share of the metered joules beside the server's other requests.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import pytest

from scheduler.api.serving import Job
from scheduler.devices.simulated import SimulatedGpu
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.engines.openai_upstream import JPT_ESTIMATE_METHOD, UpstreamEngine
from tests.support.fake_upstream import WORDS, FakeUpstream
from tests.support.serving import Remote, node_agent
from tests.support.upstream_serving import NODE, REPLICA_NODE, UpstreamFleet, replica, upstream_config

PROMPT = "say hello to the upstream"  # 25 UTF-8 bytes: 7 tokens by the 4-bytes-per-token estimate
PROMPT_ESTIMATE = 7
#: the counts' methods of a request that ended before the server's usage report
ESTIMATED_COUNTS = ("utf8-bytes-estimate", "stream-chunk-estimate")


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream(stall_seconds=30.0) as server:
        yield server


def job(rid: str, max_tokens: int = 8) -> Job:
    request = GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": PROMPT}],
                                params=SamplingParams(max_tokens=max_tokens))
    return Job(request_id=rid, model="up", request=request, api_key_id="k")


# the fake server's usage reports 7 prompt tokens, like the estimate: only the labels tell them apart
@pytest.mark.parametrize(("mode", "prompt_method", "completion_method"), [
    ("ok", "server", "server"),
    ("ok-nousage", "utf8-bytes-estimate", "stream-chunk-estimate"),
    ("ok-no-prompt-usage", "utf8-bytes-estimate", "server"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_token_counts_name_their_source_in_the_result_and_the_ledger(fake, mode, prompt_method, completion_method,
                                                                     stream):
    async def main():
        fleet = UpstreamFleet(upstream_config([(fake.base_url, mode)]))
        try:
            if stream:
                session = await fleet.serving.open(job("req-1"))
                async for _ in session.deltas():
                    pass
                result = session.result
            else:
                result = await fleet.serving.run(job("req-1"))
            estimated = fleet.engines()[0].prompt_tokens_estimated
            await fleet.serving.settled()
            return result, fleet.rows(), estimated
        finally:
            await fleet.aclose()

    result, rows, estimated = asyncio.run(main())
    assert (result.prompt_tokens, result.completion_tokens) == (PROMPT_ESTIMATE, len(WORDS))
    assert (result.prompt_tokens_method, result.completion_tokens_method) == (prompt_method, completion_method)
    assert [(r["prompt_tokens_method"], r["completion_tokens_method"]) for r in rows] == [
        (prompt_method, completion_method)]
    assert estimated == (prompt_method != "server")


def test_the_openai_client_parses_labelled_usage_from_the_gateway(fake, tmp_path):
    """The real create_app's routes over the upstream serving path, called by the real openai client."""
    import openai
    from fastapi.testclient import TestClient

    from tests.support.gateway_app import KEYS, build

    app, gw = build(tmp_path)
    fleet = UpstreamFleet(upstream_config([(fake.base_url, "ok-nousage")]))
    app.state.serving = fleet.serving
    try:
        with TestClient(app) as http:
            client = openai.OpenAI(base_url=str(http.base_url) + "/v1", api_key=KEYS["client"], http_client=http,
                                   max_retries=0)
            messages = [{"role": "user", "content": PROMPT}]
            done = client.chat.completions.create(model="up", messages=messages, max_tokens=8)
            chunks = list(client.chat.completions.create(model="up", messages=messages, max_tokens=8, stream=True,
                                                         stream_options={"include_usage": True}))
            http.portal.call(fleet.aclose)  # on the app's loop, where the engines' clients were made
    finally:
        gw.close()
    assert done.choices[0].message.content == "".join(WORDS)
    assert done.usage.prompt_tokens == PROMPT_ESTIMATE and done.usage.total_tokens == PROMPT_ESTIMATE + len(WORDS)
    assert done.usage.prompt_tokens_method == "utf8-bytes-estimate"  # an extra field, kept by the client
    assert done.usage.completion_tokens_method == "stream-chunk-estimate"
    assert done.usage.model_extra["energy"]["method"] == JPT_ESTIMATE_METHOD
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(WORDS)
    assert (usage.prompt_tokens_method, usage.completion_tokens_method) == ("utf8-bytes-estimate",
                                                                            "stream-chunk-estimate")


async def _cancel_after(fleet: UpstreamFleet, tokens: int, stream: bool) -> list[str]:
    """A client that leaves once `tokens` tokens reached the gateway (streaming) or the server sent them."""
    got: list[str] = []
    if stream:
        session = await fleet.serving.open(job("req-left", max_tokens=200))
        async with anyio.create_task_group() as tg:
            async def consume():
                async for text in session.deltas():
                    got.append(text)
                    if len(got) == tokens:
                        tg.cancel_scope.cancel()  # the client disconnected
            tg.start_soon(consume)
    else:
        task = asyncio.create_task(fleet.serving.run(job("req-left", max_tokens=200)))
        engine = fleet.engines()[0]
        while engine.running == 0:  # tokens are streaming from the server to the replica
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await fleet.serving.settled()
    return got


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_client_that_leaves_an_unmetered_upstream_is_charged_the_estimate_of_the_work_done(fake, stream):
    """No node agent on the server's host: the abandoned work still costs joules, estimated and labelled so."""
    async def main():
        # stall-mid: two tokens, then the server stalls (the read timeout is well past the test)
        fleet = UpstreamFleet(upstream_config([(fake.base_url, "stall-mid")], read_timeout_seconds=30.0))
        try:
            got = await _cancel_after(fleet, 2, stream)
            rows = fleet.rows()
            expected = fleet.engines()[0].estimate_energy(PROMPT_ESTIMATE, 2)
            return got, rows, expected, list(fleet.abandoned_lookups), fleet.engines()[0].stats()
        finally:
            await fleet.aclose()

    got, rows, expected, lookups, stats = asyncio.run(main())
    assert stats["running"] == 0 and stats["waiting"] == 0, "the upstream request was closed"
    assert [r["status"] for r in rows] == ["cancelled"]
    row = rows[0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_ESTIMATE, 2)
    # the endpoints of upstream_config run on cpu0: the estimate covers a CPU
    assert row["energy_method"] == JPT_ESTIMATE_METHOD and row["energy_scope"] == "cpu"
    assert (row["prompt_tokens_method"], row["completion_tokens_method"]) == ESTIMATED_COUNTS
    assert row["joules"] == pytest.approx(expected.joules) and row["joules"] > 0
    assert row["gco2e"] is not None and row["gco2e"] > 0
    assert (row["node"], lookups) == (NODE, [REPLICA_NODE]), "collected from the replica's own node agent"
    if stream:
        assert got == WORDS[:2]


def test_a_replica_with_an_agent_on_its_servers_host_leaves_abandoned_work_there(fake):
    """Where the server's host has an agent, that agent settles the request, and the gateway asks it (start.node)."""
    from scheduler.cluster.messages import ReplicaStart

    async def main() -> Any:
        fleet = UpstreamFleet(upstream_config([(fake.base_url, "ok")]))
        try:
            server = fleet.replicas.servers[0]
            server.agent = fleet.agent_handle  # stands for the agent of the server's host
            gen = server.generate(job("r").request)
            start = await gen.__anext__()
            await gen.aclose()
            return start
        finally:
            await fleet.aclose()

    start = asyncio.run(main())
    assert isinstance(start, ReplicaStart) and start.node == NODE and start.abandoned_node is None


def test_a_replica_whose_servers_host_has_no_agent_publishes_its_stats_to_its_own_nodes_agent(fake):
    """The gateway routes on every model's replica stats, from the agents, and on none while a model is
    missing: an upstream replica without an agent on its server's host must still be heard, ejections included."""
    async def main() -> Any:
        fleet = UpstreamFleet(upstream_config([(fake.base_url, "http500"), (fake.base_url, "ok")],
                                              ejection_base_seconds=60.0))
        try:
            await fleet.serving.run(job("req-1"))  # the first endpoint fails, is ejected; the retry answers
            for s in fleet.replicas.servers:
                s.record_routing_stats()  # what Serve calls every stats period
            await asyncio.sleep(0.2)  # the trailing push of the last change
            return await fleet.agent.gateway_view()
        finally:
            await fleet.aclose()

    view = asyncio.run(main())
    assert sorted(view.replica_stats) == ["up#0", "up#1"]
    assert view.replica_stats["up#0"]["ejected"] is True and view.replica_stats["up#1"]["ejected"] is False
    assert {s["node"] for s in view.replica_stats.values()} == {NODE}  # the work's node, not the publisher's


def test_the_governor_hears_only_of_replicas_whose_work_runs_on_its_node():
    """Another host's replica (published here for routing) names that host's devices, which may read like
    this node's own (cpu0, gpu0): its load must not steer this node's power governor."""
    from types import SimpleNamespace

    from scheduler.cluster.node_agent import NodeAgent

    reported: list[str] = []
    agent = object.__new__(NodeAgent.__ray_actor_class__)
    agent.node = REPLICA_NODE
    agent.power = SimpleNamespace(report_replica_stats=lambda rid, stats: reported.append(rid))
    agent._init_request_accounting()
    agent.replica_stats("local#0", {"node": REPLICA_NODE, "device_ids": ["cpu0"], "running": 1})
    agent.replica_stats("up#0", {"node": NODE, "device_ids": ["cpu0"], "running": 3})
    assert reported == ["local#0"]
    assert sorted(agent._replica_stats) == ["local#0", "up#0"]  # both in the gateway's routing view


async def _sent_then_left(fleet: UpstreamFleet, fake: FakeUpstream, mode: str, stream: bool) -> None:
    """A client that leaves once the server has its whole request, before any token."""
    before = fake.requests[mode]
    req = job("req-early", max_tokens=200)
    task = asyncio.create_task(fleet.serving.open(req) if stream else fleet.serving.run(req))
    while fake.requests[mode] == before:  # the server read the body: it is prefilling
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fleet.serving.settled()


# stall: the server answers with its headers, then nothing; stall-headers: not even the headers (it prefills first)
@pytest.mark.parametrize("mode", ["stall", "stall-headers"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_client_that_leaves_before_the_first_token_is_charged_the_prompt_the_server_had(fake, mode, stream):
    """The server was prefilling the prompt when the client left: the estimate charges that prompt, labelled."""
    async def main():
        fleet = UpstreamFleet(upstream_config([(fake.base_url, mode)], read_timeout_seconds=30.0))
        try:
            await _sent_then_left(fleet, fake, mode, stream)
            expected = fleet.engines()[0].estimate_energy(PROMPT_ESTIMATE, 0)
            return fleet.rows(), expected, fleet.engines()[0].stats()
        finally:
            await fleet.aclose()

    rows, expected, stats = asyncio.run(main())
    assert stats["running"] == 0 and stats["waiting"] == 0, "the upstream request was closed"
    assert [r["status"] for r in rows] == ["cancelled"]
    row = rows[0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT_ESTIMATE, 0)
    assert (row["prompt_tokens_method"], row["completion_tokens_method"]) == ESTIMATED_COUNTS
    assert row["energy_method"] == JPT_ESTIMATE_METHOD and row["energy_scope"] == "cpu"
    assert row["joules"] == pytest.approx(expected.joules) and row["joules"] > 0


def test_a_request_still_being_sent_when_its_client_leaves_is_charged_nothing():
    """A server that has not got the whole request cannot prefill it: no prompt is charged.

    The server here accepts connections (the kernel does, into its backlog) and never reads, so a body
    larger than the sockets' buffers is still being written when the client leaves."""
    with socket.socket() as listener:
        # a small, fixed receive buffer (accepted connections inherit it): the body fills it whatever the host's
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        async def main():
            fleet = UpstreamFleet(upstream_config([(url, "ok")], health_check_timeout_seconds=30.0))
            try:
                request = GenerationRequest("req-unsent", ModelKind.CHAT, params=SamplingParams(max_tokens=8),
                                            messages=[{"role": "user", "content": "x" * (32 << 20)}])
                task = asyncio.create_task(_drain(fleet.replicas.servers[0].generate(request)))
                await asyncio.sleep(1.0)  # connected, writing, blocked on the full buffers
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                work = await fleet.agent_handle.take_abandoned.remote("req-unsent", 5.0)
                return work, fleet.engines()[0].stats()
            finally:
                await fleet.aclose()

        work, stats = asyncio.run(main())
    assert stats["waiting"] == 0 and stats["running"] == 0
    assert work is not None and (work.prompt_tokens, work.completion_tokens) == (0, 0)
    assert work.energy is not None and work.energy.method == JPT_ESTIMATE_METHOD and work.energy.joules == 0


async def _drain(events: Any) -> None:
    async for _ in events:
        pass


def test_with_an_agent_on_the_servers_host_the_prompt_takes_its_share_of_the_metered_joules(fake):
    """Two servers on one metered GPU: one decodes, the other's client leaves while it prefills. The agent
    shares the metered joules by work; the prompt the server had is that request's work (reported 0 before,
    it was charged nothing and the decoding request paid for its prefill)."""
    config = upstream_config([(fake.base_url, "stall-mid"), (fake.base_url, "stall")], devices=("gpu0",),
                             read_timeout_seconds=30.0)
    gpu = SimulatedGpu("gpu0", "l40s", node=NODE)

    async def main():
        agent = node_agent({"gpu0": gpu}, config)
        agent.node = NODE
        handle = Remote(agent)
        servers = [replica(config, i) for i in range(2)]
        for server in servers:
            server.agent = handle  # the agent of the servers' host meters their GPU
        decoding, prefilling = servers
        tasks, seen = [], {"a": [], "b": []}

        async def consume(server, rid, key):
            async for ev in server.generate(job(rid).request):
                seen[key].append(ev)

        try:
            tasks.append(asyncio.create_task(consume(decoding, "req-decoding", "a")))
            while len(seen["a"]) < 3:  # start and two tokens: the agent has its work
                await asyncio.sleep(0.01)
            before = fake.requests["stall"]
            tasks.append(asyncio.create_task(consume(prefilling, "req-prefilling", "b")))
            while fake.requests["stall"] == before:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            tasks[1].cancel()  # the second client leaves before its first token
            await asyncio.gather(tasks[1], return_exceptions=True)
            work = await handle.take_abandoned.remote("req-prefilling", 5.0)
            return work, len(seen["b"])
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*handle.tasks, return_exceptions=True)
            for server in servers:
                await server.engine.close()

    work, events = asyncio.run(main())
    assert events == 1, "only the start event: no token came"
    assert work is not None and (work.prompt_tokens, work.completion_tokens) == (PROMPT_ESTIMATE, 0)
    assert (work.prompt_tokens_method, work.completion_tokens_method) == ESTIMATED_COUNTS
    energy = work.energy
    assert energy is not None and energy.method == "simulated" and energy.scope == "gpu"  # metered, not estimated
    assert energy.dynamic_joules > 0
    assert energy.work_tokens == pytest.approx(PROMPT_ESTIMATE * config.energy.prefill_token_weight)


@pytest.mark.parametrize(("devices", "scope"), [
    (("gpu0",), "gpu"), (("3",), "gpu"), (("GPU-8f1e",), "gpu"), (("gpu0", "gpu1"), "gpu"),
    (("cpu0",), "cpu"), (("cpu0", "gpu0"), "cpu+gpu"),
])
def test_the_estimates_scope_is_what_the_endpoint_runs_on(devices, scope):
    """usage.energy.scope of an estimate says the hardware of the endpoint's declared devices."""
    config = upstream_config([("http://127.0.0.1:9", "ok")], devices=devices)
    model = config.models[0]
    engine = UpstreamEngine(model.id, ModelKind.CHAT, model.endpoints[0], model.upstream, context_length=2048,
                            joules_per_prompt_token=0.1, joules_per_output_token=1.0, node=NODE,
                            health_checks=False)
    energy = engine.estimate_energy(PROMPT_ESTIMATE, 3)
    assert energy.scope == scope and energy.device == ",".join(devices) and energy.method == JPT_ESTIMATE_METHOD

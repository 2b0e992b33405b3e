"""A model replica settles every request with its node agent, however the request ends: the device's
running count comes back to zero, and the energy of the work done is charged (and, for a request
whose client went away, kept for the gateway's ledger row)."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

from scheduler.cluster.node_agent import Mailbox, NodeAgent
from scheduler.cluster.replica import ModelServer
from scheduler.energy.attribution import Attributor
from scheduler.energy.meter import DeviceMeter
from scheduler.cluster.messages import (
    ReplicaEnd,
    ReplicaError,
    ReplicaErrorKind,
    ReplicaStart,
    RequestFinish,
    RequestProgress,
    RequestStart,
)
from scheduler.engines.base import Engine, EngineError, EngineEvent, GenerationRequest, ModelKind
from tests.support.serving import Remote

DEVICE = "gpu0"
#: the Ray node the agent (and, unless a test says otherwise, the replica) runs on
RAY_NODE = "ray-node-a"


def make_agent() -> Any:
    """The real NodeAgent's request accounting, without Ray, devices or a meter."""
    agent = object.__new__(NodeAgent.__ray_actor_class__)
    agent.attributor = Attributor(settle_delay_seconds=0.0)
    now = time.time()
    agent.attributor.on_interval(DEVICE, now - 1.0, now + 60.0, 10.0)  # one reading that covers the test
    agent.devices = {DEVICE: SimpleNamespace(energy_method=SimpleNamespace(value="simulated"),
                                             energy_scope=SimpleNamespace(value="gpu"),
                                             power_limit_watts=lambda: 300.0)}
    agent.power = SimpleNamespace(work_arrived=lambda d: None, report_replica_stats=lambda r, s: None)
    agent.node = "n1"
    agent.ray_node_id = RAY_NODE
    agent._init_request_accounting()
    agent.meter = DeviceMeter([], 0.1)  # the interval above covers the test: nothing to read at a request's end
    return agent


class ScriptedEngine(Engine):
    """Emits `tokens` token events, then fails with `error` (or finishes), or hangs (`hang=True`)."""

    model_id = "m"
    kind = ModelKind.CHAT
    context_length = 1024

    def __init__(self, tokens: int, error: BaseException | None = None, hang: bool = False):
        self.tokens, self.error, self.hang = tokens, error, hang
        self.closed = False

    def count_prompt_tokens(self, request) -> int:
        return 8

    async def generate(self, request):
        try:
            for i in range(1, self.tokens + 1):
                yield EngineEvent("w ", 8, i, time.time())
                await asyncio.sleep(0)
            if self.hang:
                await asyncio.sleep(3600)
            if self.error is not None:
                raise self.error
            yield EngineEvent("", 8, self.tokens, time.time(), finished=True, finish_reason="length")
        finally:
            self.closed = True


class _Server(ModelServer):
    def __del__(self) -> None:  # built without Serve: there is no engine to free
        pass


def make_server(engine: Engine, agent: Any) -> ModelServer:
    server = object.__new__(_Server)
    server.model = SimpleNamespace(id="m")
    server.config = SimpleNamespace(energy=SimpleNamespace(prefill_token_weight=0.25))
    server.replica_id = "m#0"
    server.device_ids = [DEVICE]
    server.node = "n1"
    server.ray_node_id = RAY_NODE
    server.agent = Remote(agent)
    server.engine = engine
    server._joules_per_work_token = None
    return server


REQUEST = GenerationRequest("r1", ModelKind.CHAT, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), EngineError("out of memory")],
                         ids=["engine-bug", "engine-error"])
def test_an_engine_failure_settles_the_request_and_answers_with_an_error_event(error):
    agent = make_agent()

    async def main():
        server = make_server(ScriptedEngine(3, error=error), agent)
        events = [ev async for ev in server.generate(REQUEST)]
        await asyncio.gather(*server.agent.tasks)
        return events

    events = asyncio.run(main())
    last = events[-1]
    assert isinstance(last, ReplicaError) and last.kind is ReplicaErrorKind.ENGINE  # no HTTP status here
    assert (last.prompt_tokens, last.completion_tokens) == (8, 3)
    assert last.energy is not None and last.energy.method == "simulated"
    assert agent.attributor.running(DEVICE) == 0


def test_a_cancelled_request_stops_the_engine_and_leaves_its_energy_for_the_gateway():
    agent = make_agent()
    engine = ScriptedEngine(4, hang=True)

    async def main():
        server = make_server(engine, agent)
        gen = server.generate(REQUEST)
        seen = []

        async def consume():
            async for ev in gen:
                seen.append(ev)

        task = asyncio.create_task(consume())
        while len(seen) < 5:  # start + 4 tokens
            await asyncio.sleep(0.01)
        task.cancel()  # Serve cancels the replica's request when the gateway's client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()
        await asyncio.gather(*server.agent.tasks)
        return await agent.take_abandoned("r1", timeout_seconds=1.0)

    outcome = asyncio.run(main())
    assert engine.closed, "the generation must stop"
    assert agent.attributor.running(DEVICE) == 0
    assert outcome is not None and (outcome.prompt_tokens, outcome.completion_tokens) == (8, 4)
    assert outcome.energy is not None and outcome.energy.device == DEVICE


def test_mailbox_hands_over_a_value_put_before_or_after_the_take_and_times_out_otherwise():
    async def main():
        box = Mailbox(ttl_seconds=60.0)
        box.put("a", 1)
        early = await box.take("a", 0.1)
        waiting = asyncio.create_task(box.take("b", 1.0))
        await asyncio.sleep(0.01)
        box.put("b", 2)
        late = await waiting
        missing = await box.take("c", 0.05)
        return early, late, missing, len(box)

    assert asyncio.run(main()) == (1, 2, None, 0)


def test_a_finish_call_cancelled_midway_still_settles_and_keeps_the_energy() -> None:
    """Ray cancels the agent calls of a request whose client left: cancelled inside finish_request, the
    request stayed 'running' on its device for ever and its joules never reached the ledger (load test)."""
    agent = make_agent()
    release = asyncio.Event()
    real_finish = agent.attributor.finish_when_covered

    async def slow_finish(*args, **kwargs):
        await release.wait()  # the meter has not yet covered the request's end
        return await real_finish(*args, **kwargs)

    agent.attributor.finish_when_covered = slow_finish

    async def main() -> dict:
        t0 = time.time()
        agent.start_request(RequestStart("r1", (DEVICE,), t0))
        agent.progress(RequestProgress("r1", 10, 5, t0 + 0.2))
        agent.attributor.on_interval(DEVICE, t0 + 0.1, t0 + 0.3, 4.0)  # a metered interval the request ran in
        call = asyncio.get_running_loop().create_task(agent.finish_request(RequestFinish("r1", t0 + 0.25, 10, 5)))
        await asyncio.sleep(0.01)
        call.cancel()  # what Ray does to a cancelled request's child calls
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        await agent.abandon_request(RequestFinish("r1", t0 + 0.25, 10, 5))
        return await agent.take_abandoned("r1", 1.0)

    outcome = asyncio.run(main())
    assert agent.attributor.running(DEVICE) == 0
    assert outcome.energy is not None and outcome.energy.joules > 0


def test_mailbox_expires_old_entries_and_keeps_fresh_ones() -> None:
    box = Mailbox(ttl_seconds=0.05)
    box.put("old", 1)
    time.sleep(0.06)
    box.put("new", 2)
    assert len(box) == 1

    async def take() -> tuple:
        return await box.take("new", 0), await box.take("old", 0)

    assert asyncio.run(take()) == (2, None)


def test_finish_request_reads_the_meter_at_the_end_instead_of_waiting_for_the_next_tick():
    """The request's end is covered by a counter read at once: exact, complete energy with no meter-period wait."""
    from scheduler.devices.base import Device, DeviceKind, EnergyMethod, EnergyScope

    class Counter(Device):
        kind, energy_method, energy_scope, name = (DeviceKind.SIMULATED_GPU, EnergyMethod.SIMULATED,
                                                   EnergyScope.GPU, "counter")
        device_id, node, joules = DEVICE, "n1", 0.0

        def energy_joules(self) -> float:
            return self.joules

        def power_watts(self) -> float:
            return 0.0

    device = Counter()
    agent = make_agent()
    agent.attributor = Attributor(settle_delay_seconds=0.3)
    agent.meter = DeviceMeter([device], 10.0)  # a tick far away: only a read at the end can cover the request
    agent.meter.add_callback(agent._on_interval)
    agent.meter.baseline()
    t_start = time.time()
    agent.start_request(RequestStart("r1", (DEVICE,), t_start))
    device.joules = 6.0
    t_end = time.time()

    async def main():
        began = time.monotonic()
        energy = await agent.finish_request(RequestFinish("r1", t_end, 8, 2))
        return energy, time.monotonic() - began

    energy, waited_s = asyncio.run(main())
    assert waited_s < 0.1, f"finish_request waited {waited_s:.3f} s for the meter"
    assert energy.complete and energy.metered
    # the one interval [baseline, read at the end] was busy from t_start to t_end: that share is the request's
    t0, t1 = agent.meter.started_s, agent.meter.reading(DEVICE).covered_until_s
    assert t1 >= t_end
    assert energy.dynamic_joules == pytest.approx(6.0 * (t_end - t_start) / (t1 - t0), rel=1e-6)
    assert agent.attributor.balance().accounted_joules == pytest.approx(6.0)


def test_replica_stats_pushes_are_throttled_and_the_last_state_still_goes_out():
    """Two pushes per request would put two actor calls on every request's path; the last one must not be lost."""
    pushed: list[int] = []

    class StatsAgent:
        def replica_stats(self, replica_id: str, stats: dict) -> None:
            pushed.append(stats["running"])

    class CountingEngine(ScriptedEngine):
        running = 0

        def stats(self):
            return {"running": self.running}

    async def main():
        engine = CountingEngine(1)
        server = make_server(engine, StatsAgent())
        for running in (1, 0, 1, 0, 1, 0):  # six state changes within a few ms
            engine.running = running
            server._push_stats()
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.25)

    asyncio.run(main())
    assert len(pushed) <= 3, pushed
    assert pushed[-1] == 0, "the trailing push publishes the latest state"


def test_an_abandon_call_that_never_arrives_is_settled_when_the_gateway_asks() -> None:
    """Ray can cancel the replica's own abandon_request (it is sent while the request is cancelled): the
    request then stayed 'running' and its cancelled row had no energy (integration test, 1 run in 3)."""
    agent = make_agent()

    async def main():
        t0 = time.time()
        agent.start_request(RequestStart("r2", (DEVICE,), t0))
        agent.progress(RequestProgress("r2", 10, 5, t0 + 0.2))
        agent.attributor.on_interval(DEVICE, t0 + 0.1, t0 + 0.3, 4.0)
        return await agent.take_abandoned("r2", 0.05)  # the gateway asks; no abandon_request ever came

    work = asyncio.run(main())
    assert agent.attributor.running(DEVICE) == 0
    assert work is not None and work.energy is not None and work.energy.joules > 0


def test_a_replica_message_that_comes_late_for_a_request_the_agent_never_heard_of_still_brings_its_energy(
        monkeypatch) -> None:
    """A short request's start travels with its end: a client that leaves first leaves the gateway without
    the request's node, and a busy replica's abandon_request came after the gateway had stopped asking
    (0.5 s): the cancelled row had no joules (CI, the abandoned non-streaming request's test)."""
    import scheduler.cluster.node_agent as node_agent
    from scheduler.api.accounting import Accounting

    monkeypatch.setattr(node_agent, "ABANDON_GRACE_SECONDS", 0.1)  # what the agent waits for a request it knows
    agent = make_agent()

    async def lookup(node, request_id, timeout_seconds):
        assert node is None
        return await agent.take_abandoned(request_id, timeout_seconds)

    accounting = Accounting(carbon=None, ledger=None, metrics=None, abandoned=lookup)

    async def main():
        t0 = time.time()
        asking = asyncio.create_task(accounting.abandoned_work(None, "r3"))
        await asyncio.sleep(0.8)  # the replica is busy: its message comes late, the start inside it
        await agent.abandon_request(RequestFinish("r3", t0 + 0.25, 8, 0, start=RequestStart("r3", (DEVICE,), t0)))
        return await asking

    work = asyncio.run(main())
    assert work is not None and work.energy is not None, "the row's joules come from here"
    assert (work.energy.device, work.prompt_tokens) == (DEVICE, 8)
    assert agent.attributor.running(DEVICE) == 0


def test_an_agent_that_never_had_the_request_answers_none_once_the_gateway_stops_asking(monkeypatch) -> None:
    import scheduler.cluster.node_agent as node_agent

    monkeypatch.setattr(node_agent, "ABANDON_GRACE_SECONDS", 0.05)
    agent = make_agent()
    t0 = time.monotonic()
    assert asyncio.run(agent.take_abandoned("never-here", 0.3)) is None
    assert 0.3 <= time.monotonic() - t0 < 1.0, "asked for 0.3 s: it waits that long, in grace-sized slices"


def _agent_with_pending_interval(t0: float) -> Any:
    """An agent whose one metered interval, [t0 - 0.2, t0 + 0.1] with 3 J, is still unsettled."""
    agent = make_agent()
    agent.attributor = Attributor(settle_delay_seconds=0.3)
    agent.attributor.on_interval(DEVICE, t0 - 0.2, t0 + 0.1, 3.0)
    return agent


def test_a_finish_whose_start_never_arrived_is_charged_as_if_it_had() -> None:
    """The finish carries the start: a request whose start call was lost or not yet sent is started
    then, and charged the same joules as one the agent knew of; a start arriving after it is ignored."""
    t0 = time.time()
    start = RequestStart("r3", (DEVICE,), t0)
    told, untold = _agent_with_pending_interval(t0), _agent_with_pending_interval(t0)
    told.start_request(start)

    async def finish(agent: Any):
        return await agent.finish_request(RequestFinish("r3", t0 + 0.05, 8, 2, start=start))

    expected, energy = asyncio.run(finish(told)), asyncio.run(finish(untold))
    # alone on the device for 0.05 s of a 0.3 s interval: a sixth of its 3 J
    assert energy.dynamic_joules == pytest.approx(expected.dynamic_joules) == pytest.approx(0.5)
    assert energy.complete and energy.metered
    untold.start_request(start)  # late: Ray delivered it after the finish
    assert untold.attributor.running(DEVICE) == 0
    assert untold.attributor.balance().accounted_joules == pytest.approx(3.0)


class RecordingAgent:
    """The real agent's request accounting, recording which calls reached it, in order."""

    def __init__(self) -> None:
        self.agent = make_agent()
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.agent, name)

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args[0] if args else None))
            return method(*args, **kwargs)

        return record


class SlowStartEngine(ScriptedEngine):
    """Takes `delay_s` before its first event (it waits for the model, behind other requests)."""

    def __init__(self, tokens: int, delay_s: float):
        super().__init__(tokens)
        self.delay_s = delay_s

    async def generate(self, request):
        await asyncio.sleep(self.delay_s)
        async for ev in super().generate(request):
            yield ev


def test_a_short_request_costs_its_agent_one_message_the_finish_carrying_its_start() -> None:
    """A request that ends before its start went: no start message, and the finish starts it with its counts."""
    recorder = RecordingAgent()

    async def main():
        server = make_server(ScriptedEngine(3), recorder)
        events = [ev async for ev in server.generate(REQUEST)]
        await asyncio.gather(*server.agent.tasks)
        return events

    events = asyncio.run(main())
    assert isinstance(events[-1], ReplicaEnd) and events[-1].energy is not None
    # the work attributed is the whole request's: 8 prompt tokens at the attributor's weight, 3 decoded
    assert events[-1].energy.work_tokens == 8 * recorder.agent.attributor.prefill_token_weight + 3
    # the first request goes by Ray calls while the link to the agent connects
    names = [name for name, _ in recorder.calls if name not in ("replica_stats", "link_address")]
    assert names == ["finish_request"], names
    finish = recorder.calls[-1][1]
    assert finish.start is not None and finish.start.progress_t_s is not None
    assert (finish.start.prompt_tokens, finish.start.completion_tokens) == (8, 3)  # the latest counts, not the first
    assert recorder.agent.attributor.running(DEVICE) == 0


class PacedEngine(ScriptedEngine):
    """Takes `gap_s` between its token events."""

    def __init__(self, tokens: int, gap_s: float):
        super().__init__(tokens)
        self.gap_s = gap_s

    async def generate(self, request):
        for i in range(1, self.tokens + 1):
            yield EngineEvent("w ", 8, i, time.time())
            await asyncio.sleep(self.gap_s)
        yield EngineEvent("", 8, self.tokens, time.time(), finished=True, finish_reason="length")


def test_a_longer_request_is_reported_running_soon_after_its_first_event_with_the_work_done() -> None:
    from scheduler.cluster.replica import START_WITH_WORK_DELAY_SECONDS

    recorder = RecordingAgent()

    async def main():
        server = make_server(PacedEngine(3, gap_s=START_WITH_WORK_DELAY_SECONDS * 3), recorder)
        gen = server.generate(REQUEST)
        assert isinstance(await gen.__anext__(), ReplicaStart)
        consumer = asyncio.create_task(_drain(gen))
        await asyncio.sleep(START_WITH_WORK_DELAY_SECONDS * 2)
        running_during_the_work = recorder.agent.attributor.running(DEVICE)
        events = await consumer
        await asyncio.gather(*server.agent.tasks)
        return running_during_the_work, events

    running, events = asyncio.run(main())
    assert running == 1
    assert isinstance(events[-1], ReplicaEnd) and events[-1].energy is not None
    names = [name for name, _ in recorder.calls if name not in ("replica_stats", "link_address")]
    assert names == ["start_request", "finish_request"], names
    start = next(msg for name, msg in recorder.calls if name == "start_request")
    assert (start.prompt_tokens, start.completion_tokens) == (8, 1) and start.progress_t_s is not None
    assert recorder.agent.attributor.running(DEVICE) == 0


def test_a_request_its_engine_has_not_started_is_reported_running_after_a_short_wait() -> None:
    """A queued request counts as running on its device (the governor and a parked device see it)."""
    from scheduler.cluster.replica import START_REPORT_DELAY_SECONDS

    recorder = RecordingAgent()

    async def main():
        server = make_server(SlowStartEngine(2, delay_s=START_REPORT_DELAY_SECONDS + 0.15), recorder)
        gen = server.generate(REQUEST)
        assert isinstance(await gen.__anext__(), ReplicaStart)
        consumer = asyncio.create_task(_drain(gen))
        await asyncio.sleep(START_REPORT_DELAY_SECONDS + 0.05)
        running_while_queued = recorder.agent.attributor.running(DEVICE)
        await consumer
        await asyncio.gather(*server.agent.tasks)
        return running_while_queued

    assert asyncio.run(main()) == 1
    names = [name for name, _ in recorder.calls if name not in ("replica_stats", "link_address")]
    assert names[0] == "start_request" and names[-1] == "finish_request"
    start = next(msg for name, msg in recorder.calls if name == "start_request")
    assert start.progress_t_s is None  # sent alone, before the engine's first event
    assert recorder.agent.attributor.running(DEVICE) == 0


async def _drain(gen: Any) -> list:
    return [ev async for ev in gen]


def test_a_request_cancelled_before_its_start_was_sent_is_still_settled_with_energy() -> None:
    agent = make_agent()

    async def main():
        server = make_server(SlowStartEngine(2, delay_s=3600), agent)
        gen = server.generate(REQUEST)
        await gen.__anext__()  # the start event: the engine now waits, the agent has heard nothing
        task = asyncio.create_task(_drain(gen))
        await asyncio.sleep(0.01)
        assert agent.attributor.running(DEVICE) == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.gather(*server.agent.tasks)
        return await agent.take_abandoned("r1", timeout_seconds=1.0)

    outcome = asyncio.run(main())
    assert outcome is not None and outcome.energy is not None and outcome.energy.device == DEVICE
    assert agent.attributor.running(DEVICE) == 0


def test_requests_go_over_the_agent_link_once_it_is_up_and_through_ray_when_it_breaks() -> None:
    """The link carries the same messages as the Ray calls: same accounting, and a broken link costs
    no request its energy (the finish then goes through Ray, carrying its start)."""
    recorder = RecordingAgent()

    async def main():
        server = make_server(ScriptedEngine(3), recorder)
        first = [ev async for ev in server.generate(REQUEST)]
        while server._link is None or not server._link.alive:  # connected in the background
            await asyncio.sleep(0.01)
        ray_calls = len(recorder.calls)
        second = [ev async for ev in server.generate(GenerationRequest("r2", ModelKind.CHAT, messages=[]))]
        over_link = [name for name, _ in recorder.calls[ray_calls:] if name != "replica_stats"]
        server._link._writer.transport.abort()  # the agent's end goes away mid-life
        await asyncio.sleep(0.01)
        third = [ev async for ev in server.generate(GenerationRequest("r3", ModelKind.CHAT, messages=[]))]
        await asyncio.gather(*server.agent.tasks)
        recorder.agent.close_link()
        return first[-1], second[-1], third[-1], over_link

    first, second, third, over_link = asyncio.run(main())
    assert over_link == [], "no Ray call for a request while the link is up"
    for end in (first, second, third):
        assert isinstance(end, ReplicaEnd) and end.energy is not None and end.energy.device == DEVICE
    assert recorder.agent.attributor.running(DEVICE) == 0
    assert [name for name, _ in recorder.calls if name == "finish_request"] == ["finish_request"] * 2


def test_replica_stats_go_over_the_agent_link_once_it_is_up() -> None:
    """Several stats pushes a second under load: as Ray actor calls they cost the replica and the agent far
    more CPU than a frame on the link, on a machine whose cores serve the requests too."""
    recorder = RecordingAgent()

    async def main():
        server = make_server(ScriptedEngine(1), recorder)
        [ev async for ev in server.generate(REQUEST)]  # its first request starts the link's connection
        while server._link is None or not server._link.alive:
            await asyncio.sleep(0.01)
        ray_calls = len(recorder.calls)
        server._stats_pushed_s = float("-inf")  # the throttle's interval has passed
        server._push_stats()
        await asyncio.sleep(0.05)  # the agent reads the frame
        recorder.agent.close_link()
        return recorder.calls[ray_calls:]

    later_ray_calls = asyncio.run(main())
    assert later_ray_calls == []
    assert recorder.agent._replica_stats["m#0"]["replica_id"] == "m#0"


def test_a_replica_on_another_ray_node_never_tries_the_agents_socket_and_asks_for_it_once(monkeypatch) -> None:
    """An upstream replica reports to the agent of its server's host, usually another machine: its socket
    path is of no use there (or, on a shared /tmp, another host's file that refuses connects)."""
    from scheduler.cluster import replica

    monkeypatch.setattr(replica, "LINK_RETRY_SECONDS", 0.0)  # a retry would come at every request
    recorder = RecordingAgent()

    async def main():
        server = make_server(ScriptedEngine(2), recorder)
        server.ray_node_id = "ray-node-b"
        ends = []
        for i in range(4):
            request = GenerationRequest(f"r{i}", ModelKind.CHAT, messages=[])
            ends.append([ev async for ev in server.generate(request)][-1])
            await asyncio.sleep(0.01)  # room for a background connect
        await asyncio.gather(*server.agent.tasks)
        return server, ends

    server, ends = asyncio.run(main())
    assert all(isinstance(e, ReplicaEnd) and e.energy is not None for e in ends)
    assert server._link is None and recorder.agent._link_server is None, "no socket opened for a remote replica"
    assert [a for n, a in recorder.calls if n == "link_address"] == ["ray-node-b"], "asked once, never again"
    assert [n for n, _ in recorder.calls].count("finish_request") == 4  # every request settled through Ray


@pytest.mark.parametrize(("agent_node", "replica_node", "reaches"), [
    ("ray-node-a", "ray-node-a", True), ("ray-node-a", "ray-node-b", False),
    (None, None, False), ("ray-node-a", None, False)])
def test_the_link_reaches_only_a_replica_on_the_agents_own_ray_node(agent_node, replica_node, reaches) -> None:
    from scheduler.cluster.agent_link import link_reaches

    agent = make_agent()
    agent.ray_node_id = agent_node

    async def main():
        path = await agent.link_address(replica_node)
        agent.close_link()
        return path

    path = asyncio.run(main())
    assert link_reaches(agent_node, replica_node) is reaches
    assert (path is not None) is reaches


def test_replicas_that_ask_for_the_link_at_once_get_one_socket() -> None:
    """Replicas that ask while the first server still starts get that server, not one each: each extra one
    listened on a socket of its own for the agent's life, and close_link closed only the last."""
    agent = make_agent()

    async def main():
        paths = await asyncio.gather(*(agent.link_address(RAY_NODE) for _ in range(3)))
        agent.close_link()
        return paths

    paths = asyncio.run(main())
    assert len(set(paths)) == 1 and paths[0] is not None
    assert not os.path.exists(paths[0]), "closed with the agent's link"


def test_an_agent_link_removes_the_sockets_of_dead_agents_and_its_own_on_close(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys
    import tempfile

    from scheduler.cluster import agent_link

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"wattlane-agent-{dead.stdout.strip()}-0000.sock"
    stale.touch()
    live = tmp_path / f"wattlane-agent-{os.getpid()}-1111.sock"
    live.touch()

    async def main() -> str:
        server = agent_link.AgentLinkServer(make_agent(), agent_link.socket_path())
        await server.start()
        path = server.path
        assert os.path.exists(path)
        server.close()
        return path

    path = asyncio.run(main())
    assert not stale.exists() and live.exists() and not os.path.exists(path)


def test_the_agent_link_answers_a_finish_at_once_with_the_same_energy_a_late_abandon_gets() -> None:
    """The link answers a finish without a task when nothing must be waited for; the outcome is still kept
    for a replica cancelled while it waited (its abandon_request must get the same joules, not new ones)."""
    from scheduler.cluster import agent_link

    agent = make_agent()
    t0 = time.time()

    async def main():
        server = agent_link.AgentLinkServer(agent, agent_link.socket_path())
        await server.start()
        link = await agent_link.AgentLink.connect(server.path)
        try:
            start = RequestStart("r1", (DEVICE,), t0 - 0.5)
            energy = await link.call(RequestFinish("r1", t0, 8, 3, start=start))  # its start never went alone
            spawned = len(server._tasks)
            running = agent.attributor.running(DEVICE)
            await agent.abandon_request(RequestFinish("r1", time.time(), 8, 3))
            late = await agent.take_abandoned("r1", 0.1)
            return energy, spawned, running, late
        finally:
            link.close()
            server.close()

    energy, spawned, running, late = asyncio.run(main())
    assert energy is not None and energy.work_tokens == 8 * agent.attributor.prefill_token_weight + 3
    assert spawned == 0, "answered without a task"
    assert running == 0
    assert late is not None and late.energy == energy, "one request, one charge"


def test_a_replica_that_found_its_node_agent_gone_keeps_out_of_routing_until_the_health_probe_finds_it_back():
    """Serve's router keeps offering a replica by its last published stats until the health probe has failed
    it three times; one whose agent left with its node says 'ejected' at once, which the router honours."""
    from scheduler.engines.base import EngineUnavailable

    agent = make_agent()

    async def main():
        server = make_server(ScriptedEngine(0, error=EngineUnavailable("the node agent hosting it is gone")), agent)
        before = server.record_routing_stats().get("ejected")
        events = [ev async for ev in server.generate(REQUEST)]
        gone = server.record_routing_stats().get("ejected")
        server.agent = Remote(SimpleNamespace(ready=lambda: {"pid": 1}, replica_stats=lambda rid, stats: None))  # back
        await server.check_health()
        back = server.record_routing_stats().get("ejected")
        return before, events[-1], gone, back

    before, last, gone, back = asyncio.run(main())
    assert isinstance(last, ReplicaError) and last.kind is ReplicaErrorKind.UNAVAILABLE
    assert (before, gone, back) == (None, True, None)

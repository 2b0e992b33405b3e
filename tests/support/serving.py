"""The real serving path in one process, without Ray: Serving -> ModelServer -> SimulatedEngine, NodeAgent.

Only the Ray boundary is replaced: a deployment handle becomes InProcessHandle (each call runs the
real ModelServer.generate in its own task, and every message is pickled on the way, as Ray would),
and an actor handle becomes Remote (obj.method.remote(...) runs the real method). The engines are
the real SimulatedEngine on SimulatedGpu devices, metered by the node agent's real DeviceMeter
(read at each request's end), so the energy and carbon in the results are what the fleet would report.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from scheduler.api.accounting import Accounting
from scheduler.api.model_selection import ModelSelection
from scheduler.api.serving import Serving
from scheduler.cluster.node_agent import NodeAgent
from scheduler.cluster.replica import ModelServer, whole_answer
from scheduler.config import CarbonConfig, WattlaneConfig, load_config
from scheduler.datafiles import sim_fleet_config
from scheduler.devices.simulated import SimulatedGpu
from scheduler.energy.attribution import Attributor
from scheduler.energy.baseline import SavingsBaseline
from scheduler.energy.carbon import make_carbon_provider
from scheduler.energy.ledger import Ledger
from scheduler.energy.meter import DeviceMeter
from scheduler.energy.metrics import WattlaneMetrics
from scheduler.engines.simulated import build_simulated_engine
from scheduler.teams.guard import TeamGuard
from scheduler.teams.store import TeamsStore

NODE = "sim-node0"


def _over_the_wire(obj: Any) -> Any:
    """What arrives on the other side of a Ray call: a pickled copy (a non-picklable message fails here too)."""
    return pickle.loads(pickle.dumps(obj))


class Remote:
    """An actor handle, in-process: handle.method.remote(...) runs the real method (coroutines as tasks)."""

    def __init__(self, target: Any):
        self._target = target
        self.tasks: list[asyncio.Task] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        def remote(*args: Any, **kwargs: Any) -> Any:
            out = method(*_over_the_wire(args), **_over_the_wire(kwargs))
            loop = asyncio.get_running_loop()
            if inspect.iscoroutine(out):  # runs whether or not the caller awaits it, as on an actor
                task = loop.create_task(out)
                self.tasks.append(task)
                return task
            fut = loop.create_future()
            fut.set_result(out)
            return fut

        return SimpleNamespace(remote=remote)


class InProcessStream:
    """A streaming DeploymentResponse: the replica's generator runs in its own task, like a remote call."""

    def __init__(self, agen: Any):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump(agen))
        self.cancelled = False
        #: every event the replica sent (each one a Ray round of its own in a deployment)
        self.sent: list[Any] = []

    async def _pump(self, agen: Any) -> None:
        try:
            async for ev in agen:
                self.sent.append(ev)
                await self._queue.put(("event", _over_the_wire(ev)))
            await self._queue.put(("end", None))
        except Exception as exc:
            await self._queue.put(("raise", exc))

    def __aiter__(self) -> "InProcessStream":
        return self

    async def __anext__(self) -> Any:
        kind, value = await self._queue.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "raise":
            raise value
        return value

    def cancel(self) -> None:
        """Serve cancels the replica's request: its generator gets CancelledError where it waits."""
        self.cancelled = True
        self._task.cancel()


class InProcessResponse:
    """A unary DeploymentResponse: await it for the answer; cancel() cancels the call, and with it the request
    on the replica (Serve cancels the replica's task)."""

    def __init__(self, coro: Any):
        self._task = asyncio.get_running_loop().create_task(coro)
        self.cancelled = False

    def __await__(self) -> Any:
        return self._task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


def whole_call(stream_remote: Any) -> Any:
    """A handle's unary generate_whole.remote in front of a stand-in's streaming remote(request, placement,
    deltas): the stream's events without deltas, as one answer (what ModelServer.generate_whole returns)."""
    def remote(request: Any, placement: Any = None) -> InProcessResponse:
        stream = stream_remote(request, placement, False)

        async def answer() -> Any:
            try:
                return await whole_answer(stream)
            except asyncio.CancelledError:
                stream.cancel()
                raise

        return InProcessResponse(answer())

    return remote


class InProcessHandle:
    """A DeploymentHandle to one in-process ModelServer."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.streams: list[InProcessStream] = []
        #: the unary calls (ModelServer.generate_whole: non-streaming requests), in order
        self.calls: list[InProcessResponse] = []

    def options(self, **_: Any) -> "InProcessHandle":
        return self

    @property
    def generate(self) -> SimpleNamespace:
        def remote(request: Any, placement: Any = None, deltas: bool = True) -> InProcessStream:
            stream = InProcessStream(self.server.generate(_over_the_wire(request), placement=placement, deltas=deltas))
            self.streams.append(stream)
            return stream

        return SimpleNamespace(remote=remote)

    @property
    def generate_whole(self) -> SimpleNamespace:
        def remote(request: Any, placement: Any = None) -> InProcessResponse:
            async def call() -> Any:
                return _over_the_wire(await self.server.generate_whole(_over_the_wire(request), placement=placement))

            response = InProcessResponse(call())
            self.calls.append(response)
            return response

        return SimpleNamespace(remote=remote)


class _Server(ModelServer):
    def __del__(self) -> None:  # Serve awaits ModelServer.__del__; here the engine closes with the fleet
        pass


def node_agent(devices: dict[str, SimulatedGpu], config: WattlaneConfig) -> Any:
    """The real NodeAgent's request accounting and meter, without Ray, power service or meter thread."""
    agent = object.__new__(NodeAgent.__ray_actor_class__)
    agent.config = config
    agent.node = NODE
    agent.devices = dict(devices)
    agent.attributor = Attributor(prefill_token_weight=config.energy.prefill_token_weight,
                                  idle_amortization_seconds=config.energy.idle_amortization_seconds,
                                  settle_delay_seconds=0.3)
    agent.meter = DeviceMeter(list(devices.values()), 3600.0)  # no ticks: every request is closed by a read
    agent.meter.add_callback(agent._on_interval)
    agent.meter.baseline()
    agent.power = SimpleNamespace(work_arrived=lambda d: None, report_replica_stats=lambda r, s: None)
    agent._init_request_accounting()
    return agent


def model_server(model_id: str, config: WattlaneConfig, devices: dict[str, SimulatedGpu], agent: Remote) -> ModelServer:
    model = config.model(model_id)
    engine = build_simulated_engine(model, config, devices)
    server = object.__new__(_Server)
    server.config, server.model, server.state_dir = config, model, Path(".")
    server.replica_id = f"{model_id}#0"
    server.device_ids = [g.device_id for g in engine.core.gpus]
    server.node = NODE
    server.agent = agent
    server.engine = engine
    server._joules_per_work_token = None
    return server


class Fleet:
    """The simulated fleet's models, one replica each, behind a real Serving object."""

    def __init__(self, state_dir: Path, config: WattlaneConfig | None = None, *, admission: str = "queue",
                 tracer: Any = None):
        config = config or load_config(sim_fleet_config())
        config.energy.carbon = CarbonConfig(provider="fixed", intensity_gco2e_per_kwh=400.0, region="FRA", pue=1.2)
        config.routing.admission = admission
        config.routing.replica_timeout_seconds = 5.0
        self.config = config
        self.devices = {d.id: SimulatedGpu(d.id, d.profile, node=d.node) for d in config.devices.simulated}
        self.agent = node_agent(self.devices, config)
        self.agent_handle = Remote(self.agent)
        self.handles: dict[str, Any] = {m.id: InProcessHandle(model_server(m.id, config, self.devices, self.agent_handle))
                                        for m in config.models}
        self.ledger = Ledger(state_dir / "ledger.sqlite3")
        self.metrics = WattlaneMetrics()

        async def take_abandoned(node: str, request_id: str, timeout_seconds: float) -> Any:
            return await self.agent_handle.take_abandoned.remote(request_id, timeout_seconds)

        carbon = make_carbon_provider(config.energy.carbon)
        self.accounting = Accounting(carbon, self.ledger, self.metrics, abandoned=take_abandoned, tracer=tracer,
                                     baseline=SavingsBaseline(config.models,
                                                              prefill_token_weight=config.energy.prefill_token_weight))
        # the gateway's teams admission on the state directory's real teams database (acts only on jobs with a quota)
        self.teams_store = TeamsStore(state_dir)
        self.guard = TeamGuard(self.teams_store, grams_per_joule=lambda: carbon.footprint(1.0).gco2e,
                               on_budget_use=self.metrics.set_budget_used)
        self.serving = Serving(config, ModelSelection(config), self.accounting, self.handles, teams=self.guard)

    def rows(self) -> list[dict[str, Any]]:
        return self.ledger.requests(limit=None)

    async def aclose(self) -> None:
        await self.serving.settled()
        await asyncio.gather(*self.agent_handle.tasks, return_exceptions=True)
        for h in self.handles.values():
            if isinstance(h, InProcessHandle) and h.server._link is not None:
                h.server._link.close()
        self.agent.close_link()
        for h in self.handles.values():
            if isinstance(h, InProcessHandle):
                await h.server.engine.close()
        self.ledger.close()

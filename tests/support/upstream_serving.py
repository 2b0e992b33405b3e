"""An upstream model's serving path in one process, without Ray: Serving -> the real router ranking ->
ModelServer replicas hosting the real UpstreamEngine -> real HTTP servers on loopback.

Only Ray's boundary is replaced (as in tests/support/serving.py): a deployment handle becomes a
ReplicaSet that asks scheduler.routing.serve_router.rank_running_replicas, the code Serve's router
runs, which replica takes each call, from the stats each replica publishes at that moment. No
node agent runs on the servers' host, so energy is the joules-per-token estimate (upstream-jpt-estimate);
the replicas' own node (the gateway's here) has one, the real NodeAgent's request accounting, which
keeps an abandoned request's estimate for the gateway.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from scheduler.api.accounting import Accounting
from scheduler.api.model_selection import ModelSelection
from scheduler.api.serving import Serving
from scheduler.cluster.node_agent import NodeAgent
from scheduler.config import WattlaneConfig
from scheduler.energy.carbon import make_carbon_provider
from scheduler.energy.ledger import Ledger
from scheduler.energy.metrics import WattlaneMetrics
from scheduler.engines.openai_upstream import build_upstream_engine
from scheduler.routing.serve_router import rank_running_replicas
from tests.support.serving import InProcessStream, Remote, _over_the_wire, _Server

NODE = "upstream-host"
#: where the replicas run, with a node agent (the servers' host has none)
REPLICA_NODE = "gateway-host"


def upstream_config(endpoints: list[tuple[str, str]], devices: tuple[str, ...] = ("cpu0",),
                    **upstream: Any) -> WattlaneConfig:
    """One chat model `up` served by the given (base_url, served_model_name) endpoints, each on `devices`."""
    return WattlaneConfig.model_validate({
        "models": [{"id": "up", "kind": "chat", "engine": "openai", "params_b": 0.135,
                    "endpoints": [{"base_url": url, "served_model_name": name, "node": NODE, "devices": list(devices)}
                                  for url, name in endpoints],
                    "upstream": {"health_check_period_seconds": 0.2, "read_timeout_seconds": 1.0, **upstream}}],
        "energy": {"carbon": {"provider": "fixed", "intensity_gco2e_per_kwh": 400.0, "region": "FRA"}},
        "routing": {"replica_timeout_seconds": 5.0},
    })


def replica(config: WattlaneConfig, rank: int, own_agent: Any = None) -> _Server:
    model = config.models[0]
    server = object.__new__(_Server)
    server.config, server.model, server.state_dir = config, model, Path(".")
    server.rank, server.replica_id = rank, f"{model.id}#{rank}"
    server.device_ids = list(model.endpoints[rank].devices)
    server.node = NODE
    server.agent = None  # no node agent on the server's host: the estimate
    server.home_node, server.home_agent = REPLICA_NODE, own_agent
    server.engine = build_upstream_engine(model, config, Path("."), replica_index=rank)
    server._joules_per_work_token = None
    return server


class ReplicaSet:
    """A deployment handle over several in-process replicas, placed by the real router ranking."""

    def __init__(self, servers: list[_Server]):
        self.servers = servers
        self.chosen: list[str] = []

    def options(self, **_: Any) -> "ReplicaSet":
        return self

    @property
    def generate(self) -> SimpleNamespace:
        def remote(request: Any, placement: Any = None, deltas: bool = True) -> InProcessStream:
            candidates = [SimpleNamespace(routing_stats=s.record_routing_stats(), server=s) for s in self.servers]
            ranks = rank_running_replicas(candidates, SimpleNamespace(kwargs={"placement": placement}, args=()))
            server = ranks[0][0].server
            self.chosen.append(server.replica_id)
            return InProcessStream(server.generate(_over_the_wire(request), placement=placement, deltas=deltas))

        return SimpleNamespace(remote=remote)


class UpstreamFleet:
    def __init__(self, config: WattlaneConfig):
        self.config = config
        self.agent = object.__new__(NodeAgent.__ray_actor_class__)  # request accounting only: no devices
        self.agent.node, self.agent.devices, self.agent.power_action_counts = REPLICA_NODE, {}, {}
        self.agent._init_request_accounting()
        self.agent_handle = Remote(self.agent)
        self.replicas = ReplicaSet([replica(config, i, self.agent_handle)
                                    for i in range(len(config.models[0].endpoints))])
        self.ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.sqlite3")
        #: the nodes the gateway asked for abandoned work
        self.abandoned_lookups: list[str] = []

        async def take_abandoned(node: str, request_id: str, timeout_seconds: float) -> Any:
            self.abandoned_lookups.append(node)
            if node != REPLICA_NODE:
                return None  # no agent on the servers' host (runtime.get_node_agent finds none)
            return await self.agent_handle.take_abandoned.remote(request_id, timeout_seconds)

        self.accounting = Accounting(make_carbon_provider(config.energy.carbon), self.ledger, WattlaneMetrics(),
                                     abandoned=take_abandoned)
        self.serving = Serving(config, ModelSelection(config), self.accounting, {"up": self.replicas})

    def engines(self) -> list[Any]:
        return [s.engine for s in self.replicas.servers]

    def rows(self) -> list[dict[str, Any]]:
        return self.ledger.requests(limit=None)

    async def aclose(self) -> None:
        await self.serving.settled()
        for s in self.replicas.servers:
            await s.engine.close()
        self.ledger.close()

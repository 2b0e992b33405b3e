"""The gateway's real FastAPI app (create_app) in-process, without Ray, for fast HTTP-level tests.

What stands in for Ray: a gateway object with the attributes the routes use; behind it the real
serving path of tests/support/serving.py (Serving -> ModelServer -> SimulatedEngine, a real SQLite
ledger) and, for the operator routes, real NodeAgent power methods over a real PowerService on
simulated GPUs. Only Ray's handles are replaced by in-process calls.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scheduler.api.auth import hash_key
from scheduler.cluster.node_agent import NodeAgent
from scheduler.config import ApiKeyConfig, WattlaneConfig
from scheduler.teams.keys import KeyCache, KeyRegistry
from tests.support.serving import Fleet, Remote

KEYS = {"client": "unit-client-key", "reader": "unit-reader-key", "operator": "unit-operator-key"}
NODE = "node-a"


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


def agent_for(service: Any) -> Remote:
    """A node agent's actor handle, in-process: the real NodeAgent power methods over `service`."""
    agent = object.__new__(NodeAgent.__ray_actor_class__)
    agent.power, agent.devices, agent.node = service, service.devices, service.node
    return Remote(agent)


class GatewayForTests:
    def __init__(self, state_dir: Path, config: WattlaneConfig | None = None, *, with_keys: bool = True,
                 power_nodes: dict[str, Any] | None = None, tracer: Any = None, teams: dict[str, str] | None = None):
        self.fleet = Fleet(state_dir, config, tracer=tracer)
        self.config = self.fleet.config
        if with_keys:
            # teams: role -> team of that role's key (none by default)
            self.config.server.api_keys = [ApiKeyConfig(id=f"{r}-key", key_sha256=hash_key(k), role=r,
                                                        team=(teams or {}).get(r))
                                           for r, k in KEYS.items()]
        self.started_s = int(time.time())
        self.ledger = self.fleet.ledger
        self.metrics = self.fleet.metrics
        self.serving = self.fleet.serving
        self.teams_store = self.fleet.teams_store
        self.key_cache = KeyCache(self.teams_store)
        self.key_registry = KeyRegistry(self.teams_store, {k.id for k in self.config.server.api_keys})
        self.model_handles = self.fleet.handles
        self.replica_stats: dict[str, Any] = {}
        self.device_snapshots: list[dict[str, Any]] = []
        #: node name -> PowerService (one per "node agent")
        self.power_nodes = power_nodes or {}
        self.ready = True
        self.metrics.set_device_source(lambda: self.device_snapshots)
        self._startups_recorded: set[tuple[str, str, float]] = set()

    # what the routes call on the real Gateway
    def extra_routers(self) -> list[Any]:
        from scheduler.api.routes import dashboard, energy, operator
        from scheduler.teams import routes as teams

        return [energy.router, operator.router, dashboard.router, teams.router]

    async def agents(self) -> dict[str, Remote]:
        return {node: agent_for(svc) for node, svc in self.power_nodes.items()}

    async def agent_for_device(self, device_id: str) -> Remote | None:
        for node, svc in self.power_nodes.items():
            if device_id in svc.devices:
                return agent_for(svc)
        return None

    async def refresh_devices(self) -> list[dict[str, Any]]:
        snaps = []
        for node, svc in self.power_nodes.items():
            for device in svc.devices.values():
                snap = asdict(device.snapshot())
                snap.update(energy_joules_metered=snap["energy_joules"], running_requests=0, agent_node=node)
                snaps.append(snap)
        self.device_snapshots = snaps
        return snaps

    async def record_startups(self) -> None:
        from scheduler.api.gateway import Gateway

        await Gateway._record_startups(self)  # type: ignore[arg-type]  # the real code, on this double's snapshots

    def pending_startups(self) -> list[dict[str, Any]]:
        from scheduler.api.gateway import pending_startup_rows

        return pending_startup_rows(self.device_snapshots, self._startups_recorded)

    def ensure_refresher(self) -> None:
        pass

    def replicas_by_model(self) -> None:
        return None

    async def check_ready(self) -> tuple[bool, list[str]]:
        if self.ready:
            return True, []
        return False, [f"{self.config.models[0].id}: TimeoutError"]

    def close(self) -> None:
        self.ledger.close()  # the engines' tasks ended with the test client's event loop
        for svc in self.power_nodes.values():
            svc.close()


def power_node(state_dir: Path, node: str, device_ids: list[str]) -> Any:
    """A real PowerService (recommend mode) over simulated GPUs, as one node agent holds it."""
    from scheduler.devices.simulated import SimulatedGpu
    from scheduler.power.service import PowerService

    cfg = WattlaneConfig.model_validate({
        "models": [{"id": "m", "kind": "chat", "engine": "simulated", "devices": []}],
        "power": {"mode": "recommend", "groups": [{"name": "rack", "devices": device_ids, "policy": "none"}]},
    })
    devices = {d: SimulatedGpu(d, "h100-sxm", node=node) for d in device_ids}
    node_dir = state_dir / node
    node_dir.mkdir(parents=True, exist_ok=True)
    return PowerService(cfg, devices, node_dir, node, start_loop=False)


def build(state_dir: Path, **kwargs: Any):
    """(app, gateway): the real create_app around a GatewayForTests."""
    from scheduler.api.app import create_app

    gw = GatewayForTests(state_dir, **kwargs)
    return create_app(gw), gw

"""The gateway's real FastAPI app (create_app) in-process, without Ray, for fast HTTP-level tests.

What stands in for Ray: a gateway object with the attributes the routes use, a real SQLite ledger,
a real GatewayRouter, and node agents that forward power_call to a real PowerService over
simulated GPUs (as the node agent actor does). Inference answers come from a canned service that
returns what the replicas would (InferenceResult / a stream of deltas), so the routes' own work
(ids, headers, JSON and SSE shapes) is what the tests exercise.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scheduler.api.auth import hash_key
from scheduler.api.inference import InferenceResult, Job
from scheduler.api.router import GatewayRouter
from scheduler.config import ApiKeyConfig, WattlaneConfig, load_config
from scheduler.energy.ledger import Ledger, LedgerRow

KEYS = {"client": "unit-client-key", "reader": "unit-reader-key", "operator": "unit-operator-key"}
NODE = "node-a"


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[role]}"}


class AgentForTests:
    """A node agent's power_call, in-process: the same checks, forwarded to a real PowerService."""

    def __init__(self, service: Any):
        self.service = service
        self.power_call = self

    async def remote(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method.endswith(("power_limit", "locked_clocks")) and kwargs.get("device_id") not in self.service.devices:
            raise KeyError(f"device '{kwargs.get('device_id')}' is not on node {self.service.node}")
        return await asyncio.to_thread(getattr(self.service, method), *args, **kwargs)


class CannedService:
    """Routes each job with the real router, then answers a fixed text and records it as the real service does."""

    def __init__(self, gateway: GatewayForTests, text: str = "Hello there"):
        self.gw = gateway
        self.text = text

    def _result(self, job: Job) -> InferenceResult:
        # the real router decides (and refuses: unknown model, too long, over budget) before any replica runs
        model = self.gw.router.route(job, self.gw.replicas_by_model()).model
        return InferenceResult(
            request_id=job.request_id, model=model, text=self.text, finish_reason="stop", prompt_tokens=5,
            completion_tokens=3, routing={"model": model, "device": "cpu0", "node": NODE, "reason": "canned"},
            energy={"joules": 1.5, "dynamic_joules": 1.0, "idle_joules": 0.5, "method": "cpu-estimate",
                    "scope": "cpu", "device": "cpu0"},
            carbon={"gco2e": 0.0002, "intensity_gco2e_per_kwh": 400.0, "pue": 1.2, "source": "fixed", "region": "FRA"},
            ttft_seconds=0.01, tpot_seconds=0.01, latency_seconds=0.03, created_s=int(time.time()))

    async def run(self, job: Job) -> InferenceResult:
        result = self._result(job)
        await self.gw.record(job, result)
        return result

    async def open(self, job: Job) -> CannedStream:
        return CannedStream(self, job)


class CannedStream:
    def __init__(self, service: CannedService, job: Job):
        self.service, self.job = service, job
        self.result: InferenceResult | None = None
        final = service._result(job)
        self.routing = final.routing
        self.routed = type("Routed", (), {"model": final.model})()
        self.started_s = time.time()
        self._final = final
        self.system_fingerprint: str | None = None

    async def deltas(self):
        for word in self.service.text.split(" "):
            yield word + " "
        await self.service.gw.record(self.job, self._final)
        self.result = self._final


class GatewayForTests:
    def __init__(self, state_dir: Path, config: WattlaneConfig | None = None, *, with_keys: bool = True,
                 power_nodes: dict[str, Any] | None = None):
        self.config = config or load_config(None)
        if with_keys:
            self.config.server.api_keys = [ApiKeyConfig(id=f"{r}-key", key_sha256=hash_key(k), role=r)
                                           for r, k in KEYS.items()]
        self.started_s = int(time.time())
        self.ledger = Ledger(state_dir / "ledger.sqlite3")
        self.router = GatewayRouter(self.config)
        self.service = CannedService(self)
        self.model_handles: dict[str, Any] = {}
        self.replica_stats: dict[str, Any] = {}
        self.device_snapshots: list[dict[str, Any]] = []
        #: node name -> PowerService (one per "node agent")
        self.power_nodes = power_nodes or {}
        self.ready = True
        from scheduler.energy.metrics import WattlaneMetrics

        self.metrics = WattlaneMetrics()
        self.metrics.set_device_source(lambda: self.device_snapshots)

    # what the routes call on the real Gateway
    def extra_routers(self) -> list[Any]:
        from scheduler.api.routes import dashboard, energy, operator

        return [energy.router, operator.router, dashboard.router]

    def agents(self) -> dict[str, AgentForTests]:
        return {node: AgentForTests(svc) for node, svc in self.power_nodes.items()}

    def agent_for_device(self, device_id: str) -> AgentForTests | None:
        for node, svc in self.power_nodes.items():
            if device_id in svc.devices:
                return AgentForTests(svc)
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

    def ensure_refresher(self) -> None:
        pass

    def replicas_by_model(self) -> None:
        return None

    async def check_ready(self) -> tuple[bool, list[str]]:
        if self.ready:
            return True, []
        return False, [f"{self.config.models[0].id}: TimeoutError"]

    async def record(self, job: Job, result: InferenceResult, status: str = "ok") -> None:
        await self.ledger.arecord(LedgerRow(
            request_id=result.request_id, time_unix_s=time.time(), model=result.model, device="cpu0", node=NODE,
            status=status, api_key_id=job.api_key_id, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, joules=(result.energy or {}).get("joules"),
            energy_method=(result.energy or {}).get("method")))

    def close(self) -> None:
        self.ledger.close()
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

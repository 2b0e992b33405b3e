"""The gateway deployment: Ray Serve's ingress; it builds the serving object and keeps live readings.

Serve constructs it with one DeploymentHandle per model; it wires them with the model selection and
the accounting (carbon, ledger, metrics) into an api.serving.Serving, and __serve_build_asgi_app__
builds the FastAPI app around it (the routes reach it through request.app.state). It also refreshes
the node agents' device readings and replica stats each second, for routing, /metrics and /v1/devices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from scheduler.api.accounting import ABANDONED_WAIT_SECONDS, Accounting
from scheduler.api.model_selection import ModelSelection
from scheduler.api.serving import Serving
from scheduler.cluster import runtime
from scheduler.cluster.messages import GatewayView
from scheduler.config import WattlaneConfig
from scheduler.energy.baseline import SavingsBaseline
from scheduler.energy.ledger import method_kind

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 5.0
#: how often the gateway looks for nodes that joined without an agent
AGENT_CHECK_SECONDS = 5.0


class Gateway:
    def __init__(self, config: dict[str, Any], state_dir: str, model_handles: dict[str, Any]):
        runtime.configure_process_logging()
        self.config = WattlaneConfig.model_validate(config)
        self.state_dir = Path(state_dir)
        self.model_handles = model_handles
        self.started_s = int(time.time())
        #: live ReplicaStats per replica id, as the replicas last pushed them to their node agents
        self.replica_stats: dict[str, dict[str, Any]] = {}
        from scheduler.energy.carbon import make_carbon_provider
        from scheduler.energy.ledger import Ledger
        from scheduler.energy.metrics import WattlaneMetrics

        self.carbon = make_carbon_provider(self.config.energy.carbon, config_dir=self.config.config_dir())
        self.ledger = Ledger(self.state_dir / "ledger.sqlite3")
        self.metrics = WattlaneMetrics()
        self.device_snapshots: list[dict[str, Any]] = []
        self.metrics.set_device_source(lambda: self.device_snapshots)
        self._refresher: asyncio.Task | None = None
        self._power_seen: dict[tuple[str, str], int] = {}
        #: (node, device, agent start) whose start-up energy is in the ledger
        self._startups_recorded: set[tuple[str, str, float]] = set()
        self.tracer = None
        if self.config.telemetry.otlp_endpoint:
            from scheduler.telemetry.otel import tracer_from_config

            self.tracer = tracer_from_config(self.config.telemetry, server_port=self.config.server.port)
        from scheduler.teams.guard import TeamGuard
        from scheduler.teams.keys import KeyCache, KeyRegistry
        from scheduler.teams.store import TeamsStore

        # run-time keys, limits and budgets: one SQLite file that every gateway replica and the CLI share
        self.teams_store = TeamsStore(self.state_dir)
        self.key_cache = KeyCache(self.teams_store)
        self.key_registry = KeyRegistry(self.teams_store, {k.id for k in self.config.server.api_keys})
        self.serving = Serving(
            self.config, ModelSelection(self.config),
            Accounting(self.carbon, self.ledger, self.metrics, abandoned=_take_abandoned,
                       baseline=SavingsBaseline(self.config.models, self.replicas_by_model,
                                                 prefill_token_weight=self.config.energy.prefill_token_weight),
                       tracer=self.tracer),
            model_handles, replicas_by_model=self.replicas_by_model, on_request=self.ensure_refresher,
            teams=TeamGuard(self.teams_store, grams_per_joule=lambda: self.carbon.footprint(1.0, time.time()).gco2e,
                            on_budget_use=self.metrics.set_budget_used))

    def __serve_build_asgi_app__(self):
        from scheduler.api.app import create_app

        return create_app(self)

    def extra_routers(self) -> list[Any]:
        from scheduler.api.routes import dashboard, energy, operator
        from scheduler.teams import routes as teams

        return [energy.router, operator.router, dashboard.router, teams.router]

    # --- node agents and live readings -----------------------------------------------------------
    async def agents(self) -> dict[str, Any]:
        """The node agents of the alive nodes, by node name (a node that left is dropped here at once).

        Looked up in a worker thread: each lookup is a blocking call to Ray's GCS, and on the event
        loop it would hold up every request in flight (the refresher asks every second)."""
        return await asyncio.to_thread(_alive_agents)

    def ensure_agents(self) -> None:
        """Start the agent of a node that joined since (blocking: call it from a worker thread).

        Its simulated GPUs (if any are named for it) appear in /v1/devices on the next refresh, and
        the replicas waiting for them can start."""
        from scheduler.cluster.agents import start_node_agents

        nodes = runtime.cluster_nodes()
        if all(runtime.get_node_agent(n.name) is not None for n in nodes):
            return
        log.info("starting node agents for nodes that joined")
        start_node_agents(self.config, self.state_dir, detached=True)

    async def agent_for_device(self, device_id: str) -> Any:
        for snap in self.device_snapshots:
            if snap.get("device_id") == device_id:
                return await asyncio.to_thread(runtime.get_node_agent, snap.get("agent_node") or snap["node"])
        return None

    async def refresh_devices(self) -> list[dict[str, Any]]:
        """Pull every node agent's view: device readings, replica stats, power-action totals."""
        agents = list((await self.agents()).items())
        views = await asyncio.gather(*(a.gateway_view.remote() for _, a in agents), return_exceptions=True)
        snaps: list[dict[str, Any]] = []
        fresh: dict[str, dict[str, Any]] = {}
        for (node, _), view in zip(agents, views):
            if not isinstance(view, GatewayView):  # an agent that does not answer keeps its old data out
                continue
            snaps.extend(view.devices)
            fresh.update(view.replica_stats)
            self._sync_power_actions(node, view.power_action_totals)
        self.device_snapshots = snaps
        self.replica_stats = fresh
        await self._record_startups()
        for replica_id, st in fresh.items():
            self.metrics.set_replica_queue(model=st.get("model_id", ""), replica=replica_id,
                                           running=int(st.get("running", 0)), waiting=int(st.get("waiting", 0)))
        return snaps

    async def record_startups(self) -> None:
        """Put each device's start-up energy in the ledger once it is final (docs/energy.md, Start-up energy)."""
        if not self.device_snapshots or not all(s.get("startup_settled") for s in self.device_snapshots):
            # the last refresh (up to a second old) may predate the ready mark: a summary asked for just
            # after start-up must not miss the start-up energy the agents already know is final
            await self.refresh_devices()  # it records them
        else:
            await self._record_startups()

    async def _record_startups(self) -> None:
        for snap in self.device_snapshots:
            if not snap.get("startup_settled"):
                continue
            key = (snap.get("agent_node") or snap["node"], snap["device_id"], float(snap["started_unix_s"]))
            if key in self._startups_recorded:
                continue
            await asyncio.to_thread(self.ledger.record_startup, node=key[0], device=key[1], started_unix_s=key[2],
                                    ready_unix_s=float(snap["ready_unix_s"]), joules=float(snap["startup_energy_joules"]),
                                    energy_method=snap.get("energy_method"), energy_scope=snap.get("energy_scope"))
            self._startups_recorded.add(key)

    def pending_startups(self) -> list[dict[str, Any]]:
        """Start-up energy the agents know but have not settled yet (the service became ready less than
        about a second ago), as summary rows marked settled=False: a summary asked for then shows it
        instead of leaving it out until the ledger has the final figure."""
        return pending_startup_rows(self.device_snapshots, self._startups_recorded)

    def _sync_power_actions(self, node: str, totals: dict[str, int]) -> None:
        """The agents count actions; the counter here advances by what is new since the last look."""
        for key, n in totals.items():
            seen = self._power_seen.get((node, key), 0)
            if n > seen:
                device, action = key.split("|", 1)
                self.metrics.power_action(device=device, action=action, count=n - seen)
                self._power_seen[(node, key)] = n

    def replicas_by_model(self) -> dict[str, list[dict[str, Any]]] | None:
        """Live stats grouped by model for routing; None until every model's replicas have reported."""
        by_model: dict[str, list[dict[str, Any]]] = {}
        for stats in self.replica_stats.values():
            by_model.setdefault(stats.get("model_id", ""), []).append(stats)
        if any(m.id not in by_model for m in self.config.models):
            return None  # decide from the size priors rather than call a silent model "down"
        return by_model

    def ensure_refresher(self) -> None:
        """Keep device readings (for /metrics and the dashboard) fresh once anybody looks at them."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        last_agent_check_s = 0.0
        while True:
            try:
                if time.monotonic() - last_agent_check_s >= AGENT_CHECK_SECONDS:
                    last_agent_check_s = time.monotonic()
                    await asyncio.to_thread(self.ensure_agents)
                await self.refresh_devices()
                intensity = await asyncio.to_thread(self.carbon.intensity, time.time())
                self.metrics.set_grid_intensity(region=intensity.region, gco2e_per_kwh=intensity.gco2e_per_kwh)
            except Exception as exc:  # keep the loop alive; a failed read shows as stale data
                log.warning("device refresh failed: %s", exc)
            await asyncio.sleep(1.0)

    # --- readiness ------------------------------------------------------------------------------
    async def check_ready(self) -> tuple[bool, list[str]]:
        async def probe(model_id: str, handle: Any) -> str | None:
            try:
                await asyncio.wait_for(handle.ready.remote(), timeout=READY_TIMEOUT_SECONDS)
                return None
            except Exception as exc:
                return f"{model_id}: {type(exc).__name__}"

        results = await asyncio.gather(*(probe(m, h) for m, h in self.model_handles.items()))
        problems = [r for r in results if r]
        return not problems, problems

    async def __del__(self) -> None:  # Serve calls this when the gateway replica shuts down
        if self._refresher is not None:
            self._refresher.cancel()
        try:  # abandoned requests still being settled get their rows before the ledger closes
            await asyncio.wait_for(self.serving.settled(), ABANDONED_WAIT_SECONDS + 5)
        except asyncio.TimeoutError:
            log.warning("shutting down before every abandoned request was recorded")
        self.ledger.close()
        if self.tracer is not None:  # send the last spans
            await asyncio.to_thread(self.tracer.shutdown)
        close = getattr(self.carbon, "close", None)
        if close is not None:
            close()


def _alive_agents() -> dict[str, Any]:
    """The node agents of the alive nodes, by node name (blocking: Ray GCS calls)."""
    found = {}
    for node in runtime.cluster_nodes():
        agent = runtime.get_node_agent(node.name)
        if agent is not None:
            found[node.name] = agent
    return found


async def _take_abandoned(node: str | None, request_id: str, timeout_seconds: float) -> Any:
    """What an abandoned request left with its node agent (None when the agent is gone); node None:
    every alive node's agent is asked, and the one that had the request answers."""
    if node is not None:
        agent = await asyncio.to_thread(runtime.get_node_agent, node)
        if agent is None:
            return None
        return await agent.take_abandoned.remote(request_id, timeout_seconds)
    agents = list((await asyncio.to_thread(_alive_agents)).values())
    found = await asyncio.gather(*(a.take_abandoned.remote(request_id, timeout_seconds) for a in agents),
                                 return_exceptions=True)
    return next((w for w in found if w is not None and not isinstance(w, BaseException)), None)


def pending_startup_rows(snapshots: list[dict[str, Any]], recorded: set[tuple[str, str, float]]) -> list[dict[str, Any]]:
    """Summary rows for devices whose service is ready but whose start-up energy is not final yet."""
    rows = []
    for snap in snapshots:
        if snap.get("startup_settled") or snap.get("ready_unix_s") is None or "startup_energy_joules" not in snap:
            continue  # settled: the ledger has (or is about to have) the row; no ready time: still loading
        node = snap.get("agent_node") or snap["node"]
        if (node, snap["device_id"], float(snap["started_unix_s"])) in recorded:
            continue
        method = snap.get("energy_method")
        rows.append({"node": node, "device": snap["device_id"], "started_unix_s": float(snap["started_unix_s"]),
                     "ready_unix_s": float(snap["ready_unix_s"]), "joules": float(snap["startup_energy_joules"]),
                     "energy_method": method, "energy_scope": snap.get("energy_scope"),
                     "method_kind": method_kind(method), "settled": False})
    return rows

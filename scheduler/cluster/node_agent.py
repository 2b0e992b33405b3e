"""The node agent: one Ray actor per machine that owns its devices, meters them and attributes their joules.

It is the only component that changes device settings (through power.actuator), and it restores
them when it stops and, after a crash, when it starts again. Replicas on the node report request
start/progress/finish here, over a Unix socket (cluster.agent_link) or, failing that, Ray calls that
take the same messages; the meter's intervals arrive on a background thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from scheduler.cluster import runtime
from scheduler.cluster.agent_link import AgentLinkServer, link_reaches, socket_path
from scheduler.cluster.messages import (
    AbandonedWork,
    EnergyReport,
    GatewayView,
    ReplicaErrorKind,
    RequestFinish,
    RequestProgress,
    RequestStart,
    SimEngineFailure,
    SimEngineStats,
)
from scheduler.power.audit import AuditRecord
from scheduler.power.service import PowerService
from scheduler.config import WattlaneConfig
from scheduler.devices.base import Device
from scheduler.energy.attribution import Attributor
from scheduler.energy.meter import DeviceMeter, EnergyInterval
from scheduler.engines.base import GenerationRequest

log = logging.getLogger(__name__)

#: how long finish_request waits for the meter to cover a request's end before charging what it has (it
#: reads the counters at once, so this is only for a clock that stepped back or a device read that failed)
FINISH_TIMEOUT_SECONDS = 2.0
#: how long an abandoned request's outcome waits for the gateway to collect it
ABANDONED_TTL_SECONDS = 120.0
#: how long the gateway's take_abandoned waits for the replica's abandon_request before settling itself
ABANDON_GRACE_SECONDS = 2.0
#: how long a finished request's energy stays available to a late abandon_request
FINISHED_TTL_SECONDS = 30.0


class Mailbox:
    """Values kept by key until taken once; a taker may arrive before the value. Entries expire."""

    def __init__(self, ttl_seconds: float):
        self.ttl_seconds = ttl_seconds
        self._items: dict[str, tuple[float, Any]] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def put(self, key: str, value: Any) -> None:
        now = time.monotonic()
        # entries sit in insertion order, oldest first: expiring from the front costs O(1) per put
        while self._items:
            oldest = next(iter(self._items))
            if now - self._items[oldest][0] <= self.ttl_seconds:
                break
            del self._items[oldest]
        self._items.pop(key, None)
        self._items[key] = (now, value)
        waiter = self._waiters.get(key)
        if waiter is not None:
            waiter.set()

    async def take(self, key: str, timeout_seconds: float) -> Any:
        if key not in self._items:
            waiter = self._waiters.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), timeout_seconds)
            except asyncio.TimeoutError:
                return None
            finally:
                self._waiters.pop(key, None)
        item = self._items.pop(key, None)
        return None if item is None else item[1]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items


@ray.remote
class NodeAgent:
    #: serves the replicas' request-path messages once the first replica asks for its address
    _link_server: AgentLinkServer | None = None
    #: the Ray node this agent runs on (None outside Ray): only replicas on it may use the link
    ray_node_id: str | None = None

    def __init__(self, config: dict[str, Any], state_dir: str, node: str,
                 owns_simulated: bool | list[str] = True, own_state_dir: bool = False):
        """owns_simulated: the simulated GPU ids this agent creates (runtime.simulated_owners), or all/none.

        own_state_dir: keep this node's device state (saved settings, power audit, simulated GPUs'
        settings) under <state_dir>/nodes/<node>, for nodes that share a state directory (several Ray
        nodes on one host, or a shared volume); the ledger stays at the top."""
        runtime.configure_process_logging()
        self.config = WattlaneConfig.model_validate(config)
        self.state_dir = Path(state_dir) / "nodes" / node if own_state_dir else Path(state_dir)
        self.node = node
        here = runtime.this_node()
        self.ray_node_id = here.node_id if here is not None else None
        from scheduler.devices.discovery import discover_devices

        # simulated GPUs are not hardware of any node: each is created by the one agent that owns it
        self.devices: dict[str, Device] = {
            d.device_id: d for d in discover_devices(
                self.config.devices, node, include_simulated=owns_simulated, state_dir=self.state_dir
            )
        }
        e = self.config.energy
        self.attributor = Attributor(
            prefill_token_weight=e.prefill_token_weight,
            idle_amortization_seconds=e.idle_amortization_seconds,
            settle_delay_seconds=max(0.3, 3 * e.meter_interval_seconds),
            # idle energy until mark_ready (models loading) is start-up energy, charged to no request
            starting_up=True,
        )
        for device_id in self.devices:
            self.attributor.register_device(device_id)
        self.meter = DeviceMeter(list(self.devices.values()), e.meter_interval_seconds, name=f"meter-{node}")
        self.meter.add_callback(self._on_interval)
        self.meter.start()
        self.power = self._start_power()
        self._init_request_accounting()
        self._sim_engines: dict[str, Any] = {}
        self._started_s = time.time()
        self._stopped = False

    def _start_power(self) -> PowerService:
        """The actuator (restores a crashed run's settings first) and the governor loop."""
        self.power_action_counts: dict[str, int] = {}
        return PowerService(self.config, self.devices, self.state_dir, self.node, self.attributor.running,
                            on_action=self._count_action, start_loop=bool(self.config.power.groups))

    def _count_action(self, rec: AuditRecord) -> None:
        key = f"{rec.device_id}|{rec.action}"
        self.power_action_counts[key] = self.power_action_counts.get(key, 0) + 1

    def _on_interval(self, interval: EnergyInterval) -> None:
        self.attributor.on_interval(interval.device_id, interval.t0_s, interval.t1_s, interval.energy_joules)

    async def ready(self) -> dict[str, Any]:
        return {"node": self.node, "devices": list(self.devices), "pid": os.getpid(), "started_s": self._started_s}

    def resolve_devices(self, names: list[str], endpoint: str) -> list[str]:
        """This node's device ids for an upstream endpoint's device names (gpuN, cpu0, NVML index, GPU UUID).

        Raises DeviceNameError (a ValueError) naming the endpoint and the GPU this node does not have."""
        from scheduler.devices.resolve import resolve_device_names

        return resolve_device_names(names, self.devices, endpoint=endpoint, node=self.node)

    def mark_ready(self, t_s: float | None = None) -> None:
        """The service answers from t_s (default now): idle energy before it is start-up energy."""
        self.attributor.mark_ready(time.time() if t_s is None else t_s)

    async def link_address(self, caller_ray_node_id: str | None = None) -> str | None:
        """The Unix socket the replicas on this node send their request messages to (started on first ask);
        None for a caller on another Ray node (agent_link.link_reaches), which keeps to Ray calls."""
        if not link_reaches(self.ray_node_id, caller_ray_node_id):
            return None
        if self._link_server is None:
            # set before the await: a replica that asks meanwhile gets this server, not one of its own (each
            # would listen on a socket of its own, and the last one would be the only one it still knew of)
            server = self._link_server = AgentLinkServer(self, socket_path())
            try:
                await server.start()
            except BaseException:
                self._link_server = None
                raise
        await self._link_server.started()
        return self._link_server.path

    def close_link(self) -> None:
        if self._link_server is not None:
            self._link_server.close()
            self._link_server = None

    # --- request accounting (called by replicas) ---------------------------------------------
    # A request on a multi-GPU replica (tensor parallel) is tracked once per device under
    # "<id>@<device>", and its energy is the sum: each GPU's joules are shared on that GPU.
    def _init_request_accounting(self) -> None:
        """The per-request state (also what in-process tests of the accounting set up without Ray)."""
        self._request_devices: dict[str, list[str]] = {}
        self._abandoned = Mailbox(ttl_seconds=ABANDONED_TTL_SECONDS)
        #: accounting in progress, and finished requests' energy kept for a late abandon_request
        self._finishing: dict[str, asyncio.Task] = {}
        self._finished = Mailbox(ttl_seconds=FINISHED_TTL_SECONDS)
        self._replica_stats: dict[str, dict[str, Any]] = {}

    def start_request(self, msg: RequestStart) -> None:
        """A request began; `msg` may carry the work its engine has already taken on (the prompt)."""
        rid = msg.request_id
        if rid in self._request_devices or rid in self._finishing or rid in self._finished:
            return  # already started, or ended before this message arrived: never start it twice
        self._start(msg)

    def _start(self, msg: RequestStart) -> None:
        rid = msg.request_id
        self._request_devices[rid] = list(msg.device_ids)
        for d in msg.device_ids:
            try:
                self.attributor.start(f"{rid}@{d}", d, msg.t_s)
                if msg.progress_t_s is not None:
                    self.attributor.progress(f"{rid}@{d}", msg.prompt_tokens, msg.completion_tokens, msg.progress_t_s)
            except ValueError as exc:
                log.warning("start_request: %s", exc)
            self.power.work_arrived(d)

    def replica_gone(self, replica_id: str) -> None:
        """A replica stopped (scaled in, redeployed): its last stats must not stay in the routing view."""
        self._replica_stats.pop(replica_id, None)

    def replica_stats(self, replica_id: str, stats: dict[str, Any]) -> None:
        """A replica's latest stats, for the gateway's routing view and, when its work runs on this node, the
        governor: an upstream replica whose server's host has no agent publishes here, and its device names
        are that host's (they may read like this node's own: gpu0, cpu0)."""
        self._replica_stats[replica_id] = stats
        if stats.get("node", self.node) == self.node:
            self.power.report_replica_stats(replica_id, stats)

    def progress(self, msg: RequestProgress) -> None:
        for d in self._request_devices.get(msg.request_id, ()):
            self.attributor.progress(f"{msg.request_id}@{d}", msg.prompt_tokens, msg.completion_tokens, msg.t_s)

    async def finish_request(self, msg: RequestFinish) -> EnergyReport | None:
        """End a request's accounting; its final token counts act as its last progress report.

        A request whose start was never sent (it ended first) is started here, from msg.start. The
        accounting runs to its end even when this call is cancelled: Ray cancels the calls a cancelled
        request made (a client that went away), and a request left half-finished would stay "running" on
        its devices for ever. The outcome is kept a short while for abandon_request."""
        rid = msg.request_id
        running = self._finishing.get(rid)
        if running is None:
            if rid not in self._request_devices:
                if msg.start is None or rid in self._finished:
                    return await self._finished.take(rid, 0)
                self._start(msg.start)
            running = asyncio.get_running_loop().create_task(
                self._finish(rid, msg.t_s, msg.prompt_tokens, msg.completion_tokens))
            self._finishing[rid] = running
            running.add_done_callback(lambda t: self._keep_outcome(rid, t))
        return await asyncio.shield(running)

    def _keep_outcome(self, request_id: str, task: asyncio.Task) -> None:
        """Keep a finished request's energy a short while: a replica cancelled while it waited for this
        answer (its client went away) asks again through abandon_request, and must get the same joules."""
        self._finishing.pop(request_id, None)
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            self._finished.put(request_id, task.result())

    async def _finish(self, request_id: str, t_s: float, prompt_tokens: int | None,
                      completion_tokens: int | None) -> EnergyReport | None:
        device_ids = self._request_devices.pop(request_id, None)
        if not device_ids:
            return None
        self._cover(device_ids, t_s)
        parts = []
        for d in device_ids:
            try:
                parts.append(await self.attributor.finish_when_covered(
                    f"{request_id}@{d}", t_s, timeout_seconds=FINISH_TIMEOUT_SECONDS,
                    prefill_tokens_done=prompt_tokens, decode_tokens_done=completion_tokens))
            except KeyError:
                pass
        return self._energy_report(device_ids, parts)

    def finish_at_once(self, msg: RequestFinish) -> Any:
        """finish_request's answer without a task or an await, when nothing has to be waited for: the usual
        case (the request runs here, and its devices' counters are read now). NotImplemented when
        finish_request must run instead (a finish already under way or done, a start never seen, a meter
        that has not covered the request's end). The agent link answers a finish this way, at once."""
        rid = msg.request_id
        if rid in self._finishing or rid in self._finished:
            return NotImplemented
        device_ids = self._request_devices.get(rid)
        if device_ids is None:
            if msg.start is None:
                return NotImplemented
            self._start(msg.start)
            device_ids = self._request_devices[rid]
        self._cover(device_ids, msg.t_s)
        if any((c := self.attributor.covered_until(d)) is not None and c < msg.t_s for d in device_ids):
            return NotImplemented  # finish_request waits for the meter (the request is started: it finds it)
        del self._request_devices[rid]
        parts = []
        for d in device_ids:
            try:
                parts.append(self.attributor.finish(f"{rid}@{d}", msg.t_s, prefill_tokens_done=msg.prompt_tokens,
                                                    decode_tokens_done=msg.completion_tokens))
            except KeyError:
                pass
        energy = self._energy_report(device_ids, parts)
        if energy is not None:  # kept a short while, as _keep_outcome keeps finish_request's
            self._finished.put(rid, energy)
        return energy

    def _energy_report(self, device_ids: list[str], parts: list[Any]) -> EnergyReport | None:
        """One request's EnergyReport: the sum of its share on each of its devices."""
        if not parts:
            return None
        devices = [self.devices[d] for d in device_ids if d in self.devices]
        first = devices[0] if devices else None
        limits = [x.power_limit_watts() for x in devices]
        return EnergyReport(
            joules=sum(p.joules for p in parts),
            dynamic_joules=sum(p.dynamic_joules for p in parts),
            idle_joules=sum(p.idle_joules for p in parts),
            method=first.energy_method.value if first else None,
            scope=first.energy_scope.value if first else None,
            device=",".join(device_ids),
            node=self.node,
            metered=all(p.metered for p in parts),
            complete=all(p.complete for p in parts),
            work_tokens=sum(p.work_tokens for p in parts),
            power_limit_watts=sum(x for x in limits if x is not None) if any(x is not None for x in limits) else None,
        )

    def _cover(self, device_ids: list[str], t_s: float) -> None:
        """Read the devices' counters now if the meter has not reached t_s yet, so that a request's
        energy is exact at once instead of a meter period later (the meter's intervals still tile time)."""
        covered = {d: self.attributor.covered_until(d) for d in device_ids}
        behind = [d for d, c in covered.items() if c is None or c < t_s]
        if behind:
            self.meter.sample_now(behind)

    async def abandon_request(self, msg: RequestFinish, energy: EnergyReport | None = None) -> None:
        """A request whose client went away: finish its accounting (unless its replica already did,
        then `energy` is given) and keep the outcome until the gateway takes it for the ledger."""
        if energy is None:
            energy = await self.finish_request(msg)
        self._abandoned.put(msg.request_id, AbandonedWork(energy, msg.prompt_tokens or 0, msg.completion_tokens or 0,
                                                          msg.prompt_tokens_method, msg.completion_tokens_method))

    async def take_abandoned(self, request_id: str, timeout_seconds: float) -> AbandonedWork | None:
        """The outcome abandon_request kept for request_id, waiting a while for it.

        The replica's abandon_request can itself be lost: Ray cancels the calls a cancelled request
        makes, and that call is made while it is being cancelled. Then a request this agent knows is
        settled here after ABANDON_GRACE_SECONDS, up to now and with the token counts of its last progress
        report, so that it stops drawing energy and its joules still reach the ledger. A request it has
        not heard of (a short one's start travels with its end) has nothing to settle here: its energy
        comes only with the replica's message, which a busy replica sends late, so that is waited for up
        to timeout_seconds (agents that never had the request answer None then)."""
        deadline_mono = time.monotonic() + timeout_seconds
        while True:
            left_s = max(0.0, deadline_mono - time.monotonic())
            work = await self._abandoned.take(request_id, min(left_s, ABANDON_GRACE_SECONDS))
            if work is not None:
                return work
            if self._knows(request_id) or time.monotonic() >= deadline_mono:
                break
        energy = await self.finish_request(RequestFinish(request_id, time.time()))
        return None if energy is None else AbandonedWork(energy, 0, 0)

    def _knows(self, request_id: str) -> bool:
        """Whether the request's start (or its end) reached this agent."""
        return request_id in self._request_devices or request_id in self._finishing or request_id in self._finished

    # --- simulated engines (they drive the simulated GPUs this agent owns) --------------------
    async def sim_open(self, model: dict[str, Any], replica_index: int) -> dict[str, Any]:
        from scheduler.config import ModelConfig
        from scheduler.engines.simulated import SimulatedGpu, build_simulated_engine

        key = f"{model['id']}#{replica_index}"
        if key not in self._sim_engines:
            sims = {i: d for i, d in self.devices.items() if isinstance(d, SimulatedGpu)}
            engine = build_simulated_engine(ModelConfig.model_validate(model), self.config, sims,
                                            replica_index=replica_index)
            foreign = [g.device_id for g in engine.core.gpus if g.device_id not in sims]
            if foreign:  # a GPU made up here would run unmetered beside the one its owner meters
                raise ValueError(f"simulated GPU(s) {', '.join(foreign)} are not on node {self.node}")
            self._sim_engines[key] = engine
        engine = self._sim_engines[key]
        return {"key": key, "context_length": engine.context_length,
                "device_ids": [g.device_id for g in engine.core.gpus]}

    async def _sim_engine(self, key: str, spec: tuple[dict[str, Any], int] | None) -> Any:
        """The hosted engine `key`, opened again from `spec` (model, replica index) after this agent restarted."""
        if key not in self._sim_engines and spec is not None:
            await self.sim_open(*spec)
        return self._sim_engines[key]

    async def sim_count_prompt_tokens(self, key: str, request: GenerationRequest,
                                      spec: tuple[dict[str, Any], int] | None = None) -> int:
        return (await self._sim_engine(key, spec)).count_prompt_tokens(request)

    async def sim_generate(self, key: str, request: GenerationRequest, spec: tuple[dict[str, Any], int] | None = None):
        """The hosted engine's EngineEvents; SimEngineStats before the last one; SimEngineFailure if it fails."""
        from scheduler.engines.base import ContextLengthError, EngineError, RequestRejectedError

        engine = await self._sim_engine(key, spec)
        try:
            async for ev in engine.generate(request):
                if ev.finished:
                    yield SimEngineStats(dict(engine.stats()))
                yield ev
        except ContextLengthError as exc:
            yield SimEngineFailure(ReplicaErrorKind.CONTEXT_LENGTH, str(exc),
                                   (exc.prompt_tokens, exc.max_tokens, exc.context_length))
        except RequestRejectedError as exc:  # the client's to fix (a 400), not a failing replica
            yield SimEngineFailure(ReplicaErrorKind.INVALID_REQUEST, str(exc), param=exc.param)
        except EngineError as exc:
            yield SimEngineFailure(ReplicaErrorKind.ENGINE, str(exc))
        except Exception as exc:  # an engine bug: the replica answers 503 and settles the request
            log.exception("simulated engine %s failed", key)
            yield SimEngineFailure(ReplicaErrorKind.ENGINE, f"{type(exc).__name__}: {exc}")

    # --- readings ----------------------------------------------------------------------------
    async def gateway_view(self) -> GatewayView:
        """Everything the gateway refreshes each second, in one round trip: device readings, the
        replicas' latest stats (it routes on them) and power-action totals (for its metrics)."""
        return GatewayView(devices=await self._devices_snapshot(), replica_stats=dict(self._replica_stats),
                           power_action_totals=dict(self.power_action_counts))

    async def _devices_snapshot(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            out = []
            for device_id, device in self.devices.items():
                try:
                    snap = asdict(device.snapshot())
                except Exception as exc:  # a device that fails to read is shown, not hidden
                    snap = {"device_id": device_id, "node": self.node, "kind": device.kind.value, "error": str(exc)}
                reading = self.meter.reading(device_id)
                snap["energy_joules_metered"] = reading.total_energy_joules
                snap["running_requests"] = self.attributor.running(device_id)
                snap["startup_energy_joules"] = self.attributor.startup_joules(device_id)
                snap["startup_settled"] = self.attributor.startup_settled(device_id)
                snap["started_unix_s"] = self._started_s
                snap["ready_unix_s"] = self.attributor.ready_s
                # a simulated GPU names its own (simulated) node; this is the agent that owns it
                snap["agent_node"] = self.node
                out.append(snap)
            return out

        return await asyncio.to_thread(read)

    def energy_balance(self) -> dict[str, float]:
        """Where every metered joule went (requests, idle pool, not yet settled): for audits and tests."""
        b = self.attributor.balance()
        return asdict(b) | {"accounted_joules": b.accounted_joules}

    # --- power (operator API) ---------------------------------------------------------------------
    def _own(self, device_id: str) -> None:
        if device_id not in self.devices:
            raise KeyError(f"device '{device_id}' is not on node {self.node}")

    async def set_power_limit(self, device_id: str, watts: float, actor: str = "operator",
                              reason: str = "") -> dict[str, Any]:
        self._own(device_id)
        return await asyncio.to_thread(self.power.set_power_limit, device_id, watts, actor=actor, reason=reason)

    async def reset_power_limit(self, device_id: str, actor: str = "operator", reason: str = "") -> dict[str, Any]:
        self._own(device_id)
        return await asyncio.to_thread(self.power.reset_power_limit, device_id, actor=actor, reason=reason)

    async def set_locked_clocks(self, device_id: str, min_mhz: float, max_mhz: float, actor: str = "operator",
                                reason: str = "") -> dict[str, Any]:
        self._own(device_id)
        return await asyncio.to_thread(self.power.set_locked_clocks, device_id, min_mhz, max_mhz, actor=actor,
                                       reason=reason)

    async def reset_locked_clocks(self, device_id: str, actor: str = "operator", reason: str = "") -> dict[str, Any]:
        self._own(device_id)
        return await asyncio.to_thread(self.power.reset_locked_clocks, device_id, actor=actor, reason=reason)

    async def power_policy(self) -> dict[str, Any]:
        """The power policy and the governor's status, in one round trip."""
        return {**await asyncio.to_thread(self.power.get_policy), "status": await asyncio.to_thread(self.power.status)}

    async def put_power_policy(self, body: dict[str, Any], actor: str = "operator") -> dict[str, Any]:
        return await asyncio.to_thread(self.power.put_policy, body, actor=actor)

    async def power_audit(self, since: float | None = None, device: str | None = None,
                          limit: int = 100) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.power.audit, since=since, device=device, limit=limit)

    # --- lifecycle -----------------------------------------------------------------------------
    def shutdown(self) -> dict[str, Any]:
        """Restore device settings, stop the meter. Idempotent."""
        if self._stopped:
            return {"restored": True}
        self._stopped = True
        self.close_link()
        restored = self.power.stop()
        self.power.close()
        self.meter.stop()
        for d in self.devices.values():
            d.close()
        return {"restored": restored}

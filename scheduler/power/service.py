"""The node agent's power service: actuator + audit + governor loop behind the methods the operator API calls.

The node agent builds one PowerService and forwards power_call(method, ...) to it; every public
method returns plain JSON-able data. Errors: DeviceSettingError / DeviceNotSupportedError /
PolicyError (a ValueError) mean bad input (400), DevicePermissionError means not privileged (403).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scheduler.config import WattlaneConfig
from scheduler.devices.base import Device
from scheduler.power.actuator import PowerActuator
from scheduler.power.audit import AuditRecord, PowerAuditLog
from scheduler.power.governor import Governor
from scheduler.power.policies import POLICIES

log = logging.getLogger(__name__)

#: replica stats older than this are ignored (a replica that stopped reporting is not still busy)
STATS_STALE_SECONDS = 10.0


def carbon_intensity_from_config(config: WattlaneConfig) -> Callable[[float], float | None] | None:
    """An intensity callable (unix seconds -> gCO2e/kWh) from energy.carbon, or None if unavailable."""
    try:
        from scheduler.energy.carbon import make_carbon_provider

        provider = make_carbon_provider(config.energy.carbon, config_dir=config.config_dir())
    except Exception as exc:  # the governor works without it (carbon-aware then assumes a dirty grid)
        log.warning("carbon intensity unavailable to the power governor: %s", exc)
        return None
    return lambda now_s: provider.intensity(now_s).gco2e_per_kwh


class PowerService:
    def __init__(
        self,
        config: WattlaneConfig,
        devices: Mapping[str, Device],
        state_dir: str | Path,
        node: str,
        running: Callable[[str], int] | None = None,
        *,
        on_action: Callable[[AuditRecord], None] | None = None,
        intensity_provider: Callable[[float], float | None] | None = None,
        start_loop: bool = True,
    ):
        self.node = node
        self.devices = dict(devices)
        self._running = running
        self.audit_log = PowerAuditLog.in_state_dir(state_dir, on_action=on_action)
        # The actuator restores a crashed run's settings before anything else (see actuator.py).
        self.actuator = PowerActuator(self.devices, state_dir, mode=config.power.mode, audit=self.audit_log)
        if intensity_provider is None and any(POLICIES[g.policy].needs_carbon_intensity for g in config.power.groups):
            intensity_provider = carbon_intensity_from_config(config)
        self.governor = Governor(config.power, self.devices, self.actuator, intensity_provider=intensity_provider)
        self._lock = threading.Lock()
        self._replica_stats: dict[str, tuple[float, dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_loop:
            self._thread = threading.Thread(target=self._loop, name=f"power-governor-{node}", daemon=True)
            self._thread.start()

    # --- inputs ------------------------------------------------------------------------------------------
    def set_on_action(self, on_action: Callable[[AuditRecord], None] | None) -> None:
        """Connect wattlane_power_actions_total: on_action(record) for each applied/recommended action."""
        self.audit_log.set_on_action(on_action)

    def report_replica_stats(self, replica_id: str, stats: Mapping[str, Any]) -> None:
        """A replica's latest ReplicaStats (must carry device_ids); replaces its previous report."""
        with self._lock:
            self._replica_stats[replica_id] = (time.monotonic(), dict(stats))

    def stats_by_device(self) -> dict[str, list[dict[str, Any]]]:
        now = time.monotonic()
        out: dict[str, list[dict[str, Any]]] = {}
        with self._lock:
            for rid, (t, s) in list(self._replica_stats.items()):
                if now - t > STATS_STALE_SECONDS:
                    del self._replica_stats[rid]
                    continue
                for d in s.get("device_ids") or ():
                    out.setdefault(d, []).append(s)
        if self._running is not None:
            for d in self.devices:
                if d not in out:  # no replica reports: the attributor's running count is all we know
                    try:
                        out[d] = [{"running": int(self._running(d))}]
                    except Exception:
                        pass
        return out

    # --- loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        interval = self.governor.interval_seconds
        while not self._stop.wait(interval):
            try:
                self.step()
            except Exception:
                log.exception("power governor step failed")

    def step(self, now_s: float | None = None) -> list[dict[str, Any]]:
        stats = self.stats_by_device()
        with self._lock:
            return [a.to_dict() for a in self.governor.step(now_s, stats)]

    def work_arrived(self, device_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [a.to_dict() for a in self.governor.on_work_arrived(device_id)]

    # --- operator API -------------------------------------------------------------------------------------
    def set_power_limit(self, device_id: str, watts: float, actor: str = "operator", reason: str = "") -> dict[str, Any]:
        return self.actuator.set_power_limit(device_id, watts, actor=actor, reason=reason).to_dict()

    def reset_power_limit(self, device_id: str, actor: str = "operator", reason: str = "") -> dict[str, Any]:
        return self.actuator.reset_power_limit(device_id, actor=actor, reason=reason).to_dict()

    def set_locked_clocks(self, device_id: str, min_mhz: float, max_mhz: float, actor: str = "operator",
                          reason: str = "") -> dict[str, Any]:
        return self.actuator.set_locked_clocks(device_id, min_mhz, max_mhz, actor=actor, reason=reason).to_dict()

    def reset_locked_clocks(self, device_id: str, actor: str = "operator", reason: str = "") -> dict[str, Any]:
        return self.actuator.reset_locked_clocks(device_id, actor=actor, reason=reason).to_dict()

    def get_policy(self) -> dict[str, Any]:
        with self._lock:
            return {"node": self.node, **self.governor.get_policy()}

    def put_policy(self, body: Any, actor: str = "operator") -> dict[str, Any]:
        with self._lock:
            return {"node": self.node, **self.governor.put_policy(body, actor=actor)}

    def audit(self, since: float | None = None, device: str | None = None, limit: int = 100,
              until: float | None = None, actor: str | None = None, outcome: str | None = None) -> list[dict[str, Any]]:
        return self.audit_log.query(since_s=since, until_s=until, device_id=device, actor=actor, outcome=outcome, limit=limit)

    def status(self) -> dict[str, Any]:
        return self.actuator.status()

    # --- lifecycle -----------------------------------------------------------------------------------------
    def stop(self) -> dict[str, Any]:
        """Stop the loop and put every device back as it was. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            actions = self.actuator.restore_all(reason="node agent stopping")
        failed = [a.to_dict() for a in actions if a.outcome != "applied"]
        return {"restored": [a.to_dict() for a in actions if a.outcome == "applied"], "failed": failed,
                "pending": sorted(self.actuator.saved_settings())}

    def close(self) -> None:
        self.stop()
        self.audit_log.close()


"""The node agent's power side: actuator, audit log and governor loop for the devices of one node.

The actuator (power/actuator.py) is the only code that changes a device; this service owns one,
runs the governor every power.interval_seconds on a background thread with the latest stats the
replicas pushed, serves the operator API's calls, and restores everything on stop().
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scheduler.config import WattlaneConfig
from scheduler.devices.base import Device
from scheduler.power.actuator import PowerActuator
from scheduler.power.audit import AuditRecord, PowerAuditLog
from scheduler.power.governor import Governor

log = logging.getLogger(__name__)

#: replica stats older than this are ignored by the governor (the replica went away)
STATS_TTL_SECONDS = 30.0


class PowerService:
    def __init__(
        self,
        config: WattlaneConfig,
        devices: Mapping[str, Device],
        state_dir: Path,
        node: str,
        running: Callable[[str], int],
        intensity: Callable[[float], float | None] | None = None,
    ):
        self.node = node
        self.devices = dict(devices)
        self._running = running
        self.action_counts: Counter[tuple[str, str]] = Counter()
        self.audit_log = PowerAuditLog.in_state_dir(state_dir, on_action=self._count)
        self.actuator = PowerActuator(self.devices, state_dir, mode=config.power.mode, audit=self.audit_log)
        self.governor = Governor(config.power, self.devices, self.actuator, intensity_provider=intensity)
        self._stats: dict[str, tuple[float, list[str], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if config.power.groups:
            self._thread = threading.Thread(target=self._loop, args=(config.power.interval_seconds,),
                                            name=f"governor-{node}", daemon=True)
            self._thread.start()
        status = self.actuator.status()
        if self.actuator.privilege_error:
            log.warning("power governor is recommend-only: %s", self.actuator.privilege_error)
        log.info("power service on %s: mode %s", node, status.get("mode"))

    def _count(self, rec: AuditRecord) -> None:
        self.action_counts[(rec.device_id, rec.action)] += 1

    # --- inputs ------------------------------------------------------------------------------
    def replica_stats(self, replica_id: str, device_ids: list[str], stats: dict[str, Any]) -> None:
        with self._lock:
            self._stats[replica_id] = (time.time(), list(device_ids), dict(stats))

    def stats_by_device(self) -> dict[str, list[dict[str, Any]]]:
        now = time.time()
        out: dict[str, list[dict[str, Any]]] = {d: [] for d in self.devices}
        with self._lock:
            for t, device_ids, stats in self._stats.values():
                if now - t > STATS_TTL_SECONDS:
                    continue
                for d in device_ids:
                    if d in out:
                        out[d].append(stats)
        for d, lst in out.items():
            if not lst:  # no replica has reported yet: still tell the policy what is running
                lst.append({"running": self._running(d), "waiting": 0})
        return out

    def work_arrived(self, device_id: str) -> None:
        """Release a parked device at once when a request starts on it."""
        if self._thread is not None and device_id in self.devices:
            self.governor.on_work_arrived(device_id)

    def _loop(self, interval_seconds: float) -> None:
        while not self._stop.wait(interval_seconds):
            try:
                self.governor.step(time.time(), self.stats_by_device())
            except Exception:  # one bad step must not stop the governor
                log.exception("governor step failed")

    # --- operator API ------------------------------------------------------------------------
    def _result(self, action: Any) -> dict[str, Any]:
        d = action.to_dict()
        d["applied"] = action.outcome == "applied"
        d["mode"] = self.actuator.mode
        if action.outcome == "recommended":
            d["note"] = ("recommend-only mode: nothing was changed (set power.mode: enforce and run with the "
                         "privilege to change device settings)")
        return d

    def set_power_limit(self, device_id: str, watts: float, actor: str, reason: str) -> dict[str, Any]:
        return self._result(self.actuator.set_power_limit(device_id, watts, actor=actor, reason=reason))

    def reset_power_limit(self, device_id: str, actor: str, reason: str) -> dict[str, Any]:
        return self._result(self.actuator.reset_power_limit(device_id, actor=actor, reason=reason))

    def set_locked_clocks(self, device_id: str, min_mhz: float, max_mhz: float, actor: str, reason: str) -> dict[str, Any]:
        return self._result(self.actuator.set_locked_clocks(device_id, min_mhz, max_mhz, actor=actor, reason=reason))

    def reset_locked_clocks(self, device_id: str, actor: str, reason: str) -> dict[str, Any]:
        return self._result(self.actuator.reset_locked_clocks(device_id, actor=actor, reason=reason))

    def get_policy(self) -> dict[str, Any]:
        return {**self.governor.get_policy(), "status": self.actuator.status()}

    def put_policy(self, body: Any, actor: str) -> dict[str, Any]:
        return self.governor.put_policy(body, actor=actor, reason="PUT /v1/power/policy")

    def audit(self, since: float | None = None, device: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self.audit_log.query(since_s=since, device_id=device, limit=limit)

    def counts(self) -> dict[str, int]:
        return {f"{d}|{a}": n for (d, a), n in self.action_counts.items()}

    # --- lifecycle ----------------------------------------------------------------------------
    def stop(self) -> list[dict[str, Any]]:
        """Stop the loop and put every device back as it was before Wattlane touched it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        restored = [a.to_dict() for a in self.actuator.restore_all(reason="node agent stopped")]
        self.audit_log.close()
        return restored

"""The power actuator: the only code that changes device power limits and locked clocks, safely.

Safety rules it enforces (docs/power.md):
- every value is checked against the device's constraints before anything is touched; a value
  outside them is refused with DeviceSettingError, never clamped;
- before the first change to a device its original settings are written durably
  (scheduler/power/saved_settings.py); restore_all() puts them back and removes the file; a new
  actuator finding the file (a crash, kill -9) restores first (exit_handlers.py restores a plain
  process on exit and SIGTERM/SIGHUP);
- missing privileges are found by a harmless probe at start (setting the current limit to
  itself), reported once, and the actuator then only recommends;
- in recommend mode actions are validated, audited as "recommended" and never applied.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from scheduler.devices.base import (
    Device,
    DeviceError,
    DeviceNotSupportedError,
    DevicePermissionError,
    DeviceSettingError,
)
from scheduler.power.audit import AuditRecord, PowerAuditLog
from scheduler.power.saved_settings import SavedSettingsStore

log = logging.getLogger(__name__)

Mode = Literal["enforce", "recommend"]



@dataclass
class PowerAction:
    """One change (or recommendation) to one setting of one device."""

    device_id: str
    node: str
    action: str
    setting: str
    old_value: Any
    new_value: Any
    actor: str
    reason: str
    outcome: str  # applied | recommended | refused | failed
    time_s: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_clock_pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    lo, hi = value
    return (float(lo), float(hi))


class PowerActuator:
    """Applies power limits and clock locks to a node's devices, with durable restore."""

    def __init__(
        self,
        devices: Mapping[str, Device],
        state_dir: str | Path,
        *,
        mode: Mode = "enforce",
        audit: PowerAuditLog | None = None,
        clock: Callable[[], float] = time.time,
        restore_on_start: bool = True,
    ):
        if mode not in ("enforce", "recommend"):
            raise ValueError(f"mode must be 'enforce' or 'recommend', not {mode!r}")
        self._devices = dict(devices)
        self._store = SavedSettingsStore(Path(state_dir) / "power")
        self.saved_path = self._store.path
        self.audit = audit
        self._clock = clock
        self._lock = threading.RLock()
        self.requested_mode: Mode = mode
        #: None: not probed (recommend mode never probes, so it never touches a device)
        self.privileged: bool | None = None
        self.privilege_error: str | None = None
        self.restore_errors: list[str] = []
        self.restored_on_start: list[PowerAction] = []
        self.restore_errors.extend(self._store.load())
        #: device key -> its original settings (the store's entries, kept durable by the store)
        self._saved: dict[str, dict[str, Any]] = self._store.entries
        if mode == "enforce":
            self._probe_privileges()
        if restore_on_start and self._saved:
            # A leftover file means the last owner of these devices did not exit cleanly: put the
            # operator's original settings back before anything else happens, whatever the mode.
            log.warning("found %s from an unclean exit; restoring %d device(s)", self.saved_path, len(self._saved))
            self.restored_on_start = self.restore_all(reason="restore after unclean exit (crash or kill -9)")

    # --- mode and privileges ------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        """The effective mode: enforce only when asked for and the process may change settings."""
        if self.requested_mode == "enforce" and self.privileged is not False:
            return "enforce"
        return "recommend"

    @property
    def enforcing(self) -> bool:
        return self.mode == "enforce"

    def set_mode(self, mode: Mode, *, actor: str = "operator", reason: str = "mode change") -> dict[str, Any]:
        if mode not in ("enforce", "recommend"):
            raise ValueError(f"mode must be 'enforce' or 'recommend', not {mode!r}")
        with self._lock:
            old = self.mode
            self.requested_mode = mode
            if mode == "enforce" and self.privileged is None:
                self._probe_privileges()
            self._audit(
                PowerAction("*", self._node_name(), "set_mode", "mode", old, self.mode, actor, reason,
                            "applied", self._clock())
            )
            return self.status()

    def _node_name(self) -> str:
        return next((d.node for d in self._devices.values()), "node0")

    def _probe_privileges(self) -> None:
        """Set a current value to itself: harmless, and fails exactly when a real change would."""
        for dev in self._devices.values():
            try:
                if dev.supports_power_limit():
                    current = dev.power_limit_watts()
                    if current is None:
                        continue
                    dev.set_power_limit_watts(current)
                elif dev.supports_locked_clocks():
                    lock = dev.locked_clocks_mhz()
                    if lock is None:
                        dev.reset_locked_clocks()
                    else:
                        dev.set_locked_clocks_mhz(*lock)
                else:
                    continue
            except DevicePermissionError as exc:
                self.privileged = False
                self.privilege_error = (
                    f"{dev.device_id}: {exc}. The power governor runs recommend-only: it computes and audits "
                    "what it would change but changes nothing. Run the node agent as root (or with "
                    "CAP_SYS_ADMIN) to apply power limits and clocks."
                )
                log.warning("%s", self.privilege_error)
                return
            except DeviceError:
                continue  # this device cannot be probed this way; try the next one
            self.privileged = True
            return
        self.privileged = True  # nothing governable: nothing to be refused

    def status(self) -> dict[str, Any]:
        """What GET /v1/power/policy shows under "actuator"."""
        with self._lock:
            return {
                "mode": self.mode,
                "requested_mode": self.requested_mode,
                "privileged": self.privileged,
                "message": self.privilege_error
                or ("recommend mode: actions are computed and audited, never applied" if self.mode == "recommend" else None),
                "saved_settings_path": str(self.saved_path),
                "devices_with_saved_settings": sorted(self._saved),
                "restored_on_start": sorted({a.device_id for a in self.restored_on_start if a.outcome == "applied"}),
                "restore_errors": list(self.restore_errors),
            }

    def saved_settings(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return json.loads(json.dumps(self._saved))

    # --- lookups ---------------------------------------------------------------------------------
    def device(self, device_id: str) -> Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise DeviceSettingError(
                f"unknown device '{device_id}'; known devices: {', '.join(sorted(self._devices)) or 'none'}"
            ) from None

    def _find_saved_device(self, entry: dict[str, Any]) -> Device | None:
        if entry.get("uuid"):
            for dev in self._devices.values():
                if dev.uuid() == entry["uuid"]:
                    return dev
        for dev in self._devices.values():
            if dev.device_id == entry["device_id"] and dev.node == entry["node"]:
                if entry.get("uuid") and dev.uuid() and dev.uuid() != entry["uuid"]:
                    return None  # same index, different board: never restore onto the wrong GPU
                return dev
        return None

    # --- the four controls -------------------------------------------------------------------------
    def set_power_limit(self, device_id: str, watts: float, *, actor: str = "operator", reason: str = "") -> PowerAction:
        dev = self.device(device_id)
        return self._act(
            dev, "set_power_limit", "power_limit_watts", float(watts), actor, reason,
            check=lambda: self._check_power_limit(dev, float(watts)),
            apply=lambda: dev.set_power_limit_watts(float(watts)),
            read=lambda: dev.power_limit_watts(),
        )

    def reset_power_limit(self, device_id: str, *, actor: str = "operator", reason: str = "") -> PowerAction:
        dev = self.device(device_id)
        default = dev.power_limit_constraints().default_watts if dev.supports_power_limit() else None
        return self._act(
            dev, "reset_power_limit", "power_limit_watts", default, actor, reason or "reset to default",
            check=lambda: self._require(dev.supports_power_limit(), dev, "settable power limit"),
            apply=dev.reset_power_limit, read=lambda: dev.power_limit_watts(),
        )

    def set_locked_clocks(
        self, device_id: str, min_mhz: float, max_mhz: float, *, actor: str = "operator", reason: str = ""
    ) -> PowerAction:
        dev = self.device(device_id)
        lo, hi = float(min_mhz), float(max_mhz)

        def check() -> None:
            self._require(dev.supports_locked_clocks(), dev, "lockable clocks")
            self._in_range(dev, lambda: dev.clock_constraints().check(lo, hi))

        return self._act(
            dev, "set_locked_clocks", "locked_clocks_mhz", [lo, hi], actor, reason,
            check=check, apply=lambda: dev.set_locked_clocks_mhz(lo, hi),
            read=lambda: _listify(dev.locked_clocks_mhz()),
        )

    def reset_locked_clocks(self, device_id: str, *, actor: str = "operator", reason: str = "") -> PowerAction:
        dev = self.device(device_id)
        return self._act(
            dev, "reset_locked_clocks", "locked_clocks_mhz", None, actor, reason or "unlock clocks",
            check=lambda: self._require(dev.supports_locked_clocks(), dev, "lockable clocks"),
            apply=dev.reset_locked_clocks, read=lambda: _listify(dev.locked_clocks_mhz()),
        )

    @staticmethod
    def _require(supported: bool, dev: Device, what: str) -> None:
        if not supported:
            raise DeviceNotSupportedError(f"{dev.device_id} ({dev.kind.value}) has no {what}")

    def _check_power_limit(self, dev: Device, watts: float) -> None:
        self._require(dev.supports_power_limit(), dev, "settable power limit")
        if watts != watts or watts in (float("inf"), float("-inf")):
            raise DeviceSettingError(f"power limit {watts} W is not a number", param="watts")
        self._in_range(dev, lambda: dev.power_limit_constraints().check(watts))

    @staticmethod
    def _in_range(dev: Device, check: Callable[[], None]) -> None:
        """Run a device's constraints check; its error names the device and says that nothing was changed."""
        try:
            check()
        except DeviceSettingError as exc:
            raise DeviceSettingError(f"{dev.device_id}: {exc}; nothing was changed", param=exc.param) from None

    def _act(
        self,
        dev: Device,
        action: str,
        setting: str,
        new_value: Any,
        actor: str,
        reason: str,
        *,
        check: Callable[[], None],
        apply: Callable[[], None],
        read: Callable[[], Any],
    ) -> PowerAction:
        with self._lock:
            now = self._clock()
            try:
                old_value = read()
            except DeviceError:
                old_value = None
            rec = PowerAction(dev.device_id, dev.node, action, setting, old_value, new_value, actor, reason, "refused", now)
            try:
                check()
            except DeviceError as exc:
                rec.error = str(exc)
                self._audit(rec)
                raise
            if not self.enforcing:
                rec.outcome = "recommended"
                self._audit(rec)
                log.info("recommend: %s %s %s -> %s (%s)", dev.device_id, action, old_value, new_value, reason)
                return rec
            try:
                self._store.save_original(dev)  # durable BEFORE the change below
                apply()
            except DevicePermissionError as exc:
                # Privileges went away (or the probe could not see it): stop trying, say so once.
                self.privileged = False
                self.privilege_error = f"{dev.device_id}: {exc}. The power governor is now recommend-only."
                log.warning("%s", self.privilege_error)
                rec.outcome, rec.error = "failed", str(exc)
                self._audit(rec)
                raise
            except DeviceError as exc:
                rec.outcome, rec.error = "failed", str(exc)
                self._audit(rec)
                raise
            rec.outcome = "applied"
            self._audit(rec)
            return rec

    def _audit(self, action: PowerAction) -> None:
        if self.audit is None:
            return
        self.audit.record(
            AuditRecord(
                time_s=action.time_s, actor=action.actor, node=action.node, device_id=action.device_id,
                setting=action.setting, action=action.action, old_value=action.old_value,
                new_value=action.new_value, reason=action.reason, outcome=action.outcome,  # type: ignore[arg-type]
                error=action.error,
            )
        )

    def record_policy_change(self, group: str, old: Any, new: Any, *, actor: str, reason: str = "") -> None:
        """Audit a policy change (not a device setting) so operators see who changed what."""
        self._audit(
            PowerAction(f"group:{group}", self._node_name(), "set_policy", "policy", old, new, actor,
                        reason or "policy change", "applied", self._clock())
        )

    # --- restore -------------------------------------------------------------------------------------
    def restore(self, device_ids: Iterable[str] | None = None, *, reason: str = "restore original settings",
                actor: str = "actuator") -> list[PowerAction]:
        """Put saved originals back (all devices, or those listed); clear their saved entries."""
        with self._lock:
            wanted = None if device_ids is None else set(device_ids)
            actions: list[PowerAction] = []
            for key, entry in list(self._saved.items()):
                if wanted is not None and entry["device_id"] not in wanted:
                    continue
                dev = self._find_saved_device(entry)
                if dev is None:
                    msg = f"{key}: device not present (uuid {entry.get('uuid')}); its saved settings are kept"
                    if msg not in self.restore_errors:
                        self.restore_errors.append(msg)
                    log.warning("%s", msg)
                    continue
                ok = True
                now = self._clock()
                if entry.get("has_power_limit") and entry.get("power_limit_watts") is not None:
                    rec = self._restore_one(
                        dev, "power_limit_watts", _safe(dev.power_limit_watts), entry["power_limit_watts"],
                        lambda d=dev, w=entry["power_limit_watts"]: d.set_power_limit_watts(float(w)), actor, reason, now,
                    )
                    actions.append(rec)
                    ok = ok and rec.outcome == "applied"
                if entry.get("has_locked_clocks"):
                    lock = _as_clock_pair(entry.get("locked_clocks_mhz"))
                    apply = (lambda d=dev: d.reset_locked_clocks()) if lock is None else (
                        lambda d=dev, lk=lock: d.set_locked_clocks_mhz(*lk))
                    rec = self._restore_one(
                        dev, "locked_clocks_mhz", _listify(_safe(dev.locked_clocks_mhz)), _listify(lock),
                        apply, actor, reason, now,
                    )
                    actions.append(rec)
                    ok = ok and rec.outcome == "applied"
                if ok:
                    del self._saved[key]
                    self._store.write()
            return actions

    def restore_all(self, reason: str = "restore original settings", *, actor: str = "actuator") -> list[PowerAction]:
        return self.restore(None, reason=reason, actor=actor)

    def _restore_one(self, dev: Device, setting: str, old: Any, new: Any, apply: Callable[[], None],
                     actor: str, reason: str, now: float) -> PowerAction:
        rec = PowerAction(dev.device_id, dev.node, "restore", setting, old, new, actor, reason, "applied", now)
        try:
            apply()
        except DeviceError as exc:
            rec.outcome, rec.error = "failed", str(exc)
            msg = f"{dev.device_id}: could not restore {setting} to {new}: {exc}"
            if msg not in self.restore_errors:
                self.restore_errors.append(msg)
            log.error("%s", msg)
        self._audit(rec)
        return rec


def _safe(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except DeviceError:
        return None


def _listify(lock: Any) -> list[float] | None:
    return None if lock is None else [float(lock[0]), float(lock[1])]

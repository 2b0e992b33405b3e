"""The power governor: runs each device group's policy every interval and applies the difference through the actuator.

It is a plain object with no threads of its own: the node agent (or the simulator) calls step()
every power.interval_seconds with the replicas' live stats, and on_work_arrived() when a request
lands on a device (so a parked device is released at once, not at the next step). Policies are
selectable at run time with set_policy() / put_policy(), the bodies of GET/PUT /v1/power/policy.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.config import PowerConfig
from scheduler.devices.base import Device, DeviceError
from scheduler.power.actuator import PowerAction, PowerActuator
from scheduler.power.options import PolicyOptionsError
from scheduler.power.policies import (
    POLICIES,
    POLICY_NAMES,
    DeviceLoad,
    DeviceTarget,
    Policy,
    PolicyError,
    fold_stats,
    validate_options,
)

log = logging.getLogger(__name__)

__all__ = ["Governor", "PolicyError"]


@dataclass
class _Group:
    name: str
    device_ids: list[str]
    policy: Policy
    options_raw: dict[str, Any]


class Governor:
    """Runs the configured policies over a node's devices; the actuator is the only thing that changes them."""

    def __init__(
        self,
        power_config: PowerConfig,
        devices: Mapping[str, Device],
        actuator: PowerActuator,
        clock: Callable[[], float] = time.time,
        *,
        intensity_provider: Callable[[float], float | None] | None = None,
    ):
        self.config = power_config
        self.interval_seconds = power_config.interval_seconds
        self.devices = dict(devices)
        self.actuator = actuator
        self.clock = clock
        self.intensity_provider = intensity_provider
        self._groups: dict[str, _Group] = {}
        #: last target issued per device and setting (what recommend mode compares against)
        self._issued: dict[tuple[str, str], Any] = {}
        self.steps = 0
        self.last_step_s: float | None = None
        groups = [g.model_dump() for g in power_config.groups]
        new = self._build_groups(groups, where="power.groups")
        self._groups = new

    # --- the view policies read -------------------------------------------------------------------------
    def power_limit_watts(self, device_id: str) -> float | None:
        if not self.actuator.enforcing and (device_id, "power_limit") in self._issued:
            v = self._issued[(device_id, "power_limit")]
            return self.devices[device_id].power_limit_constraints().default_watts if v == "default" else v
        try:
            return self.devices[device_id].power_limit_watts()
        except DeviceError:
            return None

    def locked_clocks_mhz(self, device_id: str) -> tuple[float, float] | None:
        if not self.actuator.enforcing and (device_id, "locked_clocks") in self._issued:
            v = self._issued[(device_id, "locked_clocks")]
            return None if v == "reset" else v
        try:
            return self.devices[device_id].locked_clocks_mhz()
        except DeviceError:
            return None

    def carbon_intensity(self, now_s: float) -> float | None:
        if self.intensity_provider is None:
            return None
        try:
            return self.intensity_provider(now_s)
        except Exception:  # a carbon source outage must not stop the control loop
            log.exception("carbon intensity provider failed; falling back")
            return None

    # --- the loop ------------------------------------------------------------------------------------------
    def step(self, now_s: float | None = None, stats_by_device: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[PowerAction]:
        """One control step: fold stats per device, ask each group's policy, apply the differences."""
        now = self.clock() if now_s is None else now_s
        stats_by_device = stats_by_device or {}
        actions: list[PowerAction] = []
        for group in list(self._groups.values()):
            loads = {d: fold_stats(stats_by_device.get(d), self.devices[d]) for d in group.device_ids}
            try:
                targets = group.policy.decide(now, loads, self)
            except PolicyError as exc:
                log.error("power group %s: %s", group.name, exc)
                continue
            actions.extend(self._apply(group, targets))
        self.steps += 1
        self.last_step_s = now
        return actions

    def on_work_arrived(self, device_id: str, now_s: float | None = None) -> list[PowerAction]:
        """Release a parked device at once (call when a request is placed on it)."""
        now = self.clock() if now_s is None else now_s
        for group in self._groups.values():
            if device_id in group.device_ids:
                return self._apply(group, group.policy.work_arrived(device_id, now))
        return []

    def _needs(self, device_id: str, setting: str, value: Any) -> bool:
        """Whether a target differs from what is in force (enforce) or was last recommended (recommend)."""
        if not self.actuator.enforcing:
            return self._issued.get((device_id, setting), object()) != value
        dev = self.devices[device_id]
        try:  # compare with the device itself, so a change made behind our back is corrected too
            if setting == "power_limit":
                want = dev.power_limit_constraints().default_watts if value == "default" else value
                return abs((dev.power_limit_watts() or 0.0) - want) > 0.5
            lock = dev.locked_clocks_mhz()
            return (lock is not None) if value == "reset" else (lock is None or tuple(lock) != tuple(value))
        except DeviceError:
            return True

    def _apply(self, group: _Group, targets: list[DeviceTarget]) -> list[PowerAction]:
        actor = f"policy:{group.policy.name}/{group.name}"
        ops: list[tuple[int, Callable[[], PowerAction], str, str, Any]] = []
        for t in targets:
            if t.power_limit is not None and self._needs(t.device_id, "power_limit", t.power_limit):
                dev = self.devices[t.device_id]
                cur = self.power_limit_watts(t.device_id) or 0.0
                want = dev.power_limit_constraints().default_watts if t.power_limit == "default" else float(t.power_limit)
                # lowering limits first keeps a group's sum under its budget during the change
                order = 0 if want <= cur else 2
                if t.power_limit == "default":
                    fn = lambda d=t.device_id, r=t.reason: self.actuator.reset_power_limit(d, actor=actor, reason=r)  # noqa: E731
                else:
                    fn = lambda d=t.device_id, w=want, r=t.reason: self.actuator.set_power_limit(d, w, actor=actor, reason=r)  # noqa: E731
                ops.append((order, fn, t.device_id, "power_limit", t.power_limit))
            if t.locked_clocks is not None and self._needs(t.device_id, "locked_clocks", t.locked_clocks):
                if t.locked_clocks == "reset":
                    fn = lambda d=t.device_id, r=t.reason: self.actuator.reset_locked_clocks(d, actor=actor, reason=r)  # noqa: E731
                else:
                    lo, hi = t.locked_clocks  # type: ignore[misc]
                    fn = lambda d=t.device_id, a=lo, b=hi, r=t.reason: self.actuator.set_locked_clocks(d, a, b, actor=actor, reason=r)  # noqa: E731
                ops.append((1, fn, t.device_id, "locked_clocks", t.locked_clocks))
        done: list[PowerAction] = []
        for _, fn, device_id, setting, value in sorted(ops, key=lambda o: o[0]):
            try:
                done.append(fn())
                self._issued[(device_id, setting)] = value
            except DeviceError as exc:
                log.warning("power group %s: %s %s refused: %s", group.name, device_id, setting, exc)
        return done

    # --- policy selection ----------------------------------------------------------------------------------
    def _build_groups(self, groups: list[dict[str, Any]], *, where: str) -> dict[str, _Group]:
        built: dict[str, _Group] = {}
        owner: dict[str, str] = {}
        for i, g in enumerate(groups):
            name = g.get("name")
            label = f"{where}[{i}]" + (f" (name {name})" if name else "")
            if not name or not isinstance(name, str):
                raise PolicyError(f"{label}.name: a group needs a name")
            if name in built:
                raise PolicyError(f"{label}.name: group '{name}' appears twice")
            devs = g.get("devices")
            if not devs or not isinstance(devs, list):
                raise PolicyError(f"{label}.devices: list the device ids of the group")
            for d in devs:
                if d not in self.devices:
                    raise PolicyError(
                        f"{label}.devices: unknown device '{d}' (known: {', '.join(sorted(self.devices)) or 'none'})"
                    )
                if d in owner:
                    raise PolicyError(f"{label}.devices: '{d}' is already in group '{owner[d]}'; a device belongs to one group")
                owner[d] = name
            policy = g.get("policy", "none")
            if policy not in POLICY_NAMES:
                raise PolicyError(f"{label}.policy: unknown policy '{policy}'; choose one of {', '.join(POLICY_NAMES)}")
            raw = g.get("options") or {}
            try:
                opts = validate_options(policy, raw, where=f"{label}.options")
                pol = POLICIES[policy](name, devs, opts, self.devices)
            except PolicyOptionsError as exc:
                raise PolicyError(str(exc)) from None
            except PolicyError as exc:
                raise PolicyError(f"{label}: {exc}") from None
            built[name] = _Group(name, list(devs), pol, copy.deepcopy(raw))
        return built

    def get_policy(self) -> dict[str, Any]:
        """The body of GET /v1/power/policy."""
        return {
            "mode": self.actuator.mode,
            "interval_seconds": self.interval_seconds,
            "actuator": self.actuator.status(),
            "groups": [
                {
                    "name": g.name,
                    "devices": list(g.device_ids),
                    "policy": g.policy.name,
                    "options": copy.deepcopy(g.options_raw),
                    "state": g.policy.state(),
                }
                for g in self._groups.values()
            ],
        }

    def set_policy(
        self,
        group: str,
        policy: str,
        options: dict[str, Any] | None = None,
        *,
        devices: list[str] | None = None,
        actor: str = "operator",
        reason: str = "",
    ) -> dict[str, Any]:
        """Switch one group's policy (creating the group when devices are given). Raises PolicyError."""
        return self.put_policy(
            {"groups": [{"name": group, "policy": policy, "options": options or {}, **({"devices": devices} if devices else {})}]},
            actor=actor, reason=reason,
        )

    def put_policy(self, body: Any, *, actor: str = "operator", reason: str = "") -> dict[str, Any]:
        """Apply the body of PUT /v1/power/policy; all-or-nothing. Raises PolicyError with a clear message.

        Body: {"mode"?: "enforce"|"recommend", "groups"?: [{"name", "policy", "options"?, "devices"?}]}
        or a single group {"group" | "name", "policy", "options"?, "devices"?}. Groups not named are kept.
        """
        if not isinstance(body, dict):
            raise PolicyError("the body must be a JSON object with 'groups' (or 'group' and 'policy') and/or 'mode'")
        body = dict(body)
        unknown = set(body) - {"mode", "groups", "group", "name", "policy", "options", "devices", "reason"}
        if unknown:
            raise PolicyError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: mode, groups (or group, policy, options, devices), reason")
        reason = body.pop("reason", None) or reason
        mode = body.pop("mode", None)
        if mode is not None and mode not in ("enforce", "recommend"):
            raise PolicyError(f"mode: must be 'enforce' or 'recommend', not {mode!r}")
        if "groups" in body:
            if set(body) - {"groups"}:
                raise PolicyError("give either 'groups' or a single group's 'group'/'policy', not both")
            changes = body["groups"]
            if not isinstance(changes, list):
                raise PolicyError("groups: must be a list of {name, policy, options, devices}")
        elif set(body) & {"policy", "group", "name", "options", "devices"}:
            one = dict(body)
            if "group" in one:
                if "name" in one and one["name"] != one["group"]:
                    raise PolicyError(f"group and name both name the group ({one['group']!r}, {one['name']!r}): give one")
                one["name"] = one.pop("group")
            changes = [one]
        else:
            changes = []
        merged = {name: {"name": g.name, "devices": g.device_ids, "policy": g.policy.name, "options": g.options_raw}
                  for name, g in self._groups.items()}
        for i, ch in enumerate(changes):
            if not isinstance(ch, dict):
                raise PolicyError(f"groups[{i}]: must be an object with name and policy")
            extra = set(ch) - {"name", "devices", "policy", "options"}
            if extra:
                raise PolicyError(f"groups[{i}]: unknown field(s) {', '.join(sorted(extra))}; allowed: name, devices, policy, options")
            name = ch.get("name")
            if not name:
                where = f"groups[{i}].name" if "groups" in body else "group"
                raise PolicyError(f"{where}: name the group to change")
            if name not in merged and not ch.get("devices"):
                raise PolicyError(
                    f"groups[{i}].name: no group '{name}' (groups: {', '.join(merged) or 'none'}); give 'devices' to create it"
                )
            if "policy" not in ch:
                raise PolicyError(f"groups[{i}].policy: give the policy ({', '.join(POLICY_NAMES)})")
            base = merged.get(name, {"name": name, "devices": [], "policy": "none", "options": {}})
            merged[name] = {
                "name": name,
                "devices": ch.get("devices") or base["devices"],
                "policy": ch["policy"],
                "options": ch.get("options") if ch.get("options") is not None else ({} if ch["policy"] != base["policy"] else base["options"]),
            }
        new = self._build_groups(list(merged.values()), where="groups")  # raises before anything changes
        old = self._groups
        for name, g in new.items():
            before = old.get(name)
            if before is not None and before.policy.name == g.policy.name and before.options_raw == g.options_raw \
                    and before.device_ids == g.device_ids:
                new[name] = before  # unchanged: keep its learned state (profiles, timers)
                continue
            self.actuator.record_policy_change(
                name,
                None if before is None else {"policy": before.policy.name, "options": before.options_raw},
                {"policy": g.policy.name, "options": g.options_raw, "devices": g.device_ids},
                actor=actor, reason=reason,
            )
        self._groups = new
        for name, g in new.items():
            before = old.get(name)
            if g.policy.name == "none" and before is not None and before.policy.name != "none":
                # handing a group back means handing back the operator's original settings
                self.actuator.restore(g.device_ids, reason=f"group {name} set to policy none", actor=actor)
                for d in g.device_ids:
                    self._issued.pop((d, "power_limit"), None)
                    self._issued.pop((d, "locked_clocks"), None)
        if mode is not None and mode != self.actuator.requested_mode:
            self.actuator.set_mode(mode, actor=actor, reason=reason or "mode change")
        return self.get_policy()

    def status(self) -> dict[str, Any]:
        return {"steps": self.steps, "last_step_s": self.last_step_s, **self.get_policy()}

    def loads(self, stats_by_device: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, DeviceLoad]:
        """The folded per-device load (for display and tests)."""
        return {d: fold_stats(stats_by_device.get(d), self.devices[d]) for d in self.devices}

"""The power policy interface, its inputs and outputs, and the registry of policies by name.

A policy never touches a device. It returns DeviceTargets; the governor compares them with what
is in force and asks the actuator for the difference. Each policy lives in its own module and
registers itself with @register_policy; POLICIES (name -> class) is the one list of policy names:
the config schema, the governor and the operator API all take their allowed values from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from scheduler.devices.base import Device, DeviceError


class PolicyError(ValueError):
    """A policy or its options cannot be applied to these devices; the message says why and how to fix."""


@dataclass
class DeviceLoad:
    """One device's load this step, folded from the ReplicaStats of the replicas on it."""

    running: int = 0
    waiting: int = 0
    ttft_p99_seconds: float | None = None
    tpot_p99_seconds: float | None = None
    decode_seconds_per_token: float | None = None
    power_watts: float | None = None
    sm_clock_mhz: float | None = None
    known: bool = False  # at least one replica reported on this device

    @property
    def demand(self) -> int:
        return self.running + self.waiting

    @property
    def busy(self) -> bool:
        return self.demand > 0


def fold_stats(stats: Sequence[Mapping[str, Any]] | None, device: Device | None = None) -> DeviceLoad:
    """Sum counts and take the worst p99 over the replicas on one device; power from the device itself."""
    load = DeviceLoad()
    for s in stats or ():
        load.known = True
        load.running += int(s.get("running", 0) or 0)
        load.waiting += int(s.get("waiting", 0) or 0)
        for key in ("ttft_p99_seconds", "tpot_p99_seconds", "decode_seconds_per_token"):
            v = s.get(key)
            if v is not None and not math.isnan(float(v)):
                cur = getattr(load, key)
                setattr(load, key, float(v) if cur is None else max(cur, float(v)))
        if s.get("power_watts") is not None and device is None:
            load.power_watts = (load.power_watts or 0.0) + float(s["power_watts"])
    if device is not None:
        try:
            load.power_watts = device.power_watts()
            load.sm_clock_mhz = device.sm_clock_mhz()
        except DeviceError:
            pass
    return load


@dataclass
class DeviceTarget:
    """What a policy wants for one device. None fields: leave that setting alone."""

    device_id: str
    #: a number: set this limit; "default": reset to the device default
    power_limit: float | str | None = None
    #: (min, max): lock; "reset": unlock
    locked_clocks: tuple[float, float] | str | None = None
    reason: str = ""


class GovernorView(Protocol):
    """What a policy may read besides the load: settings in force (or last recommended) and intensity."""

    def power_limit_watts(self, device_id: str) -> float | None: ...

    def locked_clocks_mhz(self, device_id: str) -> tuple[float, float] | None: ...

    def carbon_intensity(self, now_s: float) -> float | None: ...


class Policy:
    """One group's policy. A subclass sets `name` (its config value) and `options_model` (its options'
    schema, in scheduler/power/options.py) and registers itself with @register_policy."""

    name: ClassVar[str] = "none"
    options_model: ClassVar[type[BaseModel]]
    #: the governor gives this policy a grid carbon intensity (GovernorView.carbon_intensity)
    needs_carbon_intensity: ClassVar[bool] = False

    def __init__(self, group: str, device_ids: Sequence[str], options: Any, devices: Mapping[str, Device]):
        self.group = group
        self.device_ids = list(device_ids)
        self.options = options
        self.devices = {d: devices[d] for d in device_ids}
        self.check()

    def check(self) -> None:
        """Raise PolicyError if the options cannot work on these devices."""

    def decide(self, now_s: float, loads: Mapping[str, DeviceLoad], view: GovernorView) -> list[DeviceTarget]:
        return []

    def state(self) -> dict[str, Any]:
        return {}

    def work_arrived(self, device_id: str, now_s: float) -> list[DeviceTarget]:
        return []


#: policy name -> class, in registration order; filled by @register_policy as the package
#: scheduler.power.policies imports each policy module (import that package, not this module, to
#: see them all)
POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make `cls` the policy called `cls.name` in configs and the operator API."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"power policy '{cls.name}' is registered twice ({POLICIES[cls.name].__name__}, {cls.__name__})")
    POLICIES[cls.name] = cls
    return cls

"""The policy hooks the fleet simulator calls, and how a flag or config names them.

Placement: place(request: GenerationRequest, replicas: list[ReplicaStats]) -> int | None
    the index of the replica that gets the request, or None to refuse it (no capacity).
Governor: an object with step(now_s, stats_by_device) -> actions and, optionally,
    on_work_arrived(device_id, now_s); built by a factory(config, devices, clock) where devices is
    {device_id: Device}. stats_by_device maps each device id to the ReplicaStats of the replicas on it.

The same callables run behind the gateway; the simulator only supplies virtual time.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from scheduler.engines.base import GenerationRequest, ReplicaStats


class HookError(ValueError):
    """A hook name that cannot be resolved."""


Placement = Callable[[GenerationRequest, list[ReplicaStats]], "int | None"]


class GovernorHook(Protocol):
    def step(self, now_s: float | None = None, stats_by_device: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Any: ...


class RoundRobin:
    """The default placement: replicas in turn, skipping none (a baseline, not energy-aware)."""

    def __init__(self, start: int = 0):
        self._next = start

    def __call__(self, request: GenerationRequest, replicas: list[ReplicaStats]) -> int | None:
        if not replicas:
            return None
        i = self._next % len(replicas)
        self._next += 1
        return i


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not attr:
        raise HookError(f"'{spec}' is not 'module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise HookError(f"cannot load '{spec}': {exc}") from None


#: short names for placement policies that live elsewhere in the package
PLACEMENT_ALIASES = {"energy": "scheduler.routing.placement:place"}


def resolve_placement(name: str | None, *, seed: int = 0) -> Placement:
    """'round-robin' (default), an alias from PLACEMENT_ALIASES, or 'module:attribute'.

    The attribute may be the place callable itself or a class/factory taking no arguments that
    returns one (so stateful policies get a fresh instance per run).
    """
    if not name or name == "round-robin":
        return RoundRobin(start=seed)
    target = _import(PLACEMENT_ALIASES.get(name, name))
    if isinstance(target, type):
        target = target()
    # checked here, not at the first arrival: a module or a constant would otherwise fail mid-replay with a TypeError
    if not callable(target):
        raise HookError(f"'{name}' is a {type(target).__name__}, not a place(request, replicas) callable "
                        "or a class that makes one; give round-robin, energy or module:attribute naming one")
    return target


def resolve_governor(config, devices: Mapping[str, Any], clock: Callable[[], float], *, policy: str | None = None,
                     options: Mapping[str, Any] | None = None, factory: str | None = None) -> GovernorHook | None:
    """The power governor for a run: None when no group has a policy.

    policy: None keeps config.power as written; a policy name (static, slo-feedback, budget,
    carbon-aware, parking, none) puts every simulated device in one enforcing group with `options`.
    factory: 'module:attribute' called as factory(config, devices, clock) replaces the built-in governor.
    """
    from scheduler.config import PowerConfig, PowerGroupConfig
    from scheduler.power.options import PolicyOptionsError
    from scheduler.power.policies import validate_options

    power = config.power
    if policy is None and options:  # they would apply to nothing: the config's groups keep their own options
        raise HookError("--power-option needs --power-policy (the options are that policy's); "
                        "to change the config's groups' options, edit its power section")
    if policy is not None:
        try:  # the group below would report these as a pydantic traceback
            validate_options(policy, dict(options or {}), where="--power-option")
        except PolicyOptionsError as exc:
            raise HookError(f"--power-policy {policy}: {exc}") from None
        if policy == "none":
            return None
        power = PowerConfig(mode="enforce", interval_seconds=power.interval_seconds,
                            groups=[PowerGroupConfig(name="fleet", devices=sorted(devices), policy=policy, options=dict(options or {}))])
    if factory:
        return _import(factory)(config.model_copy(update={"power": power}), devices, clock)
    if not power.groups or all(g.policy == "none" for g in power.groups):
        return None
    from scheduler.power.actuator import PowerActuator
    from scheduler.power.governor import Governor

    state = tempfile.mkdtemp(prefix="wattlane-sim-power-")
    actuator = PowerActuator(devices, state, mode=power.mode, clock=clock, restore_on_start=False)
    governor = Governor(power, devices, actuator, clock=clock)
    # simulated devices need no settings kept across a crash: the store goes with the governor (a fleet
    # bench makes one per replay, so it would leave a directory behind for each)
    weakref.finalize(governor, shutil.rmtree, state, True)
    return governor

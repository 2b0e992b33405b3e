"""A simulated GPU behind the Device interface: the governor and the meter see it exactly as an NVML GPU.

Its physics come from a GPU profile (scheduler/sim/data/gpus.json). The simulated engine tells it
what it is doing (busy at a given mean power and clock, or idle) and the device integrates power
over time into its energy counter, piecewise constant between changes. Time comes from an
injectable clock: time.time for serving behind the real gateway, the discrete-event loop's virtual
clock for replays. Every figure it gives is labelled energy method "simulated".

A real GPU keeps its power limit and clock lock when the process that set them dies (until the
driver reloads). Given a settings_path, a simulated GPU does the same: it writes its settings there
on every change and starts from them, so a crash leaves it changed just as it would leave real
hardware, and a restore after kill -9 is observable.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scheduler.devices.base import (
    ClockConstraints,
    Device,
    DeviceKind,
    DeviceNotSupportedError,
    DeviceSettingError,
    EnergyMethod,
    EnergyScope,
    PowerLimitConstraints,
)
from scheduler.sim.physics import idle_power_watts
from scheduler.sim.profiles import GpuProfile, gpu_profile

log = logging.getLogger(__name__)

AMBIENT_CELSIUS = 30.0
#: steady-state temperature rise per watt (an H100 SXM at 700 W runs near 72 C)
CELSIUS_PER_WATT = 0.06


class SimulatedGpu(Device):
    kind = DeviceKind.SIMULATED_GPU
    energy_method = EnergyMethod.SIMULATED
    energy_scope = EnergyScope.GPU

    def __init__(
        self,
        device_id: str,
        profile: str | GpuProfile,
        node: str = "node0",
        clock: Callable[[], float] | None = None,
        settings_path: str | Path | None = None,
        nvml_index: int | None = None,
        uuid: str | None = None,
    ):
        self.device_id = device_id
        # the index an NVML GPU in its place would have (lets configs and tests name it as nvidia-smi does)
        self.nvml_index = nvml_index
        self._uuid = uuid
        self.node = node
        self.profile = profile if isinstance(profile, GpuProfile) else gpu_profile(profile)
        self.name = self.profile.name
        self._clock = clock or time.time
        self._lock = threading.Lock()
        p = self.profile
        self._limits = PowerLimitConstraints(p.power_limit_min_watts, p.power_limit_max_watts, p.power_limit_default_watts)
        step = p.sm_clock_step_mhz
        n = int((p.sm_clock_max_mhz - p.sm_clock_min_mhz) // step)
        supported = tuple(p.sm_clock_min_mhz + i * step for i in range(n + 1))
        if supported[-1] != p.sm_clock_max_mhz:
            supported += (p.sm_clock_max_mhz,)
        self._clocks = ClockConstraints(p.sm_clock_min_mhz, p.sm_clock_max_mhz, supported)
        self._power_limit = p.power_limit_default_watts
        self._locked: tuple[float, float] | None = None
        self._settings_path = Path(settings_path) if settings_path is not None else None
        self._load_settings()
        self._model_loaded = False
        self._busy = False
        self._capped = False
        self._busy_clock_mhz = p.sm_clock_max_mhz
        #: the clock the engine drops to between batches (per-batch clocks); None: the lock's (or the max) clock
        self._idle_clock_mhz: float | None = None
        self._t_last = self._clock()
        self._energy = 0.0
        self._power = idle_power_watts(p, model_loaded=False)
        self._listeners: list[Callable[["SimulatedGpu"], None]] = []

    # --- settings that outlive the process ------------------------------------------------------
    def _load_settings(self) -> None:
        path = self._settings_path
        if path is None or not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            watts = float(doc["power_limit_watts"])
            self._limits.check(watts)
            locked = doc.get("locked_clocks_mhz")
            lock = (float(locked[0]), float(locked[1])) if locked else None
            if lock:
                self._clocks.check(*lock)
        except (OSError, ValueError, KeyError, TypeError, IndexError, DeviceSettingError) as exc:
            log.warning("%s: ignoring unreadable settings in %s (%s); starting at the defaults", self.device_id, path, exc)
            return
        self._power_limit, self._locked = watts, lock

    def _save_settings(self) -> None:
        path = self._settings_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"power_limit_watts": self._power_limit,
                                   "locked_clocks_mhz": list(self._locked) if self._locked else None}))
        os.replace(tmp, path)

    # --- what the engine tells it ----------------------------------------------------------------
    def _integrate(self, at_s: float | None) -> float:
        now = self._clock() if at_s is None else at_s
        if now > self._t_last:
            self._energy += self._power * (now - self._t_last)
            self._t_last = now
        return now

    def attach_model(self, loaded: bool = True) -> None:
        with self._lock:
            self._integrate(None)
            self._model_loaded = loaded
            if not self._busy:
                self._power = self.idle_power_watts()

    def set_busy(self, *, power_watts: float, clock_mhz: float, capped: bool, at_s: float | None = None) -> None:
        with self._lock:
            self._integrate(at_s)
            self._busy, self._capped, self._busy_clock_mhz = True, capped, clock_mhz
            self._power = power_watts

    def set_idle(self, at_s: float | None = None) -> None:
        with self._lock:
            self._integrate(at_s)
            self._busy = self._capped = False
            self._power = self.idle_power_watts()

    def set_idle_clock_mhz(self, mhz: float | None, at_s: float | None = None) -> None:
        """The clock the engine holds while no batch runs (None: the locked or maximum clock), never above the lock.

        An engine that sets the clock per batch drops it between batches; the idle power follows.
        It is the engine's own setting, so no settings listener runs (the engine knows).
        """
        with self._lock:
            self._integrate(at_s)
            self._idle_clock_mhz = None if mhz is None else float(mhz)
            if not self._busy:
                self._power = self.idle_power_watts()

    def idle_clock_mhz(self) -> float:
        """The clock while no batch runs: the engine's idle clock, capped by the lock."""
        top = self.max_clock_mhz_allowed()
        return top if self._idle_clock_mhz is None else min(top, self._idle_clock_mhz)

    def energy_joules_at(self, at_s: float) -> float:
        with self._lock:
            return self._energy + self._power * max(at_s - self._t_last, 0.0)

    def add_settings_listener(self, fn: Callable[["SimulatedGpu"], None]) -> None:
        """fn(device) runs after every power-limit or clock change (the engine re-plans its batch)."""
        self._listeners.append(fn)

    def _changed(self) -> None:
        with self._lock:
            self._integrate(None)
            if not self._busy:
                self._power = self.idle_power_watts()
        for fn in list(self._listeners):
            fn(self)

    def control_key(self) -> tuple[float, float | None]:
        return (self._power_limit, self._locked[1] if self._locked else None)

    def max_clock_mhz_allowed(self) -> float:
        return self._locked[1] if self._locked else self.profile.sm_clock_max_mhz

    def idle_power_watts(self) -> float:
        return idle_power_watts(self.profile, model_loaded=self._model_loaded, max_clock_mhz=self.idle_clock_mhz())

    @property
    def busy(self) -> bool:
        return self._busy

    # --- Device readings -----------------------------------------------------------------------
    def energy_joules(self) -> float:
        return self.energy_joules_at(self._clock())

    def power_watts(self) -> float:
        return self._power

    def utilization_percent(self) -> float | None:
        return 100.0 if self._busy else 0.0

    def temperature_celsius(self) -> float | None:
        return AMBIENT_CELSIUS + CELSIUS_PER_WATT * self._power

    def sm_clock_mhz(self) -> float | None:
        if self._busy:
            return self._busy_clock_mhz
        return self.idle_clock_mhz() if self._model_loaded else self.profile.sm_clock_min_mhz

    def memory_clock_mhz(self) -> float | None:
        return self.profile.memory_clock_mhz

    def throttle_reasons(self) -> list[str]:
        if not self._busy:
            return ["gpu_idle"]
        if self._capped:
            return ["sw_power_cap"]
        if self._locked and self._locked[1] < self.profile.sm_clock_max_mhz:
            return ["applications_clocks_setting"]
        return []

    def uuid(self) -> str | None:
        return self._uuid or f"SIM-{self.profile.key}-{self.node}-{self.device_id}"

    # --- power limit ---------------------------------------------------------------------------
    def supports_power_limit(self) -> bool:
        return self.profile.power_limit_settable

    def power_limit_constraints(self) -> PowerLimitConstraints:
        return self._limits

    def power_limit_watts(self) -> float | None:
        return self._power_limit

    def set_power_limit_watts(self, watts: float) -> None:
        if not self.profile.power_limit_settable:
            raise DeviceNotSupportedError(f"{self.device_id}: {self.profile.name} has no settable power limit")
        self._limits.check(watts)
        self._power_limit = float(watts)
        self._save_settings()
        self._changed()

    def reset_power_limit(self) -> None:
        self._power_limit = self._limits.default_watts
        self._save_settings()
        self._changed()

    # --- locked clocks -------------------------------------------------------------------------
    def supports_locked_clocks(self) -> bool:
        return True

    def clock_constraints(self) -> ClockConstraints:
        return self._clocks

    def locked_clocks_mhz(self) -> tuple[float, float] | None:
        return self._locked

    def set_locked_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        self._clocks.check(min_mhz, max_mhz)
        self._locked = (float(min_mhz), float(max_mhz))
        self._save_settings()
        self._changed()

    def reset_locked_clocks(self) -> None:
        self._locked = None
        self._save_settings()
        self._changed()

"""A simulated GPU that also splits its energy and time into busy, idle and parked, for fleet accounting.

The device integrates its power piecewise constant between changes (scheduler/devices/simulated.py);
this subclass books each piece by the state the GPU was in: busy (running a batch: the "dynamic"
energy of the bench), idle (no batch, model loaded at its current clock) or parked (idle with its
clock locked to the bottom of its range, or with no model loaded). busy + idle = total energy, and
parked is a part of idle.
"""

from __future__ import annotations

from scheduler.devices.simulated import SimulatedGpu


class MeteredGpu(SimulatedGpu):
    """SimulatedGpu with busy / idle / parked seconds and joules (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self.busy_seconds = self.idle_seconds = self.parked_seconds = 0.0
        self.busy_joules = self.idle_joules = self.parked_joules = 0.0
        #: integral of the busy clock over busy time (its mean is the clock the batches ran at)
        self.busy_clock_mhz_seconds = 0.0
        super().__init__(*args, **kwargs)

    def parked(self) -> bool:
        """Idle at the lowest clock (or the lowest power limit), or with no model loaded."""
        if self._busy:
            return False
        if not self._model_loaded:
            return True
        low = self.profile.sm_clock_min_mhz + self.profile.sm_clock_step_mhz
        # the lowest clock counts however it was set: a parking lock or an engine's idle clock (per-batch clocks)
        return self.idle_clock_mhz() <= low or self._power_limit <= self.profile.power_limit_min_watts

    def _book(self, now: float) -> None:
        dt = now - self._t_last
        if dt <= 0:
            return
        e = self._power * dt
        if self._busy:
            self.busy_seconds += dt
            self.busy_joules += e
            self.busy_clock_mhz_seconds += self._busy_clock_mhz * dt
        else:
            self.idle_seconds += dt
            self.idle_joules += e
            if self.parked():
                self.parked_seconds += dt
                self.parked_joules += e

    def _integrate(self, at_s: float | None) -> float:
        now = self._clock() if at_s is None else at_s
        self._book(now)
        return super()._integrate(now)

    def accounting_at(self, at_s: float) -> dict[str, float]:
        """Seconds and joules per state from the start to at_s (the piece in progress included)."""
        with self._lock:
            self._integrate(at_s)
            return {
                "busy_seconds": self.busy_seconds, "idle_seconds": self.idle_seconds, "parked_seconds": self.parked_seconds,
                "busy_joules": self.busy_joules, "idle_joules": self.idle_joules, "parked_joules": self.parked_joules,
                "busy_clock_mhz_seconds": self.busy_clock_mhz_seconds,
                "energy_joules": self._energy,
            }

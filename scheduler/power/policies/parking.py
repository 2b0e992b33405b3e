"""Policy 'parking': lock idle devices to their lowest clock and release them when work arrives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scheduler.devices.base import Device, DeviceError
from scheduler.power.options import ParkingOptions
from scheduler.power.policies.base import DeviceLoad, DeviceTarget, Policy, PolicyError, register_policy


@dataclass
class _ParkState:
    last_busy_s: float | None = None
    parked: bool = False


@register_policy
class ParkingPolicy(Policy):
    """Lock a device idle for idle_seconds to its lowest clock (or limit); release when work arrives."""

    name = "parking"
    options_model = ParkingOptions
    options: ParkingOptions

    def check(self) -> None:
        self._park: dict[str, _ParkState] = {d: _ParkState() for d in self.device_ids}
        for d in self.device_ids:
            dev = self.devices[d]
            if dev.supports_locked_clocks():
                p = self._park_clock(dev)
                try:
                    dev.clock_constraints().check(p, p)
                except DeviceError as exc:
                    raise PolicyError(f"{d}: park_clock_mhz: {exc}") from None
            elif not dev.supports_power_limit():
                raise PolicyError(f"{d} has neither lockable clocks nor a settable power limit; it cannot be parked")

    def _park_clock(self, dev: Device) -> float:
        if self.options.park_clock_mhz is not None:
            return self.options.park_clock_mhz
        c = dev.clock_constraints()
        return min(c.supported_mhz) if c.supported_mhz else c.min_mhz

    def _park_target(self, d: str) -> DeviceTarget:
        dev = self.devices[d]
        reason = f"parking: idle for {self.options.idle_seconds:g} s"
        if dev.supports_locked_clocks():
            p = self._park_clock(dev)
            return DeviceTarget(d, locked_clocks=(p, p), reason=reason)
        return DeviceTarget(d, power_limit=dev.power_limit_constraints().min_watts, reason=reason)

    def _release_target(self, d: str) -> DeviceTarget:
        if self.devices[d].supports_locked_clocks():
            return DeviceTarget(d, locked_clocks="reset", reason="parking: work arrived, release")
        return DeviceTarget(d, power_limit="default", reason="parking: work arrived, release")

    def decide(self, now_s, loads, view):
        out = []
        for d in self.device_ids:
            st = self._park[d]
            load = loads.get(d, DeviceLoad())
            if st.last_busy_s is None:
                st.last_busy_s = now_s  # never park on the first look: idleness is measured from here
            if load.busy:
                st.last_busy_s = now_s
                if st.parked:
                    st.parked = False
                    out.append(self._release_target(d))
            elif not st.parked and now_s - st.last_busy_s >= self.options.idle_seconds:
                st.parked = True
                out.append(self._park_target(d))
        return out

    def work_arrived(self, device_id: str, now_s: float) -> list[DeviceTarget]:
        st = self._park.get(device_id)
        if st is None:
            return []
        st.last_busy_s = now_s
        if st.parked:
            st.parked = False
            return [self._release_target(device_id)]
        return []

    def state(self) -> dict[str, Any]:
        return {d: {"parked": st.parked, "last_busy_s": st.last_busy_s} for d, st in self._park.items()}

"""Policy 'static': operator-set power limits and clock locks, the same every step."""

from __future__ import annotations

from scheduler.devices.base import DeviceError
from scheduler.power.options import StaticOptions
from scheduler.power.policies.base import DeviceTarget, Policy, PolicyError, register_policy


@register_policy
class StaticPolicy(Policy):
    name = "static"
    options_model = StaticOptions
    options: StaticOptions

    def _setting(self, device_id: str) -> tuple[float | None, tuple[float, float] | None]:
        o = self.options
        per = o.devices.get(device_id)
        limit = per.power_limit_watts if per and per.power_limit_watts is not None else o.power_limit_watts
        lock = per.locked_clocks_mhz if per and per.locked_clocks_mhz is not None else o.locked_clocks_mhz
        return limit, lock

    def check(self) -> None:
        unknown = set(self.options.devices) - set(self.device_ids)
        if unknown:
            raise PolicyError(f"options.devices names {', '.join(sorted(unknown))}, not in this group")
        for d in self.device_ids:
            dev = self.devices[d]
            limit, lock = self._setting(d)
            try:
                if limit is not None:
                    if not dev.supports_power_limit():
                        raise PolicyError(f"{d} has no settable power limit")
                    dev.power_limit_constraints().check(limit)
                if lock is not None:
                    if not dev.supports_locked_clocks():
                        raise PolicyError(f"{d} has no lockable clocks")
                    dev.clock_constraints().check(*lock)
            except DeviceError as exc:
                raise PolicyError(f"{d}: {exc}") from None

    def decide(self, now_s, loads, view):
        out = []
        for d in self.device_ids:
            limit, lock = self._setting(d)
            out.append(DeviceTarget(d, power_limit=limit, locked_clocks=lock, reason="static: operator setting"))
        return out

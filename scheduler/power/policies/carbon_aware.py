"""Policy 'carbon-aware': a power budget that follows grid carbon intensity."""

from __future__ import annotations

from typing import Any

from scheduler.power.options import CarbonAwareOptions
from scheduler.power.policies.base import GovernorView, PolicyError, register_policy
from scheduler.power.policies.budget import BudgetPolicy


@register_policy
class CarbonAwarePolicy(BudgetPolicy):
    """A budget that follows grid carbon intensity: tighter when dirty, looser when clean."""

    name = "carbon-aware"
    options_model = CarbonAwareOptions
    needs_carbon_intensity = True
    options: CarbonAwareOptions  # type: ignore[assignment]

    def check(self) -> None:
        for d in self.device_ids:
            if not self.devices[d].supports_power_limit():
                raise PolicyError(f"{d} has no settable power limit; a carbon-aware group needs power-limited devices")
        self.last_budget_watts = None
        self.last_intensity: float | None = None
        self._check_budget(self.options.budget_watts_dirty)

    def intensity(self, now_s: float | None, view: GovernorView | None) -> float | None:
        value = view.carbon_intensity(now_s) if (view is not None and now_s is not None) else None
        if value is None and self.options.hourly_intensity_gco2e_per_kwh and now_s is not None:
            value = self.options.hourly_intensity_gco2e_per_kwh[int(now_s // 3600) % 24]
        return value

    def budget_for(self, now_s, view=None) -> float:
        o = self.options
        g = self.intensity(now_s, view)
        self.last_intensity = g
        if g is None:
            return o.budget_watts_dirty  # unknown grid: assume the worst, as a cap should
        frac = (g - o.clean_intensity_gco2e_per_kwh) / (o.dirty_intensity_gco2e_per_kwh - o.clean_intensity_gco2e_per_kwh)
        frac = min(max(frac, 0.0), 1.0)
        return o.budget_watts_clean + frac * (o.budget_watts_dirty - o.budget_watts_clean)

    def state(self) -> dict[str, Any]:
        return {"budget_watts": self.last_budget_watts, "intensity_gco2e_per_kwh": self.last_intensity}

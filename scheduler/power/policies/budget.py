"""Policy 'budget': the group's power limits sum to at most a budget, shared by demand."""

from __future__ import annotations

import math
from typing import Any

from scheduler.power.options import BudgetOptions
from scheduler.power.policies.base import DeviceLoad, DeviceTarget, GovernorView, Policy, PolicyError, register_policy
from scheduler.power.policies.budget_sharing import share_budget


@register_policy
class BudgetPolicy(Policy):
    """The sum of the group's limits stays <= the budget; the share follows running + waiting requests."""

    name = "budget"
    options_model = BudgetOptions
    options: BudgetOptions

    def check(self) -> None:
        for d in self.device_ids:
            if not self.devices[d].supports_power_limit():
                raise PolicyError(f"{d} has no settable power limit; a budget group needs power-limited devices")
        self.last_budget_watts: float | None = None
        self._check_budget(self.budget_for(None))

    def _constraints(self):
        return [self.devices[d].power_limit_constraints() for d in self.device_ids]

    def _check_budget(self, budget: float) -> None:
        mins = sum(c.min_watts for c in self._constraints())
        if budget is not None and budget + 1e-9 < mins:
            raise PolicyError(
                f"budget {budget:g} W is below the sum of the group's minimum power limits ({mins:g} W); "
                f"raise the budget or remove devices from the group"
            )

    def budget_for(self, now_s: float | None, view: GovernorView | None = None) -> float:
        return self.options.budget_watts

    def decide(self, now_s, loads, view):
        budget = self.budget_for(now_s, view)
        self.last_budget_watts = budget
        cons = self._constraints()
        demands = [loads.get(d, DeviceLoad()).demand + self.options.idle_demand for d in self.device_ids]
        targets = share_budget(budget, [c.min_watts for c in cons], [c.max_watts for c in cons], demands)
        current = [view.power_limit_watts(d) for d in self.device_ids]
        chosen = [
            cur if cur is not None and abs(t - cur) < self.options.deadband_watts and c.min_watts <= cur <= c.max_watts else t
            for t, cur, c in zip(targets, current, cons)
        ]
        if sum(chosen) > budget + 1e-9:
            chosen = targets  # the deadband never costs the budget
        chosen = self._two_phase(chosen, current, cons, budget)
        reason = f"{self.name}: share of {budget:.0f} W by demand"
        return [DeviceTarget(d, power_limit=float(w), reason=reason) for d, w in zip(self.device_ids, chosen)]

    @staticmethod
    def _two_phase(chosen: list[float], current: list[float | None], cons, budget: float) -> list[float]:
        """Raise limits only with watts already freed: a lowered cap binds at the device's next iteration,
        so until then it still draws up to its old limit. Increases that would need the watts of this
        step's decreases wait for the next step (they are scaled down, never the decreases)."""
        cur = [c if c is not None else k.max_watts for c, k in zip(current, cons)]
        deltas = [max(new - old, 0.0) for new, old in zip(chosen, cur)]
        wanted = sum(deltas)
        if wanted <= 0:
            return chosen
        headroom = budget - sum(cur)
        if headroom >= wanted - 1e-9:
            return chosen
        scale = max(headroom, 0.0) / wanted
        return [
            (max(k.min_watts, float(math.floor(old + d * scale))) if d > 0 else new)
            for new, old, d, k in zip(chosen, cur, deltas, cons)
        ]

    def state(self) -> dict[str, Any]:
        return {"budget_watts": self.last_budget_watts}

"""Splits a group's power budget among its devices by demand (water-filling)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scheduler.power.policies.base import PolicyError


def share_budget(budget_watts: float, mins: Sequence[float], maxs: Sequence[float], demands: Sequence[float]) -> list[float]:
    """Split a power budget by demand (water-filling): each device gets at least its min, at most its max.

    Results are whole watts rounded down, so their sum never exceeds the budget.
    """
    n = len(mins)
    if budget_watts + 1e-9 < sum(mins):
        raise PolicyError(f"budget {budget_watts:g} W is below the sum of the devices' minimum limits ({sum(mins):g} W)")
    alloc = [float(m) for m in mins]
    remaining = budget_watts - sum(alloc)
    open_ = [i for i in range(n) if maxs[i] > alloc[i]]
    weights = [max(float(x), 0.0) for x in demands]
    if sum(weights[i] for i in open_) <= 0:
        weights = [1.0] * n
    while remaining > 1e-9 and open_:
        total_w = sum(weights[i] for i in open_)
        if total_w <= 0:  # only demand-less devices can still take watts: share the rest evenly
            for i in open_:
                weights[i] = 1.0
            total_w = float(len(open_))
        capped = []
        for i in open_:
            share = remaining * weights[i] / total_w
            if alloc[i] + share >= maxs[i]:
                capped.append(i)
        if not capped:
            for i in open_:
                alloc[i] += remaining * weights[i] / total_w
            remaining = 0.0
            break
        for i in capped:
            remaining -= maxs[i] - alloc[i]
            alloc[i] = float(maxs[i])
            open_.remove(i)
    out = [max(float(mins[i]), float(math.floor(alloc[i] + 1e-6))) for i in range(n)]
    # the tolerance that keeps 549.9999999 W from becoming 549 W can round a share up past the budget:
    # take those watts back, one at a time, from the devices furthest above their minimum
    excess = sum(out) - budget_watts
    while excess > 1e-9:
        above = [i for i in range(n) if out[i] - 1.0 >= mins[i]]
        if not above:
            break
        i = max(above, key=lambda k: out[k] - mins[k])
        out[i] -= 1.0
        excess -= 1.0
    return out

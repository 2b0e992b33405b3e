"""Power policies by name: imports every policy module so that POLICIES lists them all.

Adding a policy is one new module here (a Policy subclass with @register_policy, its options
model in scheduler/power/options.py) and one import line below. The config schema, the governor
and the operator API take the allowed policy names from POLICIES.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

# one import per policy: importing the module registers it (order = the order names are listed in)
from scheduler.power.policies import none, static, slo_feedback, budget, carbon_aware, parking  # noqa: F401  isort: skip
from scheduler.power.options import PolicyOptionsError
from scheduler.power.policies.base import (
    POLICIES,
    DeviceLoad,
    DeviceTarget,
    GovernorView,
    Policy,
    PolicyError,
    fold_stats,
    register_policy,
)
from scheduler.power.policies.budget_sharing import share_budget

#: the names a power group's `policy` may take
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)

__all__ = [
    "POLICIES", "POLICY_NAMES", "DeviceLoad", "DeviceTarget", "GovernorView", "Policy", "PolicyError",
    "fold_stats", "register_policy", "share_budget", "validate_options",
]


def validate_options(policy: str, options: dict[str, Any] | None, *, where: str = "options") -> BaseModel:
    """Parse `options` for `policy`; raise PolicyOptionsError naming the offending key."""
    if policy not in POLICIES:
        raise PolicyOptionsError(f"unknown policy '{policy}'; choose one of {', '.join(POLICY_NAMES)}")
    model = POLICIES[policy].options_model
    try:
        return model.model_validate(options or {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(model.model_fields) or "none"
                msg = f"unknown option for policy '{policy}' (allowed: {allowed})"
            problems.append(f"{where}.{key}: {msg}" if key else f"{where}: {msg}")
        raise PolicyOptionsError("; ".join(problems)) from None

"""Policy 'none': Wattlane leaves the group's devices at their original settings."""

from __future__ import annotations

from scheduler.power.options import NoneOptions
from scheduler.power.policies.base import Policy, register_policy


@register_policy
class NonePolicy(Policy):
    name = "none"
    options_model = NoneOptions

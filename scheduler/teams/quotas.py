"""Which limits and budgets apply to a caller: its key's own, and its team's, with the team's low-budget policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from scheduler.config import BudgetConfig, RateLimitsConfig, TeamConfig, WattlaneConfig

@dataclass(frozen=True)
class Subject:
    """One account that limits and budgets are kept for: 'key:<id>' or 'team:<name>'."""

    name: str
    #: how messages name it: "key 'ci-bot'", "team 'search'"
    label: str
    limits: RateLimitsConfig
    budgets: tuple[BudgetConfig, ...]


@dataclass(frozen=True)
class Quota:
    """Everything admission checks for one caller, and what it does when a budget runs low."""

    subjects: tuple[Subject, ...]
    warn_at_fraction: float = 0.8
    when_low: str = "refuse"
    downgrade_min_quality: float | None = None
    team: str | None = None

    @property
    def has_budgets(self) -> bool:
        return any(s.budgets for s in self.subjects)


@dataclass(frozen=True)
class KeyQuota:
    """A key's own limits and budgets, as the config or the teams database gives them."""

    team: str | None = None
    limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    budgets: tuple[BudgetConfig, ...] = field(default_factory=tuple)


class QuotaError(ValueError):
    """Limits or budgets given at run time (API, CLI) that do not validate; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parse_key_quota(team: str | None, limits: dict[str, Any] | None, budgets: list[dict[str, Any]] | None) -> KeyQuota:
    """Validate a run-time key's limits and budgets with the config's own models (the same rules as the file)."""
    try:
        lim = RateLimitsConfig.model_validate(limits or {})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise QuotaError(f"limits.{'.'.join(map(str, e['loc']))}: {e['msg']}", "limits") from None
    out = []
    for i, b in enumerate(budgets or []):
        try:
            out.append(BudgetConfig.model_validate(b))
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(map(str, e["loc"]))
            raise QuotaError(f"budgets[{i}]{'.' + where if where else ''}: {e['msg'].removeprefix('Value error, ')}",
                             "budgets") from None
    return KeyQuota(team, lim, tuple(out))


def quota_for(config: WattlaneConfig, key_id: str, key: KeyQuota) -> Quota | None:
    """The caller's Quota, or None when nothing limits it (then admission costs nothing)."""
    subjects = []
    if key.limits.any() or key.budgets:
        subjects.append(Subject(f"key:{key_id}", f"key '{key_id}'", key.limits, key.budgets))
    team: TeamConfig | None = config.team(key.team)
    if team is not None and (team.limits.any() or team.budgets):
        subjects.append(Subject(f"team:{team.name}", f"team '{team.name}'", team.limits, tuple(team.budgets)))
    if not subjects:
        return None
    if team is None:
        return Quota(tuple(subjects), team=key.team)
    return Quota(tuple(subjects), team.warn_at_fraction, team.when_low, team.downgrade_min_quality, team.name)

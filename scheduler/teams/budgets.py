"""Energy (joules) and carbon (gCO2e) budgets per period: what is spent and reserved, and the periods' bounds.

A budget's use = what finished requests spent in the period (settled with the same joules and grams as
their ledger rows, idle share included) + what the requests still running have reserved. A request
reserves max(the routing decision's predicted energy, the subject's moving average per request); so
when the budget runs out, the only overshoot left is what the requests then running spend beyond
their reservations.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone

from scheduler.config import BudgetConfig
from scheduler.teams.quotas import Subject

#: weight of the newest request in the moving average of a subject's cost per request
COST_AVERAGE_WEIGHT = 0.2
PERIODS = ("day", "month")
_UNITS = {"energy_joules": "J", "gco2e": "gCO2e"}


def period_bounds(period: str, now_s: float) -> tuple[float, float]:
    """(start, end) in unix seconds of the UTC day or month that contains now_s."""
    now = datetime.fromtimestamp(now_s, timezone.utc)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        end = datetime.fromtimestamp(start.timestamp() + 86400, timezone.utc)
    elif period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    return start.timestamp(), end.timestamp()


@dataclass(frozen=True)
class BudgetUse:
    subject: Subject
    budget: BudgetConfig
    spent: float
    reserved: float
    reset_unix_s: float

    @property
    def used(self) -> float:
        return self.spent + self.reserved

    @property
    def fraction(self) -> float:
        return self.used / self.budget.amount

    def describe(self) -> str:
        unit = _UNITS[self.budget.quantity]
        return (f"{self.subject.label} {self.budget.quantity} budget per {self.budget.period}: "
                f"{self.fraction:.0%} used ({self.used:.6g} of {self.budget.amount:.6g} {unit})")


def _column(budget: BudgetConfig) -> str:
    return "joules" if budget.quantity == "energy_joules" else "gco2e"


def use(conn: sqlite3.Connection, subject: Subject, budget: BudgetConfig, now_s: float) -> BudgetUse:
    start, end = period_bounds(budget.period, now_s)
    col = _column(budget)
    row = conn.execute(f"SELECT {col} FROM spend WHERE subject = ? AND period = ? AND period_start_unix_s = ?",
                       (subject.name, budget.period, start)).fetchone()
    reserved = conn.execute(f"SELECT COALESCE(SUM(reserved_{col}), 0) FROM inflight WHERE subject = ? AND expires_unix_s > ?",
                            (subject.name, now_s)).fetchone()[0]
    return BudgetUse(subject, budget, row[0] if row else 0.0, reserved, end)


def cost_estimate(conn: sqlite3.Connection, subject: Subject) -> tuple[float, float] | None:
    """(joules, gCO2e) one request of the subject has cost lately; None before its first measured one."""
    row = conn.execute("SELECT joules_per_request, gco2e_per_request FROM cost_estimate WHERE subject = ?",
                       (subject.name,)).fetchone()
    return (row[0], row[1]) if row else None


def add_spend(conn: sqlite3.Connection, subject_name: str, joules: float, gco2e: float, at_s: float, *,
              measured: bool = True) -> None:
    """Count a finished request's joules and grams in the subject's day and month, and (measured) in its cost average."""
    for period in PERIODS:
        start, _ = period_bounds(period, at_s)
        conn.execute(
            "INSERT INTO spend (subject, period, period_start_unix_s, joules, gco2e, requests) VALUES (?, ?, ?, ?, ?, 1) "
            "ON CONFLICT (subject, period, period_start_unix_s) DO UPDATE SET joules = joules + excluded.joules, "
            "gco2e = gco2e + excluded.gco2e, requests = requests + 1",
            (subject_name, period, start, joules, gco2e))
    if not measured:
        return
    w = COST_AVERAGE_WEIGHT
    conn.execute(
        "INSERT INTO cost_estimate (subject, joules_per_request, gco2e_per_request) VALUES (?, ?, ?) "
        "ON CONFLICT (subject) DO UPDATE SET joules_per_request = (1 - ?) * joules_per_request + ? * excluded.joules_per_request, "
        "gco2e_per_request = (1 - ?) * gco2e_per_request + ? * excluded.gco2e_per_request",
        (subject_name, joules, gco2e, w, w, w, w))

"""Admission for teams: the serving path's one call before routing (limits, budgets, downgrade) and the settling after.

admit(job, select):
  1. the caller's budgets, as this replica saw them at most STATE_CACHE_SECONDS ago: spent -> 429;
     low -> a warning, and with when_low "downgrade" a quality floor for routing;
  2. select(job): routing, with the floor (the smallest model whose predicted quality reaches it);
  3. one write transaction in the shared teams database: every limit of the key and the team, and
     every budget with this request's reservation; it counts the request, or refuses it with 429.
When the request's ledger row is written, Ticket.settle replaces the reservation with what it spent.

Why SQLite rather than a Ray actor: the check and the reservation are one BEGIN IMMEDIATE transaction
(well under a millisecond on a local WAL file), so any number of gateway replicas stay exact without a
single-threaded actor hop on every request; the CLI works on the same file with the server up or
down; and spend and limits survive restarts. Overshoot bound: limits none (a request's tokens are
reserved as prompt estimate + max_tokens); budgets, what the requests running when a budget runs out
spend beyond their reservations (each reserves at least the subject's moving average per request, and
until a subject has one measured request each replica runs only one of its requests at a time, so with
requests of like cost no more than one request per replica is admitted beyond the budget).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.api.errors import ApiError
from scheduler.teams import budgets, limits
from scheduler.teams.quotas import Quota
from scheduler.teams.store import TeamsStore

log = logging.getLogger(__name__)

#: how stale a replica's view of budgets may be for the soft decisions (warning, downgrade); refusals
#: at the limit are decided in the shared transaction, never from this view
STATE_CACHE_SECONDS = 0.5
#: a reservation its gateway never settled (the process died) stops counting after this
RESERVATION_TTL_SECONDS = 900.0
BUDGET_WARNING_HEADER = "x-wattlane-budget-warning"
#: before a budgeted subject has a measured request, each replica runs one of its requests at a time
#: (the others wait, polling): the only spend no reservation backs is one request per replica
FIRST_MEASUREMENT_POLL_SECONDS = 0.05
FIRST_MEASUREMENT_WAIT_SECONDS = 60.0
#: reserve_now's answer while this replica's first request of a budgeted subject runs
FIRST_MEASUREMENT_PENDING = limits.Refusal("first measurement pending", 1)


def replica_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Ticket:
    """What one admitted request holds in the teams database, and what admission decided for it."""

    ticket_id: str
    request_id: str
    quota: Quota
    guard: "TeamGuard"
    #: routing's quality floor when the request was downgraded, and why
    quality_floor: float | None = None
    downgrade_reason: str | None = None
    #: budgets past their warning fraction, for the x-wattlane-budget-warning header
    warnings: list[str] = field(default_factory=list)
    window_ids: dict[str, int] = field(default_factory=dict)
    reserved: bool = False
    settled: bool = False

    def header(self) -> dict[str, str]:
        if not self.warnings:
            return {}
        text = "; ".join(self.warnings) + ("; downgraded" if self.quality_floor is not None else "")
        return {BUDGET_WARNING_HEADER: text}

    async def settle(self, joules: float | None, gco2e: float | None, tokens: int) -> None:
        """The request ended (its ledger row is written): free its reservation, count what it spent. Once."""
        if self.settled:
            return
        self.settled = True
        await asyncio.to_thread(self.guard.settle_now, self, joules, gco2e, tokens)

    def release(self) -> None:
        """The request ended before any work (no ledger row): free its reservation, in the background."""
        if self.reserved and not self.settled:
            self.reserved = False
            threading.Thread(target=self.guard.release_now, args=(self,), daemon=True).start()


class TeamGuard:
    def __init__(self, store: TeamsStore, *, holder: str | None = None,
                 grams_per_joule: Callable[[], float] = lambda: 0.0,
                 reservation_ttl_seconds: float = RESERVATION_TTL_SECONDS,
                 state_cache_seconds: float = STATE_CACHE_SECONDS,
                 on_budget_use: Callable[..., None] | None = None):
        self.store = store
        #: called (scope, name, kind, used_ratio) with each budget's use as this replica reads it: the
        #: wattlane_budget_used_ratio gauge (the fullest budget per scope, name and kind: day or month)
        self._on_budget_use = on_budget_use
        self.holder = holder or replica_holder()
        self._grams_per_joule = grams_per_joule
        self.reservation_ttl_seconds = reservation_ttl_seconds
        self.state_cache_seconds = state_cache_seconds
        self._state: dict[str, tuple[float, list[budgets.BudgetUse]]] = {}
        self._pruned_s = 0.0

    # --- the serving path ---------------------------------------------------------------------
    async def admit(self, job: Any, select: Callable[[Any], Any]) -> Any:
        """Check, route (downgraded when a budget runs low and the team chose so), reserve; 429 when over."""
        quota: Quota | None = job.quota
        if quota is None:
            return select(job)
        ticket = Ticket(uuid.uuid4().hex, job.request_id, quota, self)
        if quota.has_budgets:
            for use in await self._budget_use(quota):
                if use.fraction >= 1.0:
                    raise self._budget_refusal(use)
                if use.fraction >= quota.warn_at_fraction:
                    ticket.warnings.append(use.describe())
            if ticket.warnings and quota.when_low == "downgrade":
                ticket.quality_floor = quota.downgrade_min_quality
                ticket.downgrade_reason = (f"budget downgrade ({ticket.warnings[0]}): smallest model with predicted "
                                           f"quality >= floor {quota.downgrade_min_quality:.2f}")
        job.admission = ticket
        routed = select(job)
        refusal = await self._reserve(ticket, routed.decision)
        if refusal is not None:
            job.admission = None
            raise ApiError(429, refusal.message + f"; retry after {refusal.retry_after_seconds} s",
                           code=refusal.code, headers={"Retry-After": str(refusal.retry_after_seconds)})
        return routed

    async def _reserve(self, ticket: Ticket, decision: Any) -> limits.Refusal | None:
        """reserve_now in a worker thread, waiting while this replica's first request of an unmeasured budget runs."""
        chosen = decision.chosen
        predicted_joules = (chosen.predicted_energy_joules if chosen is not None else None) or 0.0
        tokens = decision.prompt_tokens + decision.output_tokens
        waited_s = 0.0
        while True:
            reserving = asyncio.ensure_future(asyncio.to_thread(self.reserve_now, ticket, predicted_joules, tokens))
            try:
                refusal = await asyncio.shield(reserving)
            except asyncio.CancelledError:  # the client left: whatever the transaction reserved is freed when it ends
                reserving.add_done_callback(lambda _: ticket.release())
                raise
            if refusal is not FIRST_MEASUREMENT_PENDING:
                break
            if waited_s >= FIRST_MEASUREMENT_WAIT_SECONDS:
                refusal = limits.Refusal("the budget's first request is still being measured", 1, code="budget_exceeded")
                break
            await asyncio.sleep(FIRST_MEASUREMENT_POLL_SECONDS)
            waited_s += FIRST_MEASUREMENT_POLL_SECONDS
        return refusal

    def _budget_refusal(self, use: budgets.BudgetUse) -> ApiError:
        now_s = time.time()
        if use.spent >= use.budget.amount:
            wait_s = max(1, int(use.reset_unix_s - now_s + 1))
            why = f"{use.describe()}: spent; it resets at the start of the next {use.budget.period} (UTC)"
        else:  # the running requests hold the rest; it frees when they end
            wait_s = 1
            why = f"{use.describe()}: the rest is reserved by requests still running"
        return ApiError(429, f"{why}; retry after {wait_s} s", code="budget_exceeded",
                        headers={"Retry-After": str(wait_s)})

    async def _budget_use(self, quota: Quota) -> list[budgets.BudgetUse]:
        out: list[budgets.BudgetUse] = []
        stale = []
        now = time.monotonic()
        for s in quota.subjects:
            if not s.budgets:
                continue
            cached = self._state.get(s.name)
            if cached is not None and now - cached[0] < self.state_cache_seconds:
                out.extend(cached[1])
            else:
                stale.append(s)
        if stale:
            fresh = await asyncio.to_thread(self._read_use, stale)
            for s in stale:
                mine = [u for u in fresh if u.subject.name == s.name]
                self._state[s.name] = (now, mine)
                out.extend(mine)
            self._publish(fresh)
        return out

    def _publish(self, uses: list[budgets.BudgetUse]) -> None:
        if self._on_budget_use is None:
            return
        fullest: dict[tuple[str, str, str], float] = {}
        for u in uses:
            scope, _, name = u.subject.name.partition(":")
            kind = "energy" if u.budget.quantity == "energy_joules" else "carbon"
            fullest[(scope, name, kind)] = max(fullest.get((scope, name, kind), 0.0), u.fraction)
        for (scope, name, kind), ratio in fullest.items():
            self._on_budget_use(scope=scope, name=name, kind=kind, used_ratio=ratio)

    def _read_use(self, subjects: list[Any]) -> list[budgets.BudgetUse]:
        conn = self.store.conn()
        now_s = time.time()
        return [budgets.use(conn, s, b, now_s) for s in subjects for b in s.budgets]

    # --- the shared transactions (run in a worker thread) ---------------------------------------
    def reserve_now(self, ticket: Ticket, predicted_joules: float, tokens: int) -> limits.Refusal | None:
        """Check every limit and budget of the ticket's quota and, when all pass, count and reserve. Atomic."""
        grams_per_joule = self._grams_per_joule()
        now_s = time.time()
        with self.store.write() as conn:
            if now_s - self._pruned_s > 1.0:
                limits.prune(conn, now_s)
                self._pruned_s = now_s
            reservations = {}
            for s in ticket.quota.subjects:
                refusal = limits.check(conn, s, now_s, tokens)
                if refusal is not None:
                    return refusal
                avg = budgets.cost_estimate(conn, s) if s.budgets else (0.0, 0.0)
                if avg is None:  # nothing measured yet: one request per replica until the first is
                    if conn.execute("SELECT 1 FROM inflight WHERE subject = ? AND holder = ? AND expires_unix_s > ? "
                                    "LIMIT 1", (s.name, self.holder, now_s)).fetchone():
                        return FIRST_MEASUREMENT_PENDING
                    avg = (0.0, 0.0)
                avg_joules, avg_gco2e = avg
                joules = max(predicted_joules, avg_joules)
                gco2e = max(predicted_joules * grams_per_joule, avg_gco2e)
                for b in s.budgets:
                    use = budgets.use(conn, s, b, now_s)
                    need = joules if b.quantity == "energy_joules" else gco2e
                    if use.used + need > b.amount:
                        unit = "J" if b.quantity == "energy_joules" else "gCO2e"
                        spent_out = use.spent + need > b.amount
                        wait_s = max(1, int(use.reset_unix_s - now_s + 1)) if spent_out else 1
                        return limits.Refusal(
                            f"{use.describe()}; this request needs about {need:.3g} {unit} more"
                            + ("" if spent_out else ", which requests still running hold"),
                            wait_s, code="budget_exceeded")
                reservations[s.name] = (joules, gco2e)
            for s in ticket.quota.subjects:
                window_id = limits.count(conn, s, now_s, tokens)
                if window_id is not None:
                    ticket.window_ids[s.name] = window_id
                joules, gco2e = reservations[s.name]
                conn.execute(
                    "INSERT INTO inflight (ticket, subject, holder, request_id, admitted_unix_s, expires_unix_s, "
                    "window_id, reserved_joules, reserved_gco2e) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (ticket.ticket_id, s.name, self.holder, ticket.request_id, now_s,
                     now_s + self.reservation_ttl_seconds, window_id, joules, gco2e))
        ticket.reserved = True
        return None

    def settle_now(self, ticket: Ticket, joules: float | None, gco2e: float | None, tokens: int) -> None:
        """None: not known (the request failed before its energy was); it spends nothing and teaches no estimate."""
        now_s = time.time()
        with self.store.write() as conn:
            conn.execute("DELETE FROM inflight WHERE ticket = ?", (ticket.ticket_id,))
            for window_id in ticket.window_ids.values():
                limits.settle_tokens(conn, window_id, tokens)
            for s in ticket.quota.subjects:
                budgets.add_spend(conn, s.name, joules or 0.0, gco2e or 0.0, now_s, measured=joules is not None)
        ticket.reserved = False
        for s in ticket.quota.subjects:  # this replica's next soft decision sees its own spend at once
            self._state.pop(s.name, None)

    def release_now(self, ticket: Ticket) -> None:
        try:
            with self.store.write() as conn:
                conn.execute("DELETE FROM inflight WHERE ticket = ?", (ticket.ticket_id,))
        except Exception as exc:  # the reservation then expires by itself
            log.warning("could not release the reservation of %s: %s", ticket.request_id, exc)

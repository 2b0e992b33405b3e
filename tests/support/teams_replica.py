"""One gateway replica's teams admission, as its own process, for tests of what replicas share.

python -m tests.support.teams_replica STATE_DIR HOLDER BUDGET_JOULES COST_JOULES PREDICTED_JOULES CONCURRENCY
prints "ready" and waits for the file STATE_DIR/go (so that replicas started one after the other run at
once), then runs the real TeamGuard on the state directory's teams database: CONCURRENCY tasks send requests of
one key (each "runs" 50 ms and costs COST_JOULES, routing predicted PREDICTED_JOULES) until the key's
day budget answers that it is spent; prints {"accepted": n, "refused": m} as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from scheduler.api.errors import ApiError
from scheduler.config import BudgetConfig, RateLimitsConfig
from scheduler.teams.guard import TeamGuard
from scheduler.teams.quotas import Quota, Subject
from scheduler.teams.store import TeamsStore


def budget_quota(budget_joules: float) -> Quota:
    return Quota((Subject("key:shared", "key 'shared'", RateLimitsConfig(),
                          (BudgetConfig(energy_joules=budget_joules, period="day"),)),))


def routed(predicted_joules: float) -> SimpleNamespace:
    chosen = SimpleNamespace(predicted_energy_joules=predicted_joules)
    return SimpleNamespace(decision=SimpleNamespace(chosen=chosen, prompt_tokens=10, output_tokens=20))


async def replica(state_dir: str, holder: str, budget_joules: float, cost_joules: float, predicted_joules: float,
                  concurrency: int) -> dict[str, int]:
    guard = TeamGuard(TeamsStore(state_dir), holder=holder)
    quota = budget_quota(budget_joules)
    counts = {"accepted": 0, "refused": 0}
    spent_out = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not spent_out.is_set():
            i += 1
            job = SimpleNamespace(request_id=f"{holder}-{n}-{i}", quota=quota, admission=None)
            try:
                await guard.admit(job, lambda _: routed(predicted_joules))
            except ApiError as exc:
                counts["refused"] += 1
                # held by requests still running: 1 s (they end within milliseconds); spent: the seconds to the
                # day's end, which in the day's last minute are few (a cut at 60 s kept those clients retrying
                # until midnight reset the budget, and they spent the next day's too)
                if int(exc.headers["Retry-After"]) > 1:
                    spent_out.set()
                else:
                    await asyncio.sleep(0.01)
                continue
            counts["accepted"] += 1
            await asyncio.sleep(0.05)
            await job.admission.settle(cost_joules, cost_joules * 1e-4, 30)

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    return counts


if __name__ == "__main__":
    state, holder, budget, cost, predicted, concurrency = sys.argv[1:7]
    print("ready", flush=True)
    go = Path(state) / "go"
    while not go.exists():
        time.sleep(0.005)
    print(json.dumps(asyncio.run(replica(state, holder, float(budget), float(cost), float(predicted), int(concurrency)))))

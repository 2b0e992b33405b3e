"""Measure what teams admission costs a request: the reserve and settle transactions on teams.sqlite3.

    python -m benchmarks.teams_admission   # writes docs/results/teams-admission.md and .json

The real TeamGuard on a real SQLite file in a temporary state directory; routing is a stand-in (a
decision with a predicted energy), so the figures are admission's own. For each case, REQUESTS requests
are admitted and settled one after another (latency per request: admit + settle), then with
CONCURRENCY at once in each of two processes on the same file (the shared-store contention of two
gateway replicas; throughput). Callers without limits or budgets skip the file entirely.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from scheduler.config import BudgetConfig, RateLimitsConfig
from scheduler.teams.guard import TeamGuard
from scheduler.teams.quotas import Quota, Subject
from scheduler.teams.store import TeamsStore

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"

CASES = {
    "no limits (quota None)": None,
    "key: requests and tokens per minute, concurrency": Quota((
        Subject("key:bench", "key 'bench'", RateLimitsConfig(requests_per_minute=10**9, tokens_per_minute=10**12,
                                                              concurrent_requests=10**6), ()),)),
    "key limits + team limits + team energy and carbon budgets": Quota((
        Subject("key:bench", "key 'bench'", RateLimitsConfig(requests_per_minute=10**9, concurrent_requests=10**6), ()),
        Subject("team:bench", "team 'bench'", RateLimitsConfig(requests_per_minute=10**9),
                (BudgetConfig(energy_joules=1e15), BudgetConfig(gco2e=1e12, period="month"))))),
}


def _routed(_: object) -> SimpleNamespace:
    chosen = SimpleNamespace(predicted_energy_joules=50.0)
    return SimpleNamespace(decision=SimpleNamespace(chosen=chosen, prompt_tokens=100, output_tokens=200))


async def _one(guard: TeamGuard, quota: Quota | None, i: int) -> float:
    job = SimpleNamespace(request_id=f"r{i}", quota=quota, admission=None)
    t0 = time.perf_counter()
    await guard.admit(job, _routed)
    if job.admission is not None:
        await job.admission.settle(50.0, 0.005, 300)
    return time.perf_counter() - t0


async def sequential(state: Path, quota: Quota | None, n: int) -> list[float]:
    guard = TeamGuard(TeamsStore(state))
    return [await _one(guard, quota, i) for i in range(n)]


async def concurrent(state: Path, quota: Quota | None, n: int, concurrency: int) -> float:
    guard = TeamGuard(TeamsStore(state), holder=f"bench-{os.getpid()}")
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int) -> None:
        async with sem:
            await _one(guard, quota, i)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--worker", nargs=2, metavar=("STATE", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # one of the two "gateway replicas" of the concurrent run
        state, case = args.worker
        print(asyncio.run(concurrent(Path(state), CASES[case], args.requests, args.concurrency)))
        return
    rows = []
    for name, quota in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            lat = sorted(asyncio.run(sequential(Path(tmp), quota, args.requests)))
        with tempfile.TemporaryDirectory() as tmp:
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.teams_admission", "--requests", str(args.requests),
                                       "--concurrency", str(args.concurrency), "--worker", tmp, name],
                                      cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
            walls = [float(p.communicate()[0]) for p in procs]
        rows.append({"case": name, "p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[int(0.99 * len(lat))] * 1e3,
                     "two_replicas_requests_per_s": 2 * args.requests / max(walls)})
    meta = {"requests": args.requests, "concurrency_per_replica": args.concurrency, "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
            "command": "python -m benchmarks.teams_admission"}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "teams-admission.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Teams admission: what limits and budgets cost a request", "",
             f"`{meta['command']}` on {meta['cpus']} CPUs ({meta['machine']}, Python {meta['python']}), {meta['date']}.",
             "The real TeamGuard on a real teams.sqlite3 (WAL); routing is a stand-in, so these are admission's own",
             "figures: admit (a read of the budgets, at most every 0.5 s, and one write transaction) plus settle (one",
             f"write transaction), {args.requests} requests one after another; then {args.requests} requests in each of",
             f"two processes on the same file, {args.concurrency} at once in each (two gateway replicas).", "",
             "| case | p50 per request (ms) | p99 (ms) | two replicas together (requests/s) |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['two_replicas_requests_per_s']:.0f} |" for r in rows]
    lines += ["", "Shared machine (other jobs ran beside it): read the figures as orders of magnitude.", ""]
    (OUT / "teams-admission.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

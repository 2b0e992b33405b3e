"""Benchmark: CPU cost of energy attribution per request, under a synthetic serving load.

A discrete-event load in virtual time (no sleeping): requests arrive on several devices, each runs a
prefill then decodes at 20-60 tok/s, its replica reports cumulative progress every 100 ms (some
reports delivered up to 150 ms late), each device's meter emits an interval every 100 ms, and each
request is finished once the meter covers its end. Only the Attributor calls are timed.

    python -m benchmarks.attribution_cost --requests 10000
writes docs/results/attribution-cost.json and .md.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from scheduler.energy.attribution import Attributor

REPO = Path(__file__).resolve().parents[1]


def run_scenario(*, requests: int, devices: int, concurrency: int, seed: int, meter_interval_s: float = 0.1) -> dict:
    rng = random.Random(seed)
    att = Attributor(prefill_token_weight=0.25, idle_amortization_seconds=60.0, settle_delay_seconds=0.5)
    timing_ns = {"start": 0, "progress": 0, "on_interval": 0, "finish": 0}
    calls = {k: 0 for k in timing_ns}
    # thread CPU time, not wall time: on a shared machine preemption would otherwise count as cost
    clock = time.thread_time_ns

    # (time, seq, kind, payload); seq keeps ordering stable
    events: list[tuple[float, int, str, tuple]] = []
    seq = 0

    def push(t: float, kind: str, payload: tuple) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    # arrival rate per device keeps about `concurrency` requests running (Little's law)
    mean_duration_s = 0.2 + 210 / 40.0
    rate_per_device = concurrency / mean_duration_s
    dev_ids = [f"gpu{i}" for i in range(devices)]
    t = 0.0
    for i in range(requests):
        t += rng.expovariate(rate_per_device * devices)
        push(t, "arrive", (f"req-{i}", dev_ids[i % devices]))
    horizon = t + 40.0
    for d in dev_ids:
        push(meter_interval_s, "tick", (d, 0.0))

    active_per_device = {d: 0 for d in dev_ids}
    waiting_finish: dict[str, list[tuple[float, str, int, int]]] = {d: [] for d in dev_ids}
    finished = 0
    joules_total_requests = 0.0
    peak_items = 0
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    while events and finished < requests:
        now, _, kind, p = heapq.heappop(events)
        if kind == "arrive":
            rid, dev = p
            t0 = clock()
            att.start(rid, dev, now)
            timing_ns["start"] += clock() - t0
            calls["start"] += 1
            active_per_device[dev] += 1
            prompt = rng.randint(20, 2000)
            decode = rng.randint(20, 400)
            prefill_s = 0.02 + prompt / 8000.0
            tok_rate = rng.uniform(20, 60)
            end = now + prefill_s + decode / tok_rate
            k = 1
            while now + 0.1 * k < end:
                tr = now + 0.1 * k
                done_decode = int(max(0.0, tr - now - prefill_s) * tok_rate)
                done_prefill = prompt if tr >= now + prefill_s else 0
                late = rng.uniform(0, 0.15) if rng.random() < 0.3 else 0.0
                push(tr + late, "progress", (rid, done_prefill, done_decode, tr))
                k += 1
            push(end, "end", (rid, dev, prompt, decode))
        elif kind == "progress":
            rid, pf, dc, tr = p
            t0 = clock()
            att.progress(rid, pf, dc, tr)
            timing_ns["progress"] += clock() - t0
            calls["progress"] += 1
        elif kind == "end":
            rid, dev, prompt, decode = p
            waiting_finish[dev].append((now, rid, prompt, decode))
        elif kind == "tick":
            dev, last = p
            n = active_per_device[dev]
            joules = (60.0 + 25.0 * min(n, 16)) * (now - last)  # idle floor + load-dependent draw
            t0 = clock()
            att.on_interval(dev, last, now, joules)
            timing_ns["on_interval"] += clock() - t0
            calls["on_interval"] += 1
            still = []
            for end_t, rid, prompt, decode in waiting_finish[dev]:
                if end_t <= now:
                    t0 = clock()
                    e = att.finish(rid, end_t, prefill_tokens_done=prompt, decode_tokens_done=decode)
                    timing_ns["finish"] += clock() - t0
                    calls["finish"] += 1
                    joules_total_requests += e.joules
                    active_per_device[dev] -= 1
                    finished += 1
                else:
                    still.append((end_t, rid, prompt, decode))
            waiting_finish[dev] = still
            if calls["on_interval"] % 200 == 0:
                peak_items = max(peak_items, att.memory_items())
            if now < horizon:
                push(now + meter_interval_s, "tick", (dev, now))
    wall_s = time.perf_counter() - wall0
    cpu_s = time.process_time() - cpu0
    b = att.balance()
    total_attr_ns = sum(timing_ns.values())
    return {
        "requests": requests,
        "devices": devices,
        "target_concurrency_per_device": concurrency,
        "virtual_seconds": round(now, 1),
        "calls": calls,
        "mean_ns_per_call": {k: round(timing_ns[k] / calls[k]) if calls[k] else None for k in calls},
        "attribution_us_per_request": round(total_attr_ns / requests / 1000, 2),
        "attribution_cpu_share_of_one_core_at_this_load": round(total_attr_ns / 1e9 / now, 6),
        "progress_reports_per_request": round(calls["progress"] / requests, 1),
        "scenario_wall_seconds": round(wall_s, 2),
        "scenario_cpu_seconds": round(cpu_s, 2),
        "peak_retained_items": peak_items,
        "conservation_relative_error": abs(b.accounted_joules - b.metered_joules) / b.metered_joules,
        "metered_joules": round(b.metered_joules, 1),
        "requests_joules": round(joules_total_requests, 1),
        "idle_pool_joules": round(b.idle_pool_joules, 1),
    }


def _timer_cost_ns(n: int = 100_000) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        time.thread_time_ns()
    return round((time.perf_counter_ns() - t0) / n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "attribution-cost")
    args = ap.parse_args(argv)
    results = [run_scenario(requests=args.requests, devices=args.devices, concurrency=c, seed=args.seed) for c in args.concurrency]
    doc = {
        "benchmark": "attribution_cost",
        "command": "python -m benchmarks.attribution_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_1m_at_end": None},
        "note": "virtual-time synthetic load; only Attributor calls are timed (thread CPU time, time.thread_time_ns, around each call; the timer's own cost, timer_ns_per_call, is included, so figures are upper bounds)",
        "timer_ns_per_call": _timer_cost_ns(),
        "scenarios": results,
    }
    doc["host"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Attribution cost",
        "",
        f"Command: `{doc['command'].strip()}` (Python {doc['host']['python']}, {doc['host']['machine']}, "
        f"{doc['host']['cpus']} CPUs, 1-minute load average {doc['host']['load_average_1m_at_end']} at the end: the machine was shared).",
        "",
        "Synthetic serving load in virtual time: requests with 20-2000 prompt tokens and 20-400 output tokens at",
        "20-60 tok/s, cumulative progress reports every 100 ms (30% of them delivered up to 150 ms late), one",
        "meter interval per device every 100 ms, finish once the meter covers the end. Only Attributor calls",
        "are timed, in thread CPU time (so other load on the machine does not inflate them much; the timer's",
        f"own cost, about {doc['timer_ns_per_call']} ns per reading and two readings per call, is included).",
        "",
        "| concurrency / device | requests | reports / request | us / request | ns / start | ns / progress | ns / interval | ns / finish | CPU share at that load | conservation error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ns = r["mean_ns_per_call"]
        lines.append(
            f"| {r['target_concurrency_per_device']} | {r['requests']} | {r['progress_reports_per_request']} | {r['attribution_us_per_request']} "
            f"| {ns['start']} | {ns['progress']} | {ns['on_interval']} | {ns['finish']} "
            f"| {100 * r['attribution_cpu_share_of_one_core_at_this_load']:.3f}% | {r['conservation_relative_error']:.1e} |"
        )
    lines += [
        "",
        "us / request: all Attributor time (start, every progress report, the request's share of meter",
        "intervals, finish) divided by the number of requests. CPU share: that time over the virtual",
        "duration of the run, i.e. the fraction of one core attribution needs at this request rate.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: CPU cost of the DeviceMeter sampling this machine's real CPU device, as a percentage of one core.

    .venv/bin/python -m benchmarks.meter_overhead --seconds 30

Runs an idle baseline (the process sleeping, no meter) and then the meter at --hz for the same time,
and reports the sampling thread's own CPU time (time.thread_time() inside the thread) and the
process's CPU time above the baseline, both as % of one core, plus the tick timing. Target: < 1%.
Writes docs/results/meter-overhead.md and .json (paths configurable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from scheduler.devices.cpu import make_cpu_device
from scheduler.energy.meter import DeviceMeter, EnergyInterval

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_PERCENT_OF_ONE_CORE = 1.0


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(seconds: float, hz: float) -> dict:
    device = make_cpu_device(node=platform.node() or "local")

    cpu0, wall0 = _process_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    baseline_cpu_s, baseline_wall_s = _process_cpu_seconds() - cpu0, time.monotonic() - wall0

    intervals: list[EnergyInterval] = []
    meter = DeviceMeter([device], 1.0 / hz)
    meter.add_callback(intervals.append)  # a consumer as cheap as the attribution's append
    cpu0, wall0 = _process_cpu_seconds(), time.monotonic()
    meter.start()
    time.sleep(seconds)
    meter.stop()
    meter_cpu_s, meter_wall_s = _process_cpu_seconds() - cpu0, time.monotonic() - wall0

    durations_ms = [iv.duration_seconds * 1000 for iv in intervals]
    thread_percent = meter.thread_cpu_seconds / meter_wall_s * 100
    process_percent = max(meter_cpu_s / meter_wall_s - baseline_cpu_s / baseline_wall_s, 0.0) * 100
    return {
        "command": f".venv/bin/python -m benchmarks.meter_overhead --seconds {seconds:g} --hz {hz:g}",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_model": device.name,
            "logical_cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "device": {"device_id": device.device_id, "method": device.energy_method.value, "scope": device.energy_scope.value},
        "hz": hz,
        "seconds": seconds,
        "ticks": len(intervals),
        "expected_ticks": int(meter_wall_s * hz),
        "sampler_thread_cpu_seconds": meter.thread_cpu_seconds,
        "sampler_thread_percent_of_one_core": thread_percent,
        "cpu_microseconds_per_tick": meter.thread_cpu_seconds / max(len(intervals), 1) * 1e6,
        "process_cpu_seconds_with_meter": meter_cpu_s,
        "process_cpu_seconds_idle_baseline": baseline_cpu_s,
        "process_percent_of_one_core_above_baseline": process_percent,
        "interval_ms": {
            "mean": statistics.fmean(durations_ms) if durations_ms else None,
            "p50": _percentile(durations_ms, 0.5) if durations_ms else None,
            "p99": _percentile(durations_ms, 0.99) if durations_ms else None,
            "max": max(durations_ms) if durations_ms else None,
        },
        "metered_joules": sum(iv.energy_joules for iv in intervals),
        "target_percent_of_one_core": TARGET_PERCENT_OF_ONE_CORE,
        "meets_target": max(thread_percent, process_percent) < TARGET_PERCENT_OF_ONE_CORE,
    }


def to_markdown(r: dict) -> str:
    iv = r["interval_ms"]
    verdict = "meets" if r["meets_target"] else "MISSES"
    return f"""# Meter overhead

The DeviceMeter sampling this machine's CPU device ({r['device']['method']}, scope {r['device']['scope']})
at {r['hz']:g} Hz for {r['seconds']:g} s, against an idle baseline of the same length. It {verdict} the
target of < {r['target_percent_of_one_core']:g}% of one core.

Reproduce: `{r['command']}` ({r['date_utc']}; {r['machine']['cpu_model']}, {r['machine']['logical_cpus']} logical CPUs,
Python {r['machine']['python']}, 1-minute load average {r['machine']['load_average_1m_at_end']:.2f} at the end: the machine was shared).

| measure | value |
|---|---|
| sampling thread CPU (time.thread_time in the thread) | {r['sampler_thread_cpu_seconds'] * 1000:.1f} ms = **{r['sampler_thread_percent_of_one_core']:.3f}% of one core** |
| CPU per tick | {r['cpu_microseconds_per_tick']:.0f} µs |
| process CPU above the idle baseline (getrusage) | {r['process_percent_of_one_core_above_baseline']:.3f}% of one core ({r['process_cpu_seconds_with_meter'] * 1000:.1f} ms vs {r['process_cpu_seconds_idle_baseline'] * 1000:.1f} ms idle) |
| ticks | {r['ticks']} of {r['expected_ticks']} expected |
| interval length mean / p50 / p99 / max | {iv['mean']:.1f} / {iv['p50']:.1f} / {iv['p99']:.1f} / {iv['max']:.1f} ms |
| joules metered | {r['metered_joules']:.1f} J ({r['device']['method']}) |

The per-tick cost is one counter read (for cpu-estimate, one psutil.cpu_times() call, i.e. reading
/proc/stat) and the interval bookkeeping. An NVML counter read costs about the same order (one
ioctl); scripts/gpu/nvml_check.py measures it on a GPU machine.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--out-md", type=Path, default=REPO_ROOT / "docs" / "results" / "meter-overhead.md")
    parser.add_argument("--out-json", type=Path, default=REPO_ROOT / "docs" / "results" / "meter-overhead.json")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.hz)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    args.out_md.write_text(to_markdown(result))
    print(to_markdown(result))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

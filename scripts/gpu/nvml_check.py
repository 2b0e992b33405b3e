"""Check Wattlane's NVML path on a real NVIDIA machine: device mapping, readings, energy counter vs power.

    .venv/bin/python scripts/gpu/nvml_check.py [--seconds 5] [--idle-seconds 3] [--out results.json]

What it checks, for the first visible GPU (or --gpu gpuN):
1. Every NVML GPU with its UUID, and which ones Wattlane sees under the current CUDA_VISIBLE_DEVICES
   (device_id gpu<k>). With torch installed it also starts child processes with CUDA_VISIBLE_DEVICES
   set to one index, and to one UUID, as Ray does, and checks that CUDA's device 0 there has the UUID
   Wattlane's mapping predicts.
2. One snapshot of every reading (power, limits and constraints, clocks and the lockable range,
   throttle reasons, temperature, utilization) and how long the counter and power reads take.
3. Energy: during an idle phase and a load phase (a torch matmul loop when torch and CUDA are there,
   else idle again), the energy counter's delta against the integral of instant power sampled at
   --sample-hz, and the DeviceMeter's intervals (10 Hz) against the counter.
With --check-settings it also sets the power limit 10% below the default and restores it (needs root).

Exits 2 with a clear message where there is no usable NVIDIA GPU. Writes a JSON file of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from scheduler.devices.base import DeviceError  # noqa: E402
from scheduler.devices.nvml import (  # noqa: E402
    NvmlGpu,
    discover_nvml_gpus,
    map_visible_gpus,
    nvml_unavailable_reason,
)
from scheduler.energy.meter import DeviceMeter, EnergyInterval  # noqa: E402


def _try(fn):
    try:
        return fn()
    except DeviceError as exc:
        return f"unavailable: {exc}"


def list_nvml_gpus() -> list[dict]:
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            text = (lambda v: v.decode() if isinstance(v, bytes) else v)
            out.append({
                "nvml_index": i,
                "uuid": text(pynvml.nvmlDeviceGetUUID(h)),
                "name": text(pynvml.nvmlDeviceGetName(h)),
                "pci_bus_id": text(pynvml.nvmlDeviceGetPciInfo(h).busId),
            })
        return out
    finally:
        pynvml.nvmlShutdown()


_CHILD = (
    "import torch; p = torch.cuda.get_device_properties(0); "
    "print(str(getattr(p, 'uuid', '')))"
)


def check_mapping_with_cuda(all_gpus: list[dict]) -> list[dict]:
    """Child processes with one GPU visible (by index, then by UUID): CUDA's device 0 must be that GPU."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return [{"skipped": "torch is not installed; CUDA's own numbering was not checked"}]
    uuids = [g["uuid"] for g in all_gpus]
    results = []
    for g in all_gpus[:4]:
        for mask in (str(g["nvml_index"]), g["uuid"]):
            predicted = map_visible_gpus(mask, uuids)
            predicted_uuid = uuids[predicted[0][1]] if predicted else None
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=mask)
            proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
            cuda_uuid = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
            norm = (lambda u: u.lower().removeprefix("gpu-") if u else None)
            results.append({
                "CUDA_VISIBLE_DEVICES": mask,
                "wattlane_device_id": f"gpu{predicted[0][0]}" if predicted else None,
                "wattlane_uuid": predicted_uuid,
                "cuda_device0_uuid": cuda_uuid,
                "agree": cuda_uuid is not None and norm(cuda_uuid) == norm(predicted_uuid),
                "error": None if proc.returncode == 0 else proc.stderr.strip()[-500:],
            })
    return results


def read_latency_us(fn, n: int = 200) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def snapshot(gpu: NvmlGpu) -> dict:
    snap = _try(lambda: gpu.snapshot().__dict__)
    clocks = _try(lambda: gpu.clock_constraints())
    return {
        "snapshot": snap,
        "average_power_watts": _try(gpu.average_power_watts),
        "instant_power_field_supported": gpu._instant_power_supported,
        "clock_constraints": clocks if isinstance(clocks, str) else {
            "min_mhz": clocks.min_mhz, "max_mhz": clocks.max_mhz, "supported_count": len(clocks.supported_mhz),
        },
        "energy_read_us": read_latency_us(gpu.energy_joules),
        "power_read_us": read_latency_us(gpu.power_watts),
    }


class Sampler(threading.Thread):
    """Reads (time, instant power, counter) as fast as --sample-hz allows."""

    def __init__(self, gpu: NvmlGpu, hz: float):
        super().__init__(daemon=True)
        self.gpu, self.period, self.samples = gpu, 1.0 / hz, []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            t = time.monotonic()
            self.samples.append((t, self.gpu.power_watts(), self.gpu.energy_joules()))
            self.stop_event.wait(max(0.0, self.period - (time.monotonic() - t)))


def make_load(device_id: str):
    """A function that keeps the GPU busy until a deadline (torch matmuls), or None without torch/CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = int(device_id.removeprefix("gpu"))
    dev = torch.device(f"cuda:{index}")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)

    def load(until: float) -> int:
        n = 0
        while time.monotonic() < until:
            for _ in range(20):
                torch.matmul(a, b)
            torch.cuda.synchronize(dev)
            n += 20
        return n

    return load


def phase(gpu: NvmlGpu, seconds: float, hz: float, load=None) -> dict:
    sampler = Sampler(gpu, hz)
    meter = DeviceMeter([gpu], 0.1)
    intervals: list[EnergyInterval] = []
    meter.add_callback(intervals.append)
    sampler.start()
    time.sleep(0.2)
    meter.start()
    until = time.monotonic() + seconds
    matmuls = load(until) if load else (time.sleep(seconds) or 0)
    meter.stop()
    time.sleep(0.2)
    sampler.stop_event.set()
    sampler.join()
    s = sampler.samples
    t, p, e = [x[0] for x in s], [x[1] for x in s], [x[2] for x in s]
    counter_joules = e[-1] - e[0]
    integrated_joules = sum((t[i + 1] - t[i]) * (p[i + 1] + p[i]) / 2 for i in range(len(s) - 1))
    changes = [t[i] for i in range(1, len(e)) if e[i] != e[i - 1]]
    update_ms = [(b - a) * 1000 for a, b in zip(changes, changes[1:])]
    meter_joules = sum(iv.energy_joules for iv in intervals)
    return {
        "seconds": t[-1] - t[0],
        "samples": len(s),
        "matmuls_fp16_8192": matmuls,
        "mean_power_watts": statistics.fmean(p),
        "max_power_watts": max(p),
        "counter_delta_joules": counter_joules,
        "integrated_instant_power_joules": integrated_joules,
        "counter_vs_power_relative_difference": (counter_joules - integrated_joules) / integrated_joules if integrated_joules else None,
        "counter_update_period_ms_median": statistics.median(update_ms) if update_ms else None,
        "meter_intervals": len(intervals),
        "meter_joules": meter_joules,
        "meter_fallback_intervals": sum(iv.source != "counter" for iv in intervals),
        "meter_intervals_tile": all(b.t0_s == a.t1_s for a, b in zip(intervals, intervals[1:])),
    }


def check_settings(gpu: NvmlGpu) -> dict:
    """Set the power limit 10% below default and restore it; reports permission problems plainly."""
    c = gpu.power_limit_constraints()
    target = max(c.min_watts, round(c.default_watts * 0.9))
    before = gpu.power_limit_watts()
    try:
        gpu.set_power_limit_watts(target)
        applied = gpu.power_limit_watts()
    except DeviceError as exc:
        return {"power_limit_before_watts": before, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        try:
            gpu.set_power_limit_watts(before if before is not None else c.default_watts)
        except DeviceError:
            pass
    return {"power_limit_before_watts": before, "requested_watts": target, "applied_watts": applied,
            "restored_watts": gpu.power_limit_watts()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default=None, help="device id to test (default: the first visible GPU)")
    parser.add_argument("--seconds", type=float, default=5.0, help="load phase length")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--sample-hz", type=float, default=100.0)
    parser.add_argument("--check-settings", action="store_true", help="also set and restore the power limit (root)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default docs/results/nvml-check-<host>.json)")
    args = parser.parse_args(argv)

    reason = nvml_unavailable_reason()
    if reason is not None:
        print(f"nvml_check: no usable NVIDIA GPU on this machine ({reason}).\n"
              "Run this script on a machine with an NVIDIA GPU and driver; nothing was measured.", file=sys.stderr)
        return 2

    node = platform.node() or "local"
    all_gpus = list_nvml_gpus()
    visible = discover_nvml_gpus(node)
    if not visible:
        print(f"nvml_check: NVML works but no GPU is visible under CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}",
              file=sys.stderr)
        return 2
    gpu = next((g for g in visible if g.device_id == args.gpu), visible[0]) if args.gpu else visible[0]

    result = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": node,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER"),
        "nvml_gpus": all_gpus,
        "wattlane_visible": [{"device_id": g.device_id, "nvml_index": g.nvml_index, "uuid": g.uuid(), "name": g.name} for g in visible],
        "mapping_checked_with_cuda": check_mapping_with_cuda(all_gpus),
        "tested_device": gpu.device_id,
    }
    result["readings"] = snapshot(gpu)
    print(f"testing {gpu.device_id} = NVML {gpu.nvml_index} ({gpu.name}, {gpu.uuid()})", flush=True)
    result["idle"] = phase(gpu, args.idle_seconds, args.sample_hz)
    load = make_load(gpu.device_id)
    result["load_kind"] = "torch fp16 matmul 8192x8192" if load else "none (torch/CUDA not available): second idle phase"
    result["load"] = phase(gpu, args.seconds, args.sample_hz, load)
    if args.check_settings:
        result["settings"] = check_settings(gpu)
    for g in visible:
        g.close()

    diffs = [result[k]["counter_vs_power_relative_difference"] for k in ("idle", "load")]
    result["counter_and_power_agree_within_10_percent"] = all(d is not None and abs(d) < 0.10 for d in diffs)
    result["mapping_agrees"] = all(r.get("agree", True) for r in result["mapping_checked_with_cuda"])

    out = args.out or REPO_ROOT / "docs" / "results" / f"nvml-check-{node}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for key in ("idle", "load"):
        r = result[key]
        print(f"{key}: {r['mean_power_watts']:.1f} W mean, counter {r['counter_delta_joules']:.1f} J vs "
              f"integrated power {r['integrated_instant_power_joules']:.1f} J "
              f"({(r['counter_vs_power_relative_difference'] or 0) * 100:+.2f}%), counter updates every "
              f"{r['counter_update_period_ms_median']} ms, meter {r['meter_joules']:.1f} J in {r['meter_intervals']} intervals")
    print(f"mapping agrees with CUDA: {result['mapping_agrees']}; results in {out}")
    return 0 if result["counter_and_power_agree_within_10_percent"] and result["mapping_agrees"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

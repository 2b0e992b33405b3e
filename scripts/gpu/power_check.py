"""Check the power actuator on a real NVIDIA GPU: set and restore limits and locked clocks, measure energy per op.

    sudo .venv/bin/python scripts/gpu/power_check.py [--gpu gpu0] [--seconds 10] [--out power-check.json]

Needs root (or CAP_SYS_ADMIN): NVML refuses power-limit and clock changes otherwise, and the script
then exits 2 saying so. Needs torch with CUDA for the workloads. Steps:
1. Record the GPU's settings (power limit, constraints, supported clocks) and save them durably
   through Wattlane's PowerActuator (the same code the node agent runs).
2. For each setting (default; power limits at 80% and 60% of the default; SM clock locks at about
   85%, 70%, 55% and 40% of the max clock), run two real workloads for --seconds each and read the
   NVML energy counter around them:
   - "matmul": bf16 8192^3 matrix multiplications (compute-bound, like prefill): J per TFLOP;
   - "decode-proxy": a batch of 8 vectors through 32 layers of 8192x8192 bf16 weights (memory-bound,
     like one decode step of an ~2B-parameter model per "token"): J per token and ms per token.
3. Restore through the actuator, read the settings back and verify they equal the originals.
A restore also runs on Ctrl-C, SIGTERM and at exit; after a kill -9 the next run (or the node agent)
restores from <state-dir>/power/saved_settings.json.

Writes a JSON file with every figure (method "nvml-counter", scope "gpu").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from scheduler.devices.base import DeviceError  # noqa: E402
from scheduler.devices.nvml import discover_nvml_gpus, nvml_unavailable_reason  # noqa: E402
from scheduler.power.actuator import PowerActuator  # noqa: E402
from scheduler.power.exit_handlers import install_exit_handlers  # noqa: E402
from scheduler.power.audit import PowerAuditLog  # noqa: E402


def fail(msg: str, code: int = 2) -> None:
    print(f"power_check: {msg}", file=sys.stderr)
    raise SystemExit(code)


def snap_clock(supported: tuple[float, ...], target: float) -> float:
    return min(supported, key=lambda f: abs(f - target)) if supported else target


def make_workloads(torch):
    dev = torch.device("cuda:0")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    layers = [torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) * 0.01 for _ in range(32)]
    x0 = torch.randn(8192, 8, device=dev, dtype=torch.bfloat16)

    def matmul(n: int) -> float:
        for _ in range(n):
            torch.mm(a, b)
        return 2.0 * 8192**3 * n / 1e12  # TFLOP

    def decode(n: int) -> float:
        x = x0
        for _ in range(n):
            for w in layers:
                x = torch.mm(w, x)
        return float(n)  # tokens (one pass over the weights each)

    return {"matmul": (matmul, "TFLOP", 8), "decode-proxy": (decode, "token", 4)}


def measure(torch, gpu, fn, chunk: int, seconds: float) -> dict:
    fn(chunk)  # warm up at this setting
    torch.cuda.synchronize()
    e0, t0, work = gpu.energy_joules(), time.perf_counter(), 0.0
    clocks = []
    while time.perf_counter() - t0 < seconds:
        work += fn(chunk)
        torch.cuda.synchronize()
        clocks.append(gpu.sm_clock_mhz())
    elapsed = time.perf_counter() - t0
    time.sleep(0.25)  # the counter updates about every 100 ms: let it cover the end of the run
    joules = gpu.energy_joules() - e0
    return {
        "seconds": elapsed, "work": work, "joules": joules, "mean_power_watts": joules / elapsed,
        "joules_per_unit": joules / work if work else None, "seconds_per_unit": elapsed / work if work else None,
        "mean_sm_clock_mhz": sum(c for c in clocks if c) / max(len([c for c in clocks if c]), 1),
        "throttle_reasons_end": gpu.throttle_reasons(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="gpu0")
    ap.add_argument("--seconds", type=float, default=10.0, help="per workload and setting")
    ap.add_argument("--state-dir", default=str(Path.home() / ".local" / "state" / "wattlane-power-check"))
    ap.add_argument("--out", default="power-check.json")
    args = ap.parse_args()

    reason = nvml_unavailable_reason()
    if reason is not None:
        fail(f"no usable NVIDIA GPU: {reason}")
    gpus = {g.device_id: g for g in discover_nvml_gpus("local")}
    if args.gpu not in gpus:
        fail(f"{args.gpu} not found; visible: {', '.join(gpus) or 'none'}")
    gpu = gpus[args.gpu]
    try:
        import torch
    except ImportError:
        fail("torch is needed for the workloads: pip install torch")
    if not torch.cuda.is_available():
        fail("torch sees no CUDA device")

    audit = PowerAuditLog.in_state_dir(args.state_dir)
    act = PowerActuator({gpu.device_id: gpu}, args.state_dir, mode="enforce", audit=audit)
    if act.privileged is False:
        fail(f"not privileged: {act.privilege_error}")
    install_exit_handlers(act)

    limits = gpu.power_limit_constraints()
    clocks = gpu.clock_constraints()
    original = {"power_limit_watts": gpu.power_limit_watts(), "locked_clocks_mhz": gpu.locked_clocks_mhz()}
    report: dict = {
        "script": "scripts/gpu/power_check.py", "method": "nvml-counter", "scope": "gpu",
        "host": platform.node(), "gpu": gpu.name, "uuid": gpu.uuid(), "torch": torch.__version__,
        "constraints": {"power_limit_watts": [limits.min_watts, limits.max_watts, limits.default_watts],
                        "sm_clock_mhz": [clocks.min_mhz, clocks.max_mhz], "supported_clocks": len(clocks.supported_mhz)},
        "original": original, "restored_on_start": act.status()["restored_on_start"], "settings": [],
    }
    settings = [("default", None, None)]
    for frac in (0.8, 0.6):
        w = max(limits.min_watts, round(limits.default_watts * frac))
        settings.append((f"limit {w:.0f} W", w, None))
    for frac in (0.85, 0.7, 0.55, 0.4):
        f = snap_clock(clocks.supported_mhz, clocks.max_mhz * frac)
        settings.append((f"clock {f:.0f} MHz", None, f))

    workloads = make_workloads(torch)
    try:
        for label, watts, clock in settings:
            act.reset_locked_clocks(gpu.device_id, actor="power_check", reason="between settings")
            act.reset_power_limit(gpu.device_id, actor="power_check", reason="between settings")
            if watts is not None:
                act.set_power_limit(gpu.device_id, watts, actor="power_check", reason=label)
            if clock is not None:
                act.set_locked_clocks(gpu.device_id, clock, clock, actor="power_check", reason=label)
            row = {"setting": label, "power_limit_watts": gpu.power_limit_watts(), "locked_clocks_mhz": gpu.locked_clocks_mhz()}
            for name, (fn, unit, chunk) in workloads.items():
                row[name] = {"unit": unit, **measure(torch, gpu, fn, chunk, args.seconds)}
                m = row[name]
                print(f"{label:16s} {name:12s} {m['mean_power_watts']:6.1f} W  {m['joules_per_unit']:.3f} J/{unit}  "
                      f"{1000 * m['seconds_per_unit']:.2f} ms/{unit}  clock {m['mean_sm_clock_mhz']:.0f} MHz", flush=True)
            report["settings"].append(row)
    except DeviceError as exc:
        report["error"] = str(exc)
        print(f"power_check: a setting was refused: {exc}", file=sys.stderr)
    finally:
        restored = act.restore_all(reason="power_check finished")
        after = {"power_limit_watts": gpu.power_limit_watts(), "locked_clocks_mhz": gpu.locked_clocks_mhz()}
        ok = (abs((after["power_limit_watts"] or 0) - (original["power_limit_watts"] or 0)) < 0.5
              and after["locked_clocks_mhz"] == original["locked_clocks_mhz"] and not act.saved_path.exists())
        report["restore"] = {"actions": [a.to_dict() for a in restored], "after": after, "verified": ok}
        report["audit"] = audit.query(limit=1000)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"restored: {'verified' if ok else 'NOT VERIFIED'} ({after}); wrote {args.out}")
    return 0 if report["restore"]["verified"] and "error" not in report else 1


if __name__ == "__main__":
    raise SystemExit(main())

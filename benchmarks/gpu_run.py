"""One GPU measurement run: J/token, power and inter-token latency across batch sizes, power limits and locked clocks.

The orchestration here is the same for a real NVIDIA GPU and for a simulated one; only the device and
the workload differ:
- real: scheduler.devices.nvml.NvmlGpu and a Llama-3.1-8B-shaped model in PyTorch
  (scripts/gpu/gpu_run.py, the one command to run on a GPU machine);
- simulated: scheduler.devices.simulated.SimulatedGpu on a virtual clock and SimStepWorkload, which
  drives it with the simulator's own iteration model (scheduler.sim.physics). Its figures are the
  simulator's, labelled method "simulated", and say nothing about hardware; they exist so CI runs
  this code (settings sweep, refusal handling, restore check, JSON/Markdown) without a GPU, and so the
  fit from a run (python -m scheduler.sim.fit --gpu-run) can be tested against known constants.

Every setting is changed through Wattlane's PowerActuator (originals saved durably first). A setting
the driver or the device refuses is recorded with its error and the sweep goes on. At the end the
actuator restores the originals and the run reads them back and says whether they match.

Energy comes from the device's own counter. NVML updates it every few tens of ms, so a measurement
window starts and ends at a counter update seen between two units of work (a forward pass), and
counts the work done between them.

    python -m benchmarks.gpu_run --simulated h100-sxm [--out docs/results/gpu/simulated-h100-sxm]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scheduler.devices.base import Device, DeviceError
from scheduler.power.actuator import PowerActuator

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results" / "gpu"

DEFAULT_BATCH_SIZES = (1, 4, 16, 64, 256)
#: power limits as fractions of the default limit, SM clock locks as fractions of the max clock
DEFAULT_POWER_LIMIT_FRACTIONS = (0.85, 0.65, 0.45)
DEFAULT_CLOCK_FRACTIONS = (0.8, 0.6, 0.4)


class Workload(Protocol):
    """What the run needs from a model on the device; every call returns when the device has finished."""

    label: str
    method: str  # "nvml-counter" or "simulated"

    def describe(self) -> dict[str, Any]: ...

    def now(self) -> float:
        """Seconds on the clock the device's energy counter follows (wall clock, or the virtual one)."""

    def idle(self, seconds: float) -> None:
        """Let the device sit idle for this long."""

    def load(self) -> None:
        """Put the model on the device (weights, KV cache)."""

    def unload(self) -> None: ...

    def prepare(self, batch_size: int) -> None:
        """Fill the KV cache for batch_size sequences of the prompt length (untimed)."""

    def prefill(self, sequences: int) -> int:
        """One prefill forward of `sequences` prompts; returns the prompt tokens processed."""

    def decode_step(self, batch_size: int) -> int:
        """One decode iteration of the prepared batch; returns the tokens generated."""


@dataclass
class RunPlan:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    power_limit_fractions: tuple[float, ...] = DEFAULT_POWER_LIMIT_FRACTIONS
    clock_fractions: tuple[float, ...] = DEFAULT_CLOCK_FRACTIONS
    prompt_tokens: int = 512
    #: most prompt tokens in one prefill forward (vLLM's max_num_batched_tokens)
    max_prefill_tokens: int = 8192
    window_seconds: float = 1.5
    idle_seconds: float = 3.0
    #: stop starting new measurements after this long; what was skipped is recorded
    deadline_seconds: float = 420.0


@dataclass
class Setting:
    name: str
    kind: str  # default | power_limit | locked_clock
    value: float | None = None
    applied: bool = False
    refused: str | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    read_back: dict[str, Any] = field(default_factory=dict)


def _snap(supported: tuple[float, ...], target: float) -> float:
    return min(supported, key=lambda f: abs(f - target)) if supported else round(target)


def plan_settings(device: Device, plan: RunPlan) -> list[Setting]:
    """Default, then power limits, then clock locks; a control the device lacks becomes one refused setting."""
    settings = [Setting("default", "default")]
    if device.supports_power_limit():
        c = device.power_limit_constraints()
        for frac in plan.power_limit_fractions:
            w = float(max(c.min_watts, round(c.default_watts * frac)))
            settings.append(Setting(f"power limit {w:.0f} W", "power_limit", w))
    else:
        settings.append(Setting("power limit", "power_limit", None, refused=f"{device.device_id} has no settable power limit"))
    if device.supports_locked_clocks():
        c = device.clock_constraints()
        for frac in plan.clock_fractions:
            f = float(_snap(c.supported_mhz, c.max_mhz * frac))
            settings.append(Setting(f"SM clock {f:.0f} MHz", "locked_clock", f))
    else:
        settings.append(Setting("SM clock lock", "locked_clock", None, refused=f"{device.device_id} has no lockable clocks"))
    return settings


def _read_settings(device: Device) -> dict[str, Any]:
    def safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except DeviceError as exc:
            return f"unreadable: {exc}"

    lock = safe(device.locked_clocks_mhz)
    return {"power_limit_watts": safe(device.power_limit_watts), "locked_clocks_mhz": list(lock) if isinstance(lock, tuple) else lock}


class Runner:
    """Runs one plan on one device with one workload; see the module docstring."""

    def __init__(self, device: Device, actuator: PowerActuator, workload: Workload, plan: RunPlan,
                 log: Callable[[str], None] = print):
        self.device, self.actuator, self.workload, self.plan, self.log = device, actuator, workload, plan, log
        self.refusals: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self._t_start = 0.0

    # --- settings ----------------------------------------------------------------------------
    def _apply(self, setting: Setting) -> None:
        """Back to the originals, then this setting; a refusal is recorded on the setting, not raised."""
        dev, act = self.device.device_id, self.actuator
        try:
            if self.device.supports_locked_clocks():
                act.reset_locked_clocks(dev, actor="gpu_run", reason="between settings")
            if self.device.supports_power_limit():
                act.reset_power_limit(dev, actor="gpu_run", reason="between settings")
            action = None
            if setting.kind == "power_limit" and setting.value is not None:
                action = act.set_power_limit(dev, setting.value, actor="gpu_run", reason=setting.name)
            elif setting.kind == "locked_clock" and setting.value is not None:
                action = act.set_locked_clocks(dev, setting.value, setting.value, actor="gpu_run", reason=setting.name)
            if action is not None and action.outcome != "applied":
                raise DeviceError(f"the actuator did not apply it ({action.outcome}): {act.status()['message']}")
            setting.applied = True
        except DeviceError as exc:
            setting.refused = str(exc)
        setting.read_back = _read_settings(self.device)
        if setting.refused:
            self.refusals.append({"setting": setting.name, "error": setting.refused})
            self.log(f"  {setting.name}: refused ({setting.refused}); going on")

    def _lock_for_idle(self, which: str) -> str | None:
        """Lock the SM clock at its max or min for an idle reading; returns the refusal, if any."""
        if which == "none":
            return None
        try:
            c = self.device.clock_constraints()
            f = c.max_mhz if which == "max" else c.min_mhz
            action = self.actuator.set_locked_clocks(self.device.device_id, f, f, actor="gpu_run", reason=f"idle at {which} clock")
            return None if action.outcome == "applied" else f"not applied ({action.outcome})"
        except DeviceError as exc:
            return str(exc)

    def _unlock(self) -> None:
        try:
            if self.device.supports_locked_clocks():
                self.actuator.reset_locked_clocks(self.device.device_id, actor="gpu_run", reason="after idle reading")
        except DeviceError as exc:
            self.refusals.append({"setting": "unlock after idle", "error": str(exc)})

    # --- measurements --------------------------------------------------------------------------
    def _window(self, unit: Callable[[], int]) -> dict[str, Any]:
        """Run `unit` (one forward) over counter updates; energy and work between two updates."""
        w, dev = self.workload, self.device
        before = dev.energy_joules()
        tokens = units = 0
        unit()  # warm up at this setting; also the first counter update lands in it
        e0 = dev.energy_joules()
        while e0 == before:  # align the start to a counter update
            unit()
            e0 = dev.energy_joules()
        t0 = w.now()
        clocks: list[float] = []
        while True:
            tokens += unit()
            units += 1
            clk = dev.sm_clock_mhz()
            if clk:
                clocks.append(clk)
            if w.now() - t0 >= self.plan.window_seconds:
                e_last = dev.energy_joules()
                if e_last != e0:
                    break
        # keep working until the counter moves once more, so its last reading covers the work counted
        e1 = dev.energy_joules()
        while e1 == e_last:
            tokens += unit()
            units += 1
            e1 = dev.energy_joules()
        t1 = w.now()
        seconds, joules = t1 - t0, e1 - e0
        return {
            "seconds": seconds, "joules": joules, "tokens": tokens, "forwards": units,
            "power_watts": joules / seconds if seconds > 0 else None,
            "joules_per_token": joules / tokens if tokens else None,
            "seconds_per_forward": seconds / units if units else None,
            "mean_sm_clock_mhz": sum(clocks) / len(clocks) if clocks else None,
            "throttle_reasons_end": dev.throttle_reasons(),
        }

    def _idle_reading(self, model_loaded: bool, lock: str) -> dict[str, Any]:
        refused = self._lock_for_idle(lock)
        row: dict[str, Any] = {"model_loaded": model_loaded, "clock": lock}
        if refused:
            row["refused"] = refused
            self.refusals.append({"setting": f"idle at {lock} clock", "error": refused})
        else:
            self.workload.idle(0.5)  # let the clock and power settle
            e0, t0 = self.device.energy_joules(), self.workload.now()
            self.workload.idle(self.plan.idle_seconds)
            e1, t1 = self.device.energy_joules(), self.workload.now()
            row.update(seconds=t1 - t0, joules=e1 - e0, power_watts=(e1 - e0) / (t1 - t0), sm_clock_mhz=self.device.sm_clock_mhz())
            self.log(f"  idle model={model_loaded} clock={lock}: {row['power_watts']:.1f} W")
        self._unlock()
        return row

    def _late(self) -> bool:
        return time.monotonic() - self._t_start > self.plan.deadline_seconds

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._t_start = time.monotonic()
        dev, plan, w = self.device, self.plan, self.workload
        original = _read_settings(dev)
        idle: list[dict[str, Any]] = []
        settings = plan_settings(dev, plan)
        for s in settings:
            if s.refused:
                self.refusals.append({"setting": s.name, "error": s.refused})
        try:
            for lock in ("none", "max", "min"):
                idle.append(self._idle_reading(False, lock))
            self.log("loading the model")
            w.load()
            for lock in ("none", "max", "min"):
                idle.append(self._idle_reading(True, lock))
            prefill_seqs = {b: max(1, min(b, plan.max_prefill_tokens // plan.prompt_tokens)) for b in plan.batch_sizes}
            for b in plan.batch_sizes:
                if self._late():
                    self.skipped.append(f"batch size {b}: past the {plan.deadline_seconds:.0f} s deadline")
                    continue
                w.prepare(b)
                for s in settings:
                    if s.refused and s.kind != "default":
                        continue
                    self._apply(s)
                    if s.refused:
                        continue
                    point: dict[str, Any] = {"batch_size": b}
                    point["decode"] = self._window(lambda b=b: w.decode_step(b))
                    # prefill forwards of the same shape are measured once per setting
                    earlier = next((p for p in s.points if prefill_seqs[p["batch_size"]] == prefill_seqs[b]), None)
                    if earlier is None:
                        n = prefill_seqs[b]
                        point["prefill"] = {"sequences": n, "prompt_tokens": plan.prompt_tokens,
                                            **self._window(lambda n=n: w.prefill(n))}
                    else:
                        point["prefill"] = {"same_as_batch_size": earlier["batch_size"]}
                    s.points.append(point)
                    d = point["decode"]
                    self.log(f"  B={b:<4d} {s.name:22s} decode {d['joules_per_token']:.4f} J/tok "
                             f"{1000 * d['seconds_per_forward']:.2f} ms/step {d['power_watts']:.0f} W")
            w.unload()
        finally:
            restored = self.actuator.restore_all(reason="gpu_run finished")
        after = _read_settings(dev)
        verified = _same_settings(original, after) and not self.actuator.saved_path.exists()
        return {
            "method": w.method,
            "workload": w.describe(),
            "device": device_facts(dev),
            "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()},
            "idle": idle,
            "settings": [{"name": s.name, "kind": s.kind, "value": s.value, "applied": s.applied, "refused": s.refused,
                          "read_back": s.read_back, "points": s.points} for s in settings],
            "refusals": self.refusals,
            "skipped": self.skipped,
            "restore": {"original": original, "after": after, "verified": verified,
                        # a crashed earlier run's settings, put back when this run's actuator started
                        "restored_on_start": self.actuator.status()["restored_on_start"],
                        "actions": [a.to_dict() for a in restored],
                        "note": "NVML has no getter for a clock lock: the lock read back is the one this process set"
                        if w.method == "nvml-counter" else None},
            "wall_seconds": time.monotonic() - self._t_start,
        }


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    pa, pb = a.get("power_limit_watts"), b.get("power_limit_watts")
    same_limit = (pa is None and pb is None) or (isinstance(pa, float) and isinstance(pb, float) and abs(pa - pb) < 0.5)
    return same_limit and a.get("locked_clocks_mhz") == b.get("locked_clocks_mhz")


def device_facts(dev: Device) -> dict[str, Any]:
    facts: dict[str, Any] = {"device_id": dev.device_id, "name": dev.name, "kind": dev.kind.value, "uuid": dev.uuid(),
                             "energy_method": dev.energy_method.value, "energy_scope": dev.energy_scope.value}
    if dev.supports_power_limit():
        c = dev.power_limit_constraints()
        facts["power_limit_watts"] = {"min": c.min_watts, "max": c.max_watts, "default": c.default_watts}
    if dev.supports_locked_clocks():
        c = dev.clock_constraints()
        facts["sm_clock_mhz"] = {"min": c.min_mhz, "max": c.max_mhz, "supported": len(c.supported_mhz)}
    facts["memory_clock_mhz"] = dev.memory_clock_mhz()
    return facts


# --- the simulated stand-in --------------------------------------------------------------------------
class VirtualClock:
    def __init__(self, start_s: float = 0.0):
        self.t = start_s

    def __call__(self) -> float:
        return self.t


class SimStepWorkload:
    """Drives a SimulatedGpu with the simulator's iteration model on a virtual clock (method "simulated")."""

    method = "simulated"

    def __init__(self, gpu, model_profile, clock: VirtualClock, prompt_tokens: int = 512, decode_context_extra: int = 64):
        self.gpu, self.model, self.clock = gpu, model_profile, clock
        self.prompt_tokens, self.extra = prompt_tokens, decode_context_extra
        self.label = f"simulated step model of {model_profile.key} (scheduler.sim.physics); not a measurement"

    def describe(self) -> dict[str, Any]:
        p = self.gpu.profile
        return {"label": self.label, "model_profile": self.model.key, "gpu_profile": p.key,
                "gpu_constants": {"voltage_floor_fraction": p.voltage_floor_fraction, "memory_clock_knee": p.memory_clock_knee,
                                  "memory_bound_sm_activity": p.memory_bound_sm_activity},
                "prompt_tokens": self.prompt_tokens, "decode_context_mean_tokens": self.prompt_tokens + self.extra}

    def now(self) -> float:
        return self.clock.t

    def idle(self, seconds: float) -> None:
        self.gpu.set_idle(at_s=self.clock.t)
        self.clock.t += seconds

    def load(self) -> None:
        self.gpu.attach_model(True)

    def unload(self) -> None:
        self.gpu.attach_model(False)

    def prepare(self, batch_size: int) -> None:
        pass

    def _run(self, work) -> None:
        from scheduler.sim.physics import operating_point

        op = operating_point(self.gpu.profile, self.model.fit, work, self.gpu.power_limit_watts(), self.gpu.max_clock_mhz_allowed())
        self.gpu.set_busy(power_watts=op.power_watts, clock_mhz=op.clock_mhz, capped=op.capped, at_s=self.clock.t)
        # stays busy until the next call (idle() or another forward), as a GPU between back-to-back kernels
        self.clock.t += op.seconds

    def prefill(self, sequences: int) -> int:
        from scheduler.sim.physics import iteration_work

        p = self.prompt_tokens
        self._run(iteration_work(self.model, decode_tokens=0, decode_context_tokens=0, prefill_tokens=sequences * p,
                                 prefill_attention_pairs=sequences * p * p / 2.0, prefill_sequences=sequences))
        return sequences * p

    def decode_step(self, batch_size: int) -> int:
        from scheduler.sim.physics import iteration_work

        self._run(iteration_work(self.model, decode_tokens=batch_size,
                                 decode_context_tokens=batch_size * (self.prompt_tokens + self.extra)))
        return batch_size


def simulated_run(gpu_profile, *, plan: RunPlan | None = None, model: str = "llama-3.1-8b", device=None,
                  state_dir: Path | None = None, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """A whole run against a SimulatedGpu of this profile (a key or a GpuProfile); returns the run document."""
    from scheduler.devices.simulated import SimulatedGpu
    from scheduler.sim.profiles import model_profile

    plan = plan or RunPlan()
    clock = VirtualClock(1000.0)
    gpu = device or SimulatedGpu("gpu0", gpu_profile, node="sim", clock=clock)
    workload = SimStepWorkload(gpu, model_profile(model, gpu.profile.key), clock, plan.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="wattlane-gpu-run-") as scratch:  # a simulated GPU keeps nothing
        actuator = PowerActuator({gpu.device_id: gpu}, state_dir or Path(scratch), mode="enforce", clock=clock)
        doc = Runner(gpu, actuator, workload, plan, log=log).run()
    doc["device"]["profile"] = gpu.profile.key
    doc["software"] = {"python": platform.python_version()}
    return doc


# --- results -------------------------------------------------------------------------------------------
def write_results(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    md.write_text(render_md(doc), encoding="utf-8")
    return js, md


def _f(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, int | float) else "-"


def render_md(doc: dict[str, Any]) -> str:
    d, w = doc["device"], doc["workload"]
    simulated = doc["method"] == "simulated"
    lines = [
        f"# GPU run on {d['name']} (method: {doc['method']})",
        "",
        f"Command: `{doc.get('command', '')}`",
        "",
        ("**Simulated**: these figures come from the simulator's physics driving a simulated GPU; they test the run's "
         "code and the fit, and say nothing about hardware." if simulated else
         "Energy from the NVML total-energy counter (scope: the GPU board). Workload: "
         f"{w['label']}. Weights are random: time and energy per token depend on the tensor shapes, not on the values."),
        "",
        f"Device: {d['name']} ({d.get('uuid')}); " + ", ".join(f"{k} {v}" for k, v in doc.get("software", {}).items()),
        f"Restore: settings as found {doc['restore']['original']}, after the run {doc['restore']['after']}: "
        f"**{'verified' if doc['restore']['verified'] else 'NOT VERIFIED'}**. Run time {doc['wall_seconds']:.0f} s.",
        "",
        "## Idle power",
        "",
        "| model loaded | SM clock | power (W) |",
        "|---|---|---|",
    ]
    for r in doc["idle"]:
        lines.append(f"| {'yes' if r['model_loaded'] else 'no'} | {r['clock']} | {_f(r.get('power_watts'), '.1f') if 'refused' not in r else 'refused'} |")
    lines += ["", "## Per setting and batch size", "",
              "| setting | batch | decode J/token | ITL (ms) | decode power (W) | decode clock (MHz) | prefill J/token | prefill power (W) |",
              "|---|---|---|---|---|---|---|---|"]
    for s in doc["settings"]:
        if s["refused"]:
            lines.append(f"| {s['name']} | - | refused: {s['refused']} | | | | | |")
            continue
        for p in s["points"]:
            dd, pf = p["decode"], p["prefill"]
            if "same_as_batch_size" in pf:
                pf = next(q["prefill"] for q in s["points"] if q["batch_size"] == pf["same_as_batch_size"])
            lines.append(
                f"| {s['name']} | {p['batch_size']} | {_f(dd['joules_per_token'], '.4f')} | {_f(1000 * dd['seconds_per_forward'], '.2f')} | "
                f"{_f(dd['power_watts'], '.0f')} | {_f(dd['mean_sm_clock_mhz'], '.0f')} | {_f(pf.get('joules_per_token'), '.5f')} | "
                f"{_f(pf.get('power_watts'), '.0f')} |")
    if doc["refusals"]:
        lines += ["", "## Refused", ""] + [f"- {r['setting']}: {r['error']}" for r in doc["refusals"]]
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {x}" for x in doc["skipped"]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.splitlines()[0])
    ap.add_argument("--simulated", required=True, metavar="GPU_PROFILE", help="run against a simulated GPU of this profile (e.g. h100-sxm)")
    ap.add_argument("--out", type=Path, default=None, help="output path without suffix (default docs/results/gpu/simulated-<profile>)")
    args = ap.parse_args(argv)
    doc = simulated_run(args.simulated, log=print)
    doc["command"] = "python -m benchmarks.gpu_run " + " ".join(argv if argv is not None else sys.argv[1:])
    js, md = write_results(doc, args.out or RESULTS / f"simulated-{args.simulated}")
    print(f"wrote {js} and {md}")
    return 0 if doc["restore"]["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Fit a GPU's clock and power-cap constants to one GPU run (scripts/gpu/gpu_run.py) and write its GPU profile.

Run: python -m scheduler.sim.fit --gpu-run docs/results/gpu/<device>.json [--gpu-key h200] [--gpu-out PATH]

What is fitted, by least squares on log-ratios of measured to predicted time per forward and power,
for decode and prefill at every batch size and every applied setting (default, power limits,
locked clocks), through the same physics the simulator runs (scheduler.sim.physics):
- the GPU's modelling constants: voltage_floor_fraction (v0), memory_clock_knee (k) and
  memory_bound_sm_activity (kappa);
- the workload's own ModelFit terms (efficiencies, overheads, dynamic and memory power), which the
  constants cannot be separated from; they are reported, not written (models.json keeps its fit to
  the ML.ENERGY table, which measured a serving engine, not this eager-PyTorch workload).
The idle terms are read straight from the run's idle readings (no model; model at max and at min
clock), the power-limit range and the clock range from the device itself; bandwidth, peak
throughput and memory size come from the base profile (data-sheet facts).

The profile written says constants_provenance "fitted: <run file> on <device> (<method>)", so a
run on the simulated GPU can never pass for a hardware fit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.sim.physics import iteration_work, operating_points_array
from scheduler.sim.profiles import GPUS_PATH, GpuProfile, ModelFit, ModelProfile, ProfileError, gpu_profiles, model_profile

GPU_PARAMS = ["voltage_floor_fraction", "memory_clock_knee", "memory_bound_sm_activity"]
MODEL_PARAMS = ["memory_efficiency", "compute_efficiency", "fixed_seconds", "per_token_seconds", "dynamic_watts", "memory_watts"]
LOWER = np.array([0.30, 0.005, 0.0, 0.20, 0.05, 0.0, 0.0, 0.0, 0.0])
UPPER = np.array([0.95, 0.50, 1.0, 1.00, 0.95, 0.060, 5e-4, 2000.0, 800.0])
START = np.array([0.60, 0.05, 0.30, 0.80, 0.40, 0.002, 1e-5, 400.0, 200.0])
#: log-spaced knee starts: the knee only shows at the lowest clocks, so one start can miss it
KNEE_STARTS = (0.02, 0.08, 0.25)
#: the workload of scripts/gpu/gpu_run.py and benchmarks.gpu_run.SimStepWorkload
WORKLOAD_MODEL = "llama-3.1-8b"


class GpuRunError(ValueError):
    """The run file is missing, malformed, or lacks what the fit needs."""


def load_run(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GpuRunError(f"{path}: not found; produce it with scripts/gpu/gpu_run.py (or python -m benchmarks.gpu_run --simulated KEY)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise GpuRunError(f"{path}: does not parse ({exc})") from None
    for key in ("device", "workload", "idle", "settings", "method"):
        if key not in doc:
            raise GpuRunError(f"{path}: missing '{key}'; is this a gpu_run result?")
    return doc


def _observations(doc: dict[str, Any], base: GpuProfile) -> list[dict[str, Any]]:
    """One entry per measured window: the setting, the shape of the forward, and what was measured."""
    prompt = float(doc["workload"]["prompt_tokens"])
    context = float(doc["workload"].get("decode_context_mean_tokens", prompt))
    default_limit = (doc["device"].get("power_limit_watts") or {}).get("default", base.power_limit_default_watts)
    obs = []
    for s in doc["settings"]:
        if not s.get("applied"):
            continue
        limit = s["value"] if s["kind"] == "power_limit" else default_limit
        clock = s["value"] if s["kind"] == "locked_clock" else None
        for p in s["points"]:
            b = int(p["batch_size"])
            d = p["decode"]
            if d.get("seconds_per_forward") and d.get("power_watts"):
                obs.append({"setting": s["name"], "phase": "decode", "batch_size": b, "limit": limit, "clock": clock,
                            "sequences": b, "context": context, "seconds": d["seconds_per_forward"], "watts": d["power_watts"]})
            pf = p.get("prefill", {})
            if pf.get("seconds_per_forward") and pf.get("power_watts"):
                n = int(pf["sequences"])
                obs.append({"setting": s["name"], "phase": "prefill", "batch_size": n, "limit": limit, "clock": clock,
                            "sequences": n, "prompt": float(pf["prompt_tokens"]), "seconds": pf["seconds_per_forward"],
                            "watts": pf["power_watts"]})
    if len(obs) < len(GPU_PARAMS) + len(MODEL_PARAMS):
        raise GpuRunError(f"only {len(obs)} measured windows; the fit needs at least {len(GPU_PARAMS) + len(MODEL_PARAMS)}")
    if not any(o["clock"] for o in obs):
        raise GpuRunError("no locked-clock setting was measured; the clock constants cannot be fitted without one")
    return obs


def _idle_terms(doc: dict[str, Any]) -> dict[str, float]:
    got = {(r["model_loaded"], r["clock"]): r["power_watts"] for r in doc["idle"] if r.get("power_watts") is not None}
    loaded_max = got.get((True, "max"), got.get((True, "none")))
    if (False, "none") not in got or loaded_max is None or (True, "min") not in got:
        raise GpuRunError("the run lacks the idle readings (no model; model at max and at min clock) the idle terms need")
    return {"idle_no_model_watts": float(got[(False, "none")]), "idle_loaded_watts": float(loaded_max),
            "idle_loaded_min_clock_watts": float(got[(True, "min")])}


def _device_terms(doc: dict[str, Any], base: GpuProfile) -> dict[str, Any]:
    d = doc["device"]
    out: dict[str, Any] = {"name": d["name"]}
    if d.get("power_limit_watts"):
        pl = d["power_limit_watts"]
        out.update(power_limit_min_watts=pl["min"], power_limit_max_watts=pl["max"], power_limit_default_watts=pl["default"])
    else:
        out["power_limit_settable"] = False
    if d.get("sm_clock_mhz"):
        out.update(sm_clock_min_mhz=d["sm_clock_mhz"]["min"], sm_clock_max_mhz=d["sm_clock_mhz"]["max"])
    if d.get("memory_clock_mhz"):
        out["memory_clock_mhz"] = d["memory_clock_mhz"]
    return out


class GpuRunFit:
    """Predictions of a run's windows for a parameter vector x = GPU_PARAMS + MODEL_PARAMS."""

    def __init__(self, obs: list[dict[str, Any]], gpu: GpuProfile, model: ModelProfile):
        self.obs, self.gpu, self.model = obs, gpu, model
        self.seconds = np.array([o["seconds"] for o in obs])
        self.watts = np.array([o["watts"] for o in obs])
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(obs):
            groups.setdefault((o["limit"], o["clock"]), []).append(i)
        self.groups = []
        for (limit, clock), idx in groups.items():
            works = []
            for i in idx:
                o = obs[i]
                if o["phase"] == "decode":
                    works.append(iteration_work(model, decode_tokens=o["sequences"], decode_context_tokens=o["sequences"] * o["context"]))
                else:
                    n, p = o["sequences"], o["prompt"]
                    works.append(iteration_work(model, decode_tokens=0, decode_context_tokens=0, prefill_tokens=int(n * p),
                                                prefill_attention_pairs=n * p * p / 2.0, prefill_sequences=n))
            self.groups.append((limit, clock, np.array(idx), np.array([w.flops for w in works]),
                                np.array([w.bytes for w in works]), np.array([float(w.sequences) for w in works])))

    def profiles(self, x: np.ndarray) -> tuple[GpuProfile, ModelFit]:
        gpu = replace(self.gpu, **dict(zip(GPU_PARAMS, map(float, x[:3]))))
        fit = replace(self.model.fit, **dict(zip(MODEL_PARAMS, map(float, x[3:]))))
        return gpu, fit

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gpu, fit = self.profiles(x)
        sec, watts = np.empty(len(self.obs)), np.empty(len(self.obs))
        for limit, clock, idx, flops, nbytes, seqs in self.groups:
            _, s, j = operating_points_array(gpu, fit, flops, nbytes, seqs, limit, clock)
            sec[idx], watts[idx] = s, j / s
        return sec, watts

    def residuals(self, x: np.ndarray) -> np.ndarray:
        s, w = self.predict(x)
        return np.concatenate([np.log(s / self.seconds), np.log(w / self.watts)])


def fit_gpu_run(doc: dict[str, Any], base: GpuProfile, source: str, key: str | None = None) -> tuple[GpuProfile, dict[str, Any]]:
    """The fitted GPU profile (under `key`, default base.key) and a report (fitted values, per-window
    [measured, predicted], errors)."""
    from scipy.optimize import least_squares

    gpu = replace(base, **_device_terms(doc, base), **_idle_terms(doc))
    model = model_profile(WORKLOAD_MODEL, base.key)
    problem = GpuRunFit(_observations(doc, gpu), gpu, model)
    best = None
    for knee in KNEE_STARTS:
        start = START.copy()
        start[1] = knee
        r = least_squares(problem.residuals, start, bounds=(LOWER, UPPER), x_scale=UPPER - LOWER, diff_step=1e-4, max_nfev=400)
        if best is None or r.cost < best.cost:
            best = r
    fitted_gpu, fitted_model = problem.profiles(best.x)
    errors = np.abs(problem.residuals(best.x))
    s, w = problem.predict(best.x)
    fitted_gpu = replace(fitted_gpu, key=key or base.key, constants_provenance=f"fitted: {source} on {doc['device']['name']} (method {doc['method']})")
    report = {
        "source": source, "device": doc["device"]["name"], "method": doc["method"],
        "gpu_constants": {k: getattr(fitted_gpu, k) for k in GPU_PARAMS},
        "idle_terms": _idle_terms(doc),
        "workload_fit": {k: getattr(fitted_model, k) for k in MODEL_PARAMS},
        "windows": len(problem.obs),
        "max_abs_log_error": float(errors.max()), "mean_abs_log_error": float(errors.mean()),
        "rows": [{"setting": o["setting"], "phase": o["phase"], "batch_size": o["batch_size"],
                  "seconds_per_forward": [o["seconds"], float(s[i])], "power_watts": [o["watts"], float(w[i])]}
                 for i, o in enumerate(problem.obs)],
        "note": "pairs are [measured, predicted]",
    }
    return fitted_gpu, report


def profile_entry(p: GpuProfile, report: dict[str, Any]) -> dict[str, Any]:
    d = asdict(p)
    d.pop("key")
    d["fit_summary"] = {k: report[k] for k in ("source", "method", "windows", "max_abs_log_error", "mean_abs_log_error")}
    return d


def run(run_path: Path, gpu_key: str | None, base_key: str, out: Path, report_path: Path | None) -> int:
    try:
        doc = load_run(run_path)
        profiles = gpu_profiles(GPUS_PATH)
        key = gpu_key or doc["device"].get("profile")
        if not key:
            raise GpuRunError("name the profile to write with --gpu-key (e.g. h200); the run's device has no profile key")
        base = profiles.get(key) or profiles.get(base_key)
        if base is None:
            raise GpuRunError(f"no GPU profile '{key}' or base '{base_key}' in {GPUS_PATH}")
        fitted, report = fit_gpu_run(doc, base, str(run_path), key)
    except (GpuRunError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in report["gpu_constants"].items():
        print(f"{k:28s} {v:.4f}")
    print(f"fit error over {report['windows']} windows: max |log error| {report['max_abs_log_error']:.3f}, "
          f"mean {report['mean_abs_log_error']:.3f}")
    existing = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    existing[key] = profile_entry(fitted, report)
    out.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")
    gpu_profiles.cache_clear()
    print(f"wrote profile '{key}' to {out} ({fitted.constants_provenance})")
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote the fit report to {report_path}")
    return 0

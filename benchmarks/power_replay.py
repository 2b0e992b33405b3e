"""Power-governor benchmark: replay the Azure conversation trace on the simulated fleet under each policy.

Runs (all method "simulated", same trace, placement and seed):
- default: no governor (700 W limits, unlocked clocks);
- slo-feedback: every GPU in one group;
- budget: the group's limits share a fixed budget; checked against the group's power every second;
- flat-budget vs carbon-aware: an hourly carbon-intensity series (24 values) compressed onto the
  replay (each series hour = replay length / 24), the flat budget set to the carbon-aware budget's
  time mean; compared in gCO2e per request.

With --band, every run is rerun with the simulator's unfitted GPU constants (voltage floor, bandwidth
knee, memory-bound SM activity) at the low and at the high end of their plausible values
(SENSITIVITY_BAND), and each figure (the governor's saving, the budget's compliance, the carbon-aware
saving) is reported as a band. --band-only adds the bands to an existing result without rerunning it. Until a GPU run has
fitted them (python -m scheduler.sim.fit --gpu-run), the saving is only as good as that band.

Usage:
    python -m benchmarks.power_replay [--minutes 60] [--config configs/sim-fleet.yaml] [--band]
writes docs/results/power-replay.json and docs/results/power-replay.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.datafiles import REPOSITORY_DIR, conversation_trace
from scheduler.config import PowerConfig, PowerGroupConfig, WattlaneConfig, load_config
from scheduler.power.actuator import PowerActuator
from scheduler.power.audit import PowerAuditLog
from scheduler.power.governor import Governor
from scheduler.sim.fleet import FleetSimulator
from scheduler.sim.profiles import gpu_constant_overrides, gpu_profile
from scheduler.sim.trace import load_trace

REPO = REPOSITORY_DIR
DEFAULT_TRACE = conversation_trace()
DEFAULT_CONFIG = REPO / "configs" / "sim-fleet.yaml"
RESULTS = REPO / "docs" / "results"

#: Illustrative hourly grid intensity (gCO2e/kWh, UTC hour 0..23) shaped like a solar-heavy grid:
#: dirty overnight and in the evening peak, clean around midday. Not a measured series.
HOURLY_INTENSITY = [
    420, 430, 435, 440, 440, 430, 400, 350, 290, 230, 190, 160,
    150, 150, 165, 200, 260, 340, 410, 450, 460, 455, 445, 430,
]

#: plausible ends of the unfitted GPU constants (docs/sim.md): not measurements. Low: voltage nearly
#: proportional to clock at the bottom, HBM saturated down to very low clocks, memory-bound SMs almost
#: idle; high: a flat voltage curve, an early bandwidth knee, memory-bound SMs drawing half their power.
SENSITIVITY_BAND = {
    "low": {"voltage_floor_fraction": 0.5, "memory_clock_knee": 0.02, "memory_bound_sm_activity": 0.15},
    "high": {"voltage_floor_fraction": 0.75, "memory_clock_knee": 0.15, "memory_bound_sm_activity": 0.5},
}


class RecordingGovernor:
    """Wraps a Governor to record, after every step, the sum of each group's power limits."""

    def __init__(self, governor: Governor):
        self.governor = governor
        self.limit_sums: list[tuple[float, float, float | None]] = []  # (t, sum of limits, budget)

    def step(self, now_s=None, stats_by_device=None):
        actions = self.governor.step(now_s, stats_by_device)
        for g in self.governor.get_policy()["groups"]:
            total = sum(self.governor.devices[d].power_limit_watts() or 0.0 for d in g["devices"])
            self.limit_sums.append((now_s, total, (g.get("state") or {}).get("budget_watts")))
        return actions

    def on_work_arrived(self, device_id, now_s=None):
        return self.governor.on_work_arrived(device_id, now_s)


def governor_factory(policy: str | None, options: dict[str, Any], holder: dict[str, Any], intensity: Callable[[float], float] | None = None):
    def make(config: WattlaneConfig, devices, clock):
        if policy is None:
            return None
        state = Path(tempfile.mkdtemp(prefix="wattlane-power-bench-"))
        power = PowerConfig(mode="enforce", interval_seconds=config.power.interval_seconds,
                            groups=[PowerGroupConfig(name="fleet", devices=sorted(devices), policy=policy, options=options)])
        audit = PowerAuditLog.in_state_dir(state)
        actuator = PowerActuator(devices, state, mode="enforce", audit=audit, clock=clock, restore_on_start=False)
        gov = RecordingGovernor(Governor(power, devices, actuator, clock=clock, intensity_provider=intensity))
        weakref.finalize(gov, shutil.rmtree, state, True)  # one per replay; nothing in it outlives the replay
        holder["governor"], holder["audit"] = gov, audit
        return gov

    return make


def run_one(config: WattlaneConfig, trace, name: str, policy: str | None, options: dict[str, Any], *,
            intensity: Callable[[float], float] | None = None, timeline_s: float = 1.0) -> dict[str, Any]:
    holder: dict[str, Any] = {}
    # the governor is what is compared here, so traffic is spread the same way in every run
    # (round-robin over all replicas, no model selection), as recorded in docs/results/power-replay.md
    sim = FleetSimulator(config, governor_factory=governor_factory(policy, options, holder, intensity),
                         timeline_interval_seconds=timeline_s, auto_selection="placement-only")
    res = sim.run(trace)
    s = res.summary()
    t = np.array(next(iter(s["timeline"].values()))["t_s"])
    group_power = np.sum([np.array(v["power_watts"]) for v in s["timeline"].values()], axis=0)
    out = {k: s[k] for k in ("requests", "completed", "rejected", "virtual_seconds", "wall_seconds", "energy_joules",
                             "energy_per_request_joules", "tokens_per_joule", "ttft_p99_seconds", "tpot_p99_seconds",
                             "slo_attainment", "preemptions", "governor_steps")}
    out.update(name=name, policy=policy or "none", options=options, method="simulated",
               max_group_power_watts_1s=float(group_power.max()) if len(group_power) else None,
               mean_group_power_watts=float(s["energy_joules"] / s["virtual_seconds"]))
    if intensity is not None:
        grams = float(np.sum(group_power * timeline_s * np.array([intensity(x - timeline_s / 2) for x in t])) / 3.6e6)
        # the tail after the last sample, at the last intensity (tiny; keeps conservation)
        sampled_j = float(np.sum(group_power) * timeline_s)
        tail_j = max(s["energy_joules"] - sampled_j, 0.0)
        grams += tail_j / 3.6e6 * intensity(float(t[-1]) if len(t) else 0.0)
        out["gco2e"] = grams
        out["gco2e_per_request"] = grams / max(s["completed"], 1)
    gov = holder.get("governor")
    if gov is not None:
        sums = gov.limit_sums
        out["max_sum_of_limits_watts"] = max(x[1] for x in sums)
        budgets = [x for x in sums if x[2] is not None]
        if budgets:
            out["limit_sum_over_budget_steps"] = sum(1 for _, tot, b in budgets if tot > b + 1e-6)
            # power over the budget in force during each 1 s interval
            b_at = np.array([b for _, _, b in budgets])
            tb = np.array([x[0] for x in budgets])
            idx = np.clip(np.searchsorted(tb, t - timeline_s, side="right") - 1, 0, len(b_at) - 1)
            out["seconds_group_power_over_budget"] = int(np.sum(group_power > b_at[idx] + 1e-6))
            out["min_budget_watts"], out["max_budget_watts"] = float(b_at.min()), float(b_at.max())
        out["actions"] = holder["audit"].count(outcome="applied")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--minutes", type=float, default=60.0, help="replay the first N minutes of the trace")
    ap.add_argument("--budget-watts", type=float, default=2800.0, help="budget policy: group budget")
    ap.add_argument("--carbon-clean-watts", type=float, default=4000.0)
    ap.add_argument("--carbon-dirty-watts", type=float, default=2000.0)
    ap.add_argument("--only", default=None, help="comma-separated subset of runs: default,slo-feedback,budget,flat-budget,carbon-aware")
    ap.add_argument("--out", default=str(RESULTS / "power-replay"))
    ap.add_argument("--band", action="store_true", help="also rerun every run at the low and high ends of the unfitted GPU constants")
    ap.add_argument("--band-only", action="store_true", help="add the bands to the existing result (--out) without rerunning its central runs")
    args = ap.parse_args(argv)

    config = load_config(args.config)
    trace = load_trace(args.trace).window(args.minutes)
    duration = float(trace.arrival_s[-1]) if len(trace) else 1.0
    hour_s = duration / 24.0

    def intensity(now_s: float) -> float:
        return float(HOURLY_INTENSITY[min(int(max(now_s, 0.0) // hour_s), 23)])

    carbon_opts = {
        "budget_watts_clean": args.carbon_clean_watts, "budget_watts_dirty": args.carbon_dirty_watts,
        "clean_intensity_gco2e_per_kwh": min(HOURLY_INTENSITY), "dirty_intensity_gco2e_per_kwh": max(HOURLY_INTENSITY),
    }
    # the flat budget equals the carbon-aware budget's mean over the series, so both may spend alike
    fr = [(g - min(HOURLY_INTENSITY)) / (max(HOURLY_INTENSITY) - min(HOURLY_INTENSITY)) for g in HOURLY_INTENSITY]
    flat = float(np.mean([args.carbon_clean_watts + f * (args.carbon_dirty_watts - args.carbon_clean_watts) for f in fr]))
    plans = {
        "default": (None, {}, None),
        "slo-feedback": ("slo-feedback", {"tpot_slo_seconds": config.routing.default_slo.tpot_ms / 1000,
                                          "ttft_slo_seconds": config.routing.default_slo.ttft_ms / 1000}, None),
        "budget": ("budget", {"budget_watts": args.budget_watts}, None),
        "flat-budget": ("budget", {"budget_watts": round(flat)}, intensity),
        "carbon-aware": ("carbon-aware", carbon_opts, intensity),
    }
    if args.band_only:
        out = Path(args.out)
        doc = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        doc["sensitivity_band"] = sensitivity_band(config, trace, plans, doc["comparisons"], doc["runs"])
        doc["band_command"] = "python -m benchmarks.power_replay --band-only"
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
        out.with_suffix(".md").write_text(render_md(doc))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
        return 0
    wanted = args.only.split(",") if args.only else list(plans)
    runs: dict[str, Any] = {}
    for name in wanted:
        policy, opts, inten = plans[name]
        t0 = time.perf_counter()
        runs[name] = run_one(config, trace, name, policy, opts, intensity=inten)
        r = runs[name]
        print(f"{name:13s} E/req {r['energy_per_request_joules']:8.1f} J  SLO {100 * r['slo_attainment']:6.2f}%  "
              f"ttft99 {r['ttft_p99_seconds']:.3f}s tpot99 {1000 * r['tpot_p99_seconds']:.1f}ms  "
              f"peak 1s group power {r['max_group_power_watts_1s']:.0f} W"
              + (f"  gCO2e/req {r['gco2e_per_request']:.4f}" if "gco2e_per_request" in r else "")
              + f"  ({time.perf_counter() - t0:.1f}s)", flush=True)

    comparisons: dict[str, Any] = {}
    if "default" in runs and "slo-feedback" in runs:
        d, s = runs["default"], runs["slo-feedback"]
        comparisons["slo_feedback_vs_default"] = {
            "energy_per_request_change": s["energy_per_request_joules"] / d["energy_per_request_joules"] - 1,
            "slo_attainment_points": 100 * (s["slo_attainment"] - d["slo_attainment"]),
            "target": "<= -30% energy per request, SLO attainment within 1 point",
        }
        c = comparisons["slo_feedback_vs_default"]
        c["met"] = c["energy_per_request_change"] <= -0.30 and abs(c["slo_attainment_points"]) <= 1.0
    if "budget" in runs:
        b = runs["budget"]
        comparisons["budget"] = {
            "budget_watts": args.budget_watts, "max_sum_of_limits_watts": b["max_sum_of_limits_watts"],
            "max_group_power_watts_1s": b["max_group_power_watts_1s"],
            "seconds_over_budget": b["seconds_group_power_over_budget"],
            "met": b["seconds_group_power_over_budget"] == 0 and b["max_sum_of_limits_watts"] <= args.budget_watts,
        }
    if "flat-budget" in runs and "carbon-aware" in runs:
        f, c = runs["flat-budget"], runs["carbon-aware"]
        comparisons["carbon_aware_vs_flat_budget"] = {
            "flat_budget_watts": round(flat),
            "gco2e_per_request_change": c["gco2e_per_request"] / f["gco2e_per_request"] - 1,
            "energy_per_request_change": c["energy_per_request_joules"] / f["energy_per_request_joules"] - 1,
            "slo_attainment_points": 100 * (c["slo_attainment"] - f["slo_attainment"]),
            "met": c["gco2e_per_request"] < f["gco2e_per_request"],
        }
    band: dict[str, Any] | None = None
    if args.band:
        band = sensitivity_band(config, trace, plans, comparisons, runs)
    command = "python -m benchmarks.power_replay " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {
        "benchmark": "power-replay", "method": "simulated", "command": command.strip(),
        "trace": str(Path(args.trace).name), "minutes": args.minutes, "requests": len(trace),
        "config": str(Path(args.config).resolve().relative_to(REPO)) if Path(args.config).resolve().is_relative_to(REPO) else args.config,
        "slo": {"ttft_p99_seconds": config.routing.default_slo.ttft_ms / 1000, "tpot_p99_seconds": config.routing.default_slo.tpot_ms / 1000},
        "hourly_intensity_gco2e_per_kwh": HOURLY_INTENSITY, "series_hour_seconds": hour_s,
        "python": platform.python_version(), "runs": runs, "comparisons": comparisons,
        "gpu_constants": {key: {k: getattr(gpu_profile(key), k) for k in ("voltage_floor_fraction", "memory_clock_knee",
                                                                           "memory_bound_sm_activity", "constants_provenance")}
                          for key in sorted({d.profile for d in config.devices.simulated})},
    }
    if band is not None:
        doc["sensitivity_band"] = band
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(render_md(doc))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def sensitivity_band(config: WattlaneConfig, trace, plans: dict[str, Any], comparisons: dict[str, Any],
                     central_runs: dict[str, Any]) -> dict[str, Any]:
    """Every run at each end of SENSITIVITY_BAND; each figure's band includes the central result."""
    ends: dict[str, Any] = {}
    for end, constants in SENSITIVITY_BAND.items():
        r: dict[str, Any] = {}
        with gpu_constant_overrides(**constants):
            for name in central_runs:
                policy, opts, inten = plans[name]
                r[name] = run_one(config, trace, name, policy, opts, intensity=inten)
        d, s = r["default"], r["slo-feedback"]
        e = ends[end] = {"constants": constants, "default_energy_per_request_joules": d["energy_per_request_joules"],
                         "slo_feedback_energy_per_request_joules": s["energy_per_request_joules"],
                         "energy_per_request_change": s["energy_per_request_joules"] / d["energy_per_request_joules"] - 1,
                         "slo_attainment_points": 100 * (s["slo_attainment"] - d["slo_attainment"]),
                         "default_slo_attainment": d["slo_attainment"], "slo_feedback_slo_attainment": s["slo_attainment"],
                         "runs": {n: {k: x.get(k) for k in ("energy_per_request_joules", "slo_attainment", "gco2e_per_request",
                                                            "seconds_group_power_over_budget", "max_sum_of_limits_watts",
                                                            "max_group_power_watts_1s")} for n, x in r.items()}}
        if "carbon-aware" in r and "flat-budget" in r:
            e["carbon_aware_gco2e_per_request_change"] = r["carbon-aware"]["gco2e_per_request"] / r["flat-budget"]["gco2e_per_request"] - 1
        print(f"band {end:4s} {constants}: slo-feedback {100 * e['energy_per_request_change']:+.1f}% J/request, "
              f"SLO {e['slo_attainment_points']:+.2f} points"
              + (f"; carbon-aware {100 * e['carbon_aware_gco2e_per_request_change']:+.1f}% gCO2e/request" if "carbon_aware_gco2e_per_request_change" in e else "")
              + (f"; budget: {r['budget']['seconds_group_power_over_budget']} s over" if "budget" in r else ""), flush=True)
    changes = [e["energy_per_request_change"] for e in ends.values()]
    central = comparisons.get("slo_feedback_vs_default", {}).get("energy_per_request_change")
    if central is not None:
        changes.append(central)
    band = {"ends": ends, "slo_feedback_energy_per_request_change": [min(changes), max(changes)],
            "note": "plausible ends of unfitted modelling constants, not measurements; replace by a fit from a GPU run"}
    carbon = [e["carbon_aware_gco2e_per_request_change"] for e in ends.values() if "carbon_aware_gco2e_per_request_change" in e]
    if carbon:
        central = comparisons.get("carbon_aware_vs_flat_budget", {}).get("gco2e_per_request_change")
        carbon += [central] if central is not None else []
        band["carbon_aware_gco2e_per_request_change"] = [min(carbon), max(carbon)]
    over = [e["runs"]["budget"]["seconds_group_power_over_budget"] for e in ends.values() if "budget" in e["runs"]]
    if over:
        band["budget_seconds_over_budget"] = [min(over), max(over)]
    return band


def render_md(doc: dict[str, Any]) -> str:
    lines = [
        "# Power governor on the simulated fleet (method: simulated)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Trace: {doc['trace']} (Azure LLM inference 2023, conversation), first {doc['minutes']:g} min, "
        f"{doc['requests']} requests; fleet: `{doc['config']}`; placement round-robin; power interval 1 s.",
        f"SLO per request: TTFT <= {doc['slo']['ttft_p99_seconds']} s and TPOT <= {doc['slo']['tpot_p99_seconds'] * 1000:.0f} ms; "
        "attainment = share of requests meeting both.",
        "All energy figures are from the simulator's GPU physics (scheduler/sim), not measured on hardware.",
        "",
        "| run | policy | energy/request (J) | SLO attainment | TTFT p99 (s) | TPOT p99 (ms) | mean group power (W) | peak 1 s group power (W) | gCO2e/request | actions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["runs"].items():
        g = f"{r['gco2e_per_request']:.4f}" if "gco2e_per_request" in r else "-"
        lines.append(
            f"| {name} | {r['policy']} | {r['energy_per_request_joules']:.1f} | {100 * r['slo_attainment']:.2f}% | "
            f"{r['ttft_p99_seconds']:.3f} | {1000 * r['tpot_p99_seconds']:.1f} | {r['mean_group_power_watts']:.0f} | "
            f"{r['max_group_power_watts_1s']:.0f} | {g} | {r.get('actions', '-')} |"
        )
    c = doc["comparisons"]
    lines += ["", "## Targets (issue 6)", ""]
    if "slo_feedback_vs_default" in c:
        x = c["slo_feedback_vs_default"]
        lines.append(f"- slo-feedback vs default: energy per request {100 * x['energy_per_request_change']:+.1f}%, "
                     f"SLO attainment {x['slo_attainment_points']:+.2f} points (target <= -30%, within 1 point): "
                     f"**{'met' if x['met'] else 'not met'}**.")
    if "budget" in c:
        x = c["budget"]
        lines.append(f"- budget {x['budget_watts']:.0f} W: sum of limits never above {x['max_sum_of_limits_watts']:.0f} W; "
                     f"highest 1 s group power {x['max_group_power_watts_1s']:.0f} W; seconds over budget: "
                     f"{x['seconds_over_budget']}: **{'met' if x['met'] else 'not met'}**.")
    if "carbon_aware_vs_flat_budget" in c:
        x = c["carbon_aware_vs_flat_budget"]
        lines.append(f"- carbon-aware vs flat budget ({x['flat_budget_watts']} W, the carbon-aware budget's mean): "
                     f"gCO2e per request {100 * x['gco2e_per_request_change']:+.1f}%, energy per request "
                     f"{100 * x['energy_per_request_change']:+.1f}%, SLO {x['slo_attainment_points']:+.2f} points: "
                     f"**{'met' if x['met'] else 'not met'}**.")
    if "sensitivity_band" in doc:
        band = doc["sensitivity_band"]
        lo, hi = band["slo_feedback_energy_per_request_change"]
        lines += ["", "## Sensitivity band (unfitted GPU constants)", "",
                  "The governor's saving rests on three GPU constants no measurement has fitted yet "
                  f"({', '.join(f'{k}: {v}' for k, v in doc['gpu_constants'].items())}). Rerun at the low and high ends of "
                  "their plausible values:", "",
                  "| end | voltage floor | bandwidth knee | memory-bound SM activity | default J/request | slo-feedback J/request | change | SLO points |",
                  "|---|---|---|---|---|---|---|---|"]
        for end, e in band["ends"].items():
            c = e["constants"]
            lines.append(f"| {end} | {c['voltage_floor_fraction']} | {c['memory_clock_knee']} | {c['memory_bound_sm_activity']} | "
                         f"{e['default_energy_per_request_joules']:.1f} | {e['slo_feedback_energy_per_request_joules']:.1f} | "
                         f"{100 * e['energy_per_request_change']:+.1f}% | {e['slo_attainment_points']:+.2f} |")
        lines += ["", f"slo-feedback vs default, energy per request: **{100 * lo:+.1f}% to {100 * hi:+.1f}%** across the band "
                  "(central value included). A fit from a GPU run (scripts/gpu/gpu_run.py, then "
                  "`python -m scheduler.sim.fit --gpu-run`) replaces the band by one figure."]
        if "carbon_aware_gco2e_per_request_change" in band:
            clo, chi = band["carbon_aware_gco2e_per_request_change"]
            lines += ["", f"carbon-aware vs flat budget, gCO2e per request: **{100 * clo:+.1f}% to {100 * chi:+.1f}%** across the band."]
        if "budget_seconds_over_budget" in band:
            blo, bhi = band["budget_seconds_over_budget"]
            lines += ["", f"budget policy, seconds of group power over the budget: {blo} to {bhi} across the band."]
        if any("runs" in e for e in band["ends"].values()):
            names = list(doc["runs"])
            lines += ["", "J/request and SLO attainment of every run at each end (central in the first table):", "",
                      "| end | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for end, e in band["ends"].items():
                lines.append(f"| {end} | " + " | ".join(f"{e['runs'][n]['energy_per_request_joules']:.1f} J, {100 * e['runs'][n]['slo_attainment']:.2f}%"
                                                       for n in names) + " |")
        lines += ["", "No GPU result is in the repository yet: every figure here is simulated."]
    lines += [
        "",
        "Carbon series: an illustrative 24-value hourly series (solar-heavy shape, "
        f"{min(doc['hourly_intensity_gco2e_per_kwh'])}-{max(doc['hourly_intensity_gco2e_per_kwh'])} gCO2e/kWh), not a measured one; "
        f"the one-hour trace is too short for a day, so each series hour covers {doc['series_hour_seconds']:.0f} s of replay.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

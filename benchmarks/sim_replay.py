"""Replay benchmark: the full Azure conversation trace on the 8-GPU simulated fleet, timed; writes docs/results/sim-replay.{json,md}.

Run: python -m benchmarks.sim_replay [--trace PATH] [--config configs/sim-fleet.yaml] [--out-dir docs/results]
 or: python -m benchmarks.sim_replay --band   (after a run: rerun it at the low and high ends of the simulator's
     unfitted GPU constants, benchmarks.power_replay.SENSITIVITY_BAND, and add each energy figure's band)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from scheduler.sim.commands import run_simulation
from scheduler.datafiles import REPOSITORY_DIR as REPO_DIR, conversation_trace

TARGET_SECONDS = 60.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_replay", description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=REPO_DIR / "configs" / "sim-fleet.yaml")
    ap.add_argument("--out-dir", type=Path, default=REPO_DIR / "docs" / "results")
    ap.add_argument("--placement", default=None)
    ap.add_argument("--power-policy", default=None)
    ap.add_argument("--band", action="store_true", help="add sensitivity bands to the existing result in --out-dir")
    args = ap.parse_args(argv)
    if args.band:
        return add_band(args.out_dir)
    trace = args.trace or conversation_trace()
    t0 = time.perf_counter()
    s = run_simulation(trace, args.config, placement=args.placement, power_policy=args.power_policy)
    total = time.perf_counter() - t0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    s["benchmark"] = {
        "command": "python -m benchmarks.sim_replay", "wall_seconds_total": total, "wall_seconds_replay": s["wall_seconds"],
        "target_seconds": TARGET_SECONDS, "meets_target": total < TARGET_SECONDS, "cpu_cores": cores,
        "python": platform.python_version(), "machine": platform.machine(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sim-replay.json").write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    lines = render_markdown(s, Path(trace).name, args.config.name)
    (args.out_dir / "sim-replay.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


def render_markdown(s: dict, trace_name: str, config_name: str) -> list[str]:
    total, cores = s["benchmark"]["wall_seconds_total"], s["benchmark"]["cpu_cores"]
    ms = lambda v: "-" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    lines = [
        "# Simulator replay benchmark (method: simulated)",
        "",
        f"Command: `python -m benchmarks.sim_replay` (same as `wattlane simulate --trace {trace_name} --config {config_name} --json ...`).",
        f"Trace: Azure LLM 2023 conversation, {s['requests']} requests over one hour; fleet: configs/sim-fleet.yaml (8 simulated H100 SXM:",
        "4x Llama-3.1-8B, 1x Llama-3.1-70B TP4); model \"auto\": the router's model selection (scheduler.routing.select.route,",
        f"quality target {s['routing'].get('min_quality', '-')} from the config, prompts from the held-out routing split), then "
        f"placement {s['settings']['placement']} among the chosen model's replicas; power governor as in the config.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| wall time, load + replay ({cores} cores) | {total:.1f} s (target < {TARGET_SECONDS:.0f} s: {'met' if total < TARGET_SECONDS else 'NOT met'}) |",
        f"| virtual time | {s['virtual_seconds']:.0f} s |",
        f"| completed / rejected | {s['completed']} / {s['rejected']} |",
        f"| GPU energy | {s['energy_joules'] / 1e6:.2f} MJ |",
        f"| energy per request | {s['energy_per_request_joules']:.1f} J |",
        f"| output tokens per joule | {s['tokens_per_joule']:.3f} |",
        f"| TTFT p50 / p99 | {ms(s['ttft_p50_seconds'])} / {ms(s['ttft_p99_seconds'])} ms |",
        f"| TPOT p50 / p99 | {ms(s['tpot_p50_seconds'])} / {ms(s['tpot_p99_seconds'])} ms |",
        f"| SLO attainment (TTFT <= {s['slo']['ttft_seconds']:g} s, TPOT <= {s['slo']['tpot_seconds'] * 1000:g} ms) | {s['slo_attainment']:.2%} |",
        f"| preemptions | {s['preemptions']} |",
        *([f"| requests by model | {', '.join(f'{m} {n}' for m, n in s['routing']['requests_by_model'].items())} |",
           f"| route() per request, mean / p99 | {s['routing']['route_seconds_mean'] * 1000:.3f} / {s['routing']['route_seconds_p99'] * 1000:.3f} ms |"]
          if s.get("routing") else []),
        "",
        "Per device (mean power over the run, min/max of 60 s interval means):",
        "",
        "| device | energy (kJ) | mean W | min W | max W |",
        "|---|---|---|---|---|",
    ]
    for d, v in s["devices"].items():
        lines.append(f"| {d} | {v['energy_joules'] / 1000:.0f} | {v['mean_power_watts']:.0f} | {v['min_interval_power_watts']:.0f} | {v['max_interval_power_watts']:.0f} |")
    lines += ["", "The JSON file holds every key above plus the per-device timeline (`timeline`), per-replica counts and the settings used.", ""]
    lines += band_markdown(s)
    return lines


def add_band(out_dir: Path) -> int:
    """Rerun the replay of an existing result at both ends of SENSITIVITY_BAND; write each energy figure's band into it."""
    from benchmarks.power_replay import SENSITIVITY_BAND
    from scheduler.sim.profiles import gpu_constant_overrides

    path = out_dir / "sim-replay.json"
    s = json.loads(path.read_text(encoding="utf-8"))
    st = s["settings"]
    trace = Path(st["trace"]) if Path(st["trace"]).is_file() else conversation_trace()
    config = Path(st["config"]) if Path(st["config"]).is_file() else REPO_DIR / "configs" / Path(st["config"]).name
    ends = {}
    for end, constants in SENSITIVITY_BAND.items():
        with gpu_constant_overrides(**constants):
            r = run_simulation(trace, config, placement=st["placement"], power_policy=None if st["power_policy"] == "config" else st["power_policy"])
        ends[end] = {"constants": constants, **{k: r[k] for k in BAND_KEYS}}
        print(f"band {end:4s}: " + ", ".join(f"{k} {r[k]:.4g}" for k in BAND_KEYS), flush=True)
    s["sensitivity_band"] = {
        "ends": ends,
        "figures": {k: [min([s[k]] + [e[k] for e in ends.values()]), max([s[k]] + [e[k] for e in ends.values()])] for k in BAND_KEYS},
        "note": "Plausible ends of unfitted modelling constants (voltage floor, bandwidth knee, memory-bound SM activity), not "
                "measurements; the fitted model coefficients are held, so at default clocks only the memory-bound SM activity "
                "moves energy, and latency does not move. A fit from a GPU run replaces the band.",
        "command": "python -m benchmarks.sim_replay --band",
    }
    path.write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    (out_dir / "sim-replay.md").write_text("\n".join(render_markdown(s, trace.name, config.name)), encoding="utf-8")
    print(f"wrote {path} and sim-replay.md")
    return 0


#: figures of the replay that the band covers
BAND_KEYS = ("energy_joules", "energy_per_request_joules", "tokens_per_joule", "ttft_p99_seconds", "tpot_p99_seconds", "slo_attainment")


def band_markdown(s: dict) -> list[str]:
    band = s.get("sensitivity_band")
    if not band:
        return ["Sensitivity band: not computed for this result (`python -m benchmarks.sim_replay --band`). No GPU result is in the repository yet.", ""]
    lo, hi = band["ends"]["low"], band["ends"]["high"]
    fmt = {"energy_joules": lambda v: f"{v / 1e6:.2f} MJ", "energy_per_request_joules": lambda v: f"{v:.1f} J",
           "tokens_per_joule": lambda v: f"{v:.3f}", "ttft_p99_seconds": lambda v: f"{v * 1000:.1f} ms",
           "tpot_p99_seconds": lambda v: f"{v * 1000:.1f} ms", "slo_attainment": lambda v: f"{v:.2%}"}
    lines = ["## Sensitivity band (unfitted GPU constants)", "",
             f"`{band['command']}` reran the replay at the low end ({', '.join(f'{k} {v:g}' for k, v in lo['constants'].items())}) and the "
             f"high end ({', '.join(f'{k} {v:g}' for k, v in hi['constants'].items())}) of the simulator's unfitted GPU constants. "
             f"{band['note']} No GPU result is in the repository yet.", "",
             "| figure | central | low end | high end | band |", "|---|---|---|---|---|"]
    for k in BAND_KEYS:
        f = fmt[k]
        lines.append(f"| {k} | {f(s[k])} | {f(lo[k])} | {f(hi[k])} | {f(band['figures'][k][0])} to {f(band['figures'][k][1])} |")
    return lines + [""]


if __name__ == "__main__":
    raise SystemExit(main())

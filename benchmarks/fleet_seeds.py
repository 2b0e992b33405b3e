"""The fleet bench's issue-14 figures across seeds: how much of each result is the one draw of seed 0.

    python -m benchmarks.fleet_seeds [--seeds 0,1,2,3,4,5] [--workers 2]
writes docs/results/fleet-bench-seeds.{json,md} (every figure simulated).

The seed draws the prompts (and so the correctness labels) each request gets from the held-out routing split,
and generates the prompt-heavy trace (arrivals, burst phases, lengths); the conversation trace is the recorded
one at every seed. Each seed runs `wattlane bench fleet --workloads conversation,prompt-heavy --loads 1,2
--policies baseline,wattlane-all,wattlane-all-blind,wattlane-all-by-gain,oracle --no-band --seed S`
(scheduler.sim.bench.run_bench) and the tables show, per cell, each full Wattlane set against the baseline and
the oracle, with the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from scheduler.datafiles import REPOSITORY_DIR
from scheduler.sim.bench import run_bench

RESULTS_DIR = REPOSITORY_DIR / "docs" / "results"
CELLS = ("conversation@1", "conversation@2", "prompt-heavy@1", "prompt-heavy@2")
#: the full Wattlane sets compared: the headline, the same without output lengths, the budget ranked by gain alone
WATTLANE_SETS = {"wattlane-all": "full Wattlane (quality budget by gain per joule; output lengths known to routing)",
                 "wattlane-all-blind": "full Wattlane, output lengths not known to routing (the running mean)",
                 "wattlane-all-by-gain": "full Wattlane with the quality budget ranked by predicted gain alone"}


def cell_figures(doc: dict[str, Any], policy: str = "wattlane-all") -> dict[str, dict[str, float]]:
    """Per cell: the baseline's and this Wattlane set's SLO attainment, its energy against the baseline and the
    oracle, and the quality it retains."""
    out = {}
    for key in CELLS:
        pols = doc["cells"][key]["policies"]
        w, b = pols[policy], pols["baseline"]
        out[key] = {"baseline_slo": b["slo_attainment"], "wattlane_slo": w["slo_attainment"],
                    "energy_vs_baseline": w["comparison"]["energy_vs_baseline"],
                    "energy_vs_oracle": w["comparison"]["energy_vs_oracle"],
                    "quality_retained": w["comparison"]["quality_retained"],
                    "wattlane_joules_per_request": w["energy_per_request_joules"],
                    "baseline_joules_per_request": b["energy_per_request_joules"]}
    return out


def targets_met(f: dict[str, dict[str, float]]) -> dict[str, bool]:
    """Issue 14's Done-when, cell by cell (prompt-heavy 1x: the rate where the baseline holds 99%)."""
    c1, p1, p2 = f["conversation@1"], f["prompt-heavy@1"], f["prompt-heavy@2"]
    return {
        "conversation 1x: <= 40% of the baseline's energy": c1["energy_vs_baseline"] <= -0.60,
        "conversation 1x: >= 99% SLO": c1["wattlane_slo"] >= 0.99,
        "conversation 1x: >= 95% quality retained": c1["quality_retained"] >= 0.95,
        "conversation 1x: within 15% of the oracle": c1["energy_vs_oracle"] <= 0.15,
        "prompt-heavy 1x: baseline holds 99%": p1["baseline_slo"] >= 0.99,
        "prompt-heavy 1x: Wattlane holds 99%": p1["wattlane_slo"] >= 0.99,
        "prompt-heavy 1x: saves >= 40%": p1["energy_vs_baseline"] <= -0.40,
        "prompt-heavy 2x: no worse than the baseline": p2["wattlane_slo"] >= p2["baseline_slo"],
    }


def run(seeds: list[int], workers: int, budget_prompt_weight: float | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    per_seed = {}
    for s in seeds:
        doc = run_bench(workloads=["conversation", "prompt-heavy"], loads=[1.0, 2.0],
                        policies=["baseline", *WATTLANE_SETS, "oracle"], minutes=10.0, seed=s, workers=workers,
                        budget_prompt_weight=budget_prompt_weight)
        per_seed[str(s)] = {}
        for policy in WATTLANE_SETS:
            figures = cell_figures(doc, policy)
            per_seed[str(s)][policy] = {"cells": figures, "targets": targets_met(figures)}
    command = "python -m benchmarks.fleet_seeds --seeds " + ",".join(map(str, seeds))
    if budget_prompt_weight is not None:
        command += f" --budget-prompt-weight {budget_prompt_weight:g}"
    return {"benchmark": "fleet-bench-seeds", "method": "simulated", "command": command,
            "budget_prompt_weight": budget_prompt_weight, "seeds": seeds, "per_seed": per_seed,
            "wall_seconds": time.perf_counter() - t0,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fleet-bench-seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    seeds = [str(s) for s in result["seeds"]]
    lines = ["# Fleet bench across seeds (method: simulated)", "",
             f"Command: `{result['command']}` ({result['wall_seconds']:.0f} s). Each seed is `wattlane bench fleet "
             "--workloads conversation,prompt-heavy --loads 1,2 --policies baseline," + ",".join(WATTLANE_SETS)
             + ",oracle --no-band --seed S`: the seed draws every request's prompt and labels, and generates the "
             "prompt-heavy trace; the conversation trace is the recorded one at every seed."
             + ("" if result.get("budget_prompt_weight") is None else
                f" The quality budget's prompt token weight is {result['budget_prompt_weight']:g} (`--budget-prompt-weight`; "
                "default: the size prior's 0.1)."), ""]
    for policy, label in WATTLANE_SETS.items():
        lines += [f"## `{policy}`: {label}", "",
                  "| seed | cell | baseline SLO | Wattlane SLO | energy vs baseline | vs oracle | quality retained |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for s in seeds:
            for key, f in result["per_seed"][s][policy]["cells"].items():
                lines.append(f"| {s} | {key.replace('@', ' ')}x | {100 * f['baseline_slo']:.2f}% | {100 * f['wattlane_slo']:.2f}% | "
                             f"{_pct(f['energy_vs_baseline'])} | {_pct(f['energy_vs_oracle'])} | {100 * f['quality_retained']:.1f}% |")
        names = list(result["per_seed"][seeds[0]][policy]["targets"])
        lines += ["", f"Issue 14's targets for `{policy}`, seed by seed (yes / no):", "",
                  "| target | " + " | ".join(f"seed {s}" for s in seeds) + " | met |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for n in names:
            row = [result["per_seed"][s][policy]["targets"][n] for s in seeds]
            lines.append(f"| {n} | " + " | ".join("yes" if x else "**no**" for x in row) + f" | {sum(row)} of {len(row)} |")
        lines.append("")
    lines.append("")
    (out_dir / "fleet-bench-seeds.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--budget-prompt-weight", type=float, default=None,
                    help="the quality budget's prompt token weight (default: the size prior's 0.1)")
    args = ap.parse_args()
    result = run([int(s) for s in args.seeds.split(",")], args.workers, args.budget_prompt_weight)
    if args.out.resolve() != RESULTS_DIR.resolve():
        out = args.out.resolve()
        result["command"] += f" --out {out.relative_to(REPOSITORY_DIR) if out.is_relative_to(REPOSITORY_DIR) else out}"
    write(result, args.out)
    print((args.out / "fleet-bench-seeds.md").read_text())


if __name__ == "__main__":
    main()

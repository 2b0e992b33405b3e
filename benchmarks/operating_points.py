"""Full Wattlane at other routing thresholds: what spending the quality slack buys on the simulated fleet.

    python -m benchmarks.operating_points   # docs/results/operating-points.json + its block in docs/benchmarks.md (~3 min)

Each operating point is a `routing.default_min_quality` with where it was chosen and what the predictor retains
there (route-calibrate's figures: on the training part out of fold, and on the held-out split; they belong to
the predictor, not to this replay, and tests/unit/routing/test_calibrate_training.py checks the training-part
thresholds). At each point the fleet bench replays baseline, `wattlane-all` and the oracle on both workloads at
every load (`wattlane bench fleet --policies baseline,wattlane-all,oracle --no-band --min-quality Q`); baseline
and oracle do not depend on Q, and are kept from the first point. Method: simulated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from scheduler.datafiles import REPOSITORY_DIR

RESULTS_PATH = REPOSITORY_DIR / "docs" / "results" / "operating-points.json"
DOCS_PATH = REPOSITORY_DIR / "docs" / "benchmarks.md"
BLOCK = "operating-points"
POLICIES = ["baseline", "wattlane-all", "oracle"]

_HELD_OUT = "--data scheduler/data/routing-held-out.csv.gz"
#: (min_quality, short label, how it was chosen, retained out of fold (value, CI low, CI high, strong share),
#: retained on the held-out split (same)): `wattlane route-calibrate` with the options named
POINTS: list[tuple[float, str, str, tuple[float, float, float, float], tuple[float, float, float, float]]] = [
    (0.8956, "training, PGR 0.8", "training split, out of fold: target PGR 0.8 (route-calibrate --training-split --target-pgr 0.8)",
     (0.967, 0.958, 0.976, 0.59), (0.976, 0.96, 0.991, 0.597)),
    (0.8905, "training, 96% retained",
     "training split, out of fold: 96% of the strong model's accuracy retained (--training-split --target-retained 0.96)",
     (0.96, 0.95, 0.969, 0.549), (0.971, 0.955, 0.987, 0.563)),
    (0.8888, "**default**: held-out, PGR 0.8", f"the default: held-out split, PGR 0.8 (route-calibrate {_HELD_OUT} --target-pgr 0.8)",
     (0.959, 0.95, 0.969, 0.538), (0.968, 0.952, 0.984, 0.554)),
    (0.8844, "training, 95.5% retained", "training split, out of fold: 95.5% retained (--training-split --target-retained 0.955)",
     (0.955, 0.945, 0.965, 0.505), (0.961, 0.945, 0.978, 0.519)),
    (0.8808, "training, 95.0% retained (no margin)",
     "training split, out of fold: 95.0% retained, no margin (--training-split --target-retained 0.95)",
     (0.95, 0.94, 0.96, 0.478), (0.954, 0.937, 0.972, 0.489)),
    (0.8709, "held-out (bench pool), 95.0% retained: in sample",
     f"held-out split (the pool the bench draws prompts from): 95.0% retained ({_HELD_OUT} --target-retained 0.95); "
     "in sample, not a defensible choice",
     (0.94, 0.929, 0.95, 0.416), (0.95, 0.932, 0.969, 0.437)),
    (0.865, "scan", "scan", (0.935, 0.924, 0.946, 0.38), (0.943, 0.926, 0.962, 0.406)),
    (0.86, "scan", "scan", (0.933, 0.922, 0.944, 0.357), (0.939, 0.921, 0.959, 0.379)),
    (0.85, "scan", "scan", (0.926, 0.914, 0.938, 0.31), (0.926, 0.906, 0.946, 0.321)),
]


def _figures(r: dict[str, Any]) -> dict[str, Any]:
    c = r.get("comparison", {})
    return {"energy_per_request_joules": round(r["energy_per_request_joules"], 1),
            "energy_vs_baseline": round(c["energy_vs_baseline"], 6), "energy_vs_oracle": round(c["energy_vs_oracle"], 6),
            "slo_attainment": round(r["slo_attainment"], 6), "quality_retained": round(c["quality_retained"], 6),
            "share_to_70b": round(r["share_by_model"].get("llama-3.1-70b", 0.0), 6)}


def _calibration(v: tuple[float, float, float, float]) -> dict[str, Any]:
    return {"retained": v[0], "ci95": [v[1], v[2]], "strong_share": v[3]}


def run(workers: int, minutes: float, seed: int, progress: bool = True) -> dict[str, Any]:
    from scheduler.sim.bench import DEFAULT_LOADS, POLICIES as POLICY_SETS, WORKLOADS, run_bench

    t0 = time.perf_counter()
    points, bounds = [], None
    for q, label, chosen_by, oof, held in POINTS:
        doc = run_bench(workloads=list(WORKLOADS), loads=list(DEFAULT_LOADS), policies=POLICIES, minutes=minutes,
                        seed=seed, workers=workers, min_quality=q)
        cells = doc["cells"]
        if bounds is None:
            bounds = {k: {p: _figures(c["policies"][p]) for p in ("baseline", "oracle")} for k, c in cells.items()}
        points.append({"min_quality": q, "label": label, "chosen_by": chosen_by,
                       "command": f"wattlane bench fleet --out DIR --policies {','.join(POLICIES)} --no-band --min-quality {q:g}",
                       "training_out_of_fold": _calibration(oof), "held_out": _calibration(held),
                       "wattlane_all": {k: _figures(c["policies"]["wattlane-all"]) for k, c in cells.items()}})
        if progress:
            print(f"min_quality {q:g}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    full = POLICY_SETS["wattlane-all"]
    return {
        "method": "simulated",
        "what": "full Wattlane (wattlane-all) replayed at other routing thresholds (min_quality); baseline and oracle do not depend on it",
        "quality_budget_rank": full.budget_rank,
        "retained_note": "accuracy retained = routed label accuracy / always-strong accuracy over the split's rows; CI: 1,000 "
                         "bootstrap resamples (seed 0)",
        "command": "python -m benchmarks.operating_points",
        "settings": {"minutes": minutes, "seed": seed, "loads": list(DEFAULT_LOADS), "workloads": list(WORKLOADS)},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "points": points,
        "baseline_and_oracle": bounds,
    }


def _pct(x: float, signed: bool = False, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f}%" if signed else f"{100 * x:.{digits}f}%"


def render_block(doc: dict[str, Any]) -> str:
    """The two tables of docs/benchmarks.md's "Spending the quality slack": load 1x in full, the other loads in short."""
    workloads = doc["settings"]["workloads"]
    head = ("| min_quality | chosen on | retained, training out of fold (95% CI) | retained, held-out split | "
            + " | ".join(f"{w} 1x: J/request | vs baseline | vs oracle | SLO | quality retained (bench) | to 70B" for w in workloads) + " |")
    lines = [head, "|---:|---|---:|---:|" + "---:|" * 6 * len(workloads)]

    def cells_1x(get: Any) -> str:
        out = []
        for w in workloads:
            f = get(f"{w}@1")
            out.append(f"{f['energy_per_request_joules']:.0f} | {_pct(f['energy_vs_baseline'], True)} | "
                       f"{_pct(f['energy_vs_oracle'], True)} | {_pct(f['slo_attainment'], digits=2)} | "
                       f"{_pct(f['quality_retained'])} | {_pct(f['share_to_70b'])}")
        return " | ".join(out)

    bounds = doc["baseline_and_oracle"]
    for name in ("baseline", "oracle"):
        lines.append(f"| {name} | - | - | - | " + cells_1x(lambda k, n=name: bounds[k][n]) + " |")
    for p in doc["points"]:
        oof, held = p["training_out_of_fold"], p["held_out"]
        lines.append(f"| {p['min_quality']:g} | {p['label']} | {_pct(oof['retained'])} ({_pct(oof['ci95'][0])}-{_pct(oof['ci95'][1])}) | "
                     f"{_pct(held['retained'])} | " + cells_1x(lambda k, p=p: p["wattlane_all"][k]) + " |")
    others = [(w, x) for w in workloads for x in doc["settings"]["loads"] if x != 1]
    lines += ["", "| min_quality | " + " | ".join(f"{w} {x:g}x: vs baseline / vs oracle / SLO / retained" for w, x in others) + " |",
              "|---:|" + "---|" * len(others)]

    def short(f: dict[str, Any]) -> str:
        return (f"{_pct(f['energy_vs_baseline'], True)} / {_pct(f['energy_vs_oracle'], True)} / "
                f"{_pct(f['slo_attainment'], digits=2)} / {_pct(f['quality_retained'])}")

    for name in ("baseline", "oracle"):
        lines.append(f"| {name} | " + " | ".join(short(bounds[f"{w}@{x:g}"][name]) for w, x in others) + " |")
    for p in doc["points"]:
        lines.append(f"| {p['min_quality']:g} | " + " | ".join(short(p["wattlane_all"][f"{w}@{x:g}"]) for w, x in others) + " |")
    return "\n".join(lines)


def main() -> None:
    from scheduler.sim.bench import DEFAULT_MINUTES
    from scheduler.sim.bench_report import sync_doc_blocks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=DEFAULT_MINUTES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_PATH)
    ap.add_argument("--docs", type=Path, default=DOCS_PATH, help="the page whose operating-points block is rewritten")
    args = ap.parse_args()
    doc = run(args.workers, args.minutes, args.seed)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    args.docs.write_text(sync_doc_blocks(args.docs.read_text(encoding="utf-8"), {BLOCK: render_block(doc)}), encoding="utf-8")
    print(f"wrote {args.out} and the {BLOCK} block of {args.docs}")


if __name__ == "__main__":
    main()

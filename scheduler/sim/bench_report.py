"""Renders a fleet-bench result document (scheduler.sim.bench) as Markdown tables and PNG plots."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


def energy_change(r: dict[str, Any], ref: dict[str, Any]) -> float | None:
    """r's energy per request against ref's, -1 to inf; None when either completed nothing (its 'per request'
    figure is then the fleet's idle energy, and a window too short for any arrival has none at all)."""
    if r.get("completed") == 0 or ref.get("completed") == 0 or not ref["energy_per_request_joules"]:
        return None
    return r["energy_per_request_joules"] / ref["energy_per_request_joules"] - 1.0


#: docs/benchmarks.md's blocks rendered from a results file, each between "<!-- fleet-bench:NAME -->" and
#: "<!-- /fleet-bench:NAME -->": tables copied by hand drift from the results they quote (a unit test checks them)
DOC_BLOCKS = ("ablations", "cells", "band")
#: the policy set each ablation is measured against
ABLATION_REFERENCE = "wattlane"
#: policy sets that are no ablation of the reference (it, the bounds, and the sets with one part of it)
_NOT_ABLATIONS = {"baseline", "routing", "placement", "governor", ABLATION_REFERENCE, "oracle", "perfect-predictor"}


class DocBlockError(ValueError):
    """A document lacks a block's markers, or has them out of order."""


class ResultsError(ValueError):
    """A results document lacks what the blocks are rendered from; the message says what."""


def check_results(doc: Any) -> None:
    """Raise ResultsError unless `doc` has the shape of a fleet bench's fleet-bench.json (what render_doc_blocks reads)."""
    if not isinstance(doc, dict):
        raise ResultsError(f"holds a JSON {type(doc).__name__}, not the object `wattlane bench fleet` writes")
    cells = doc.get("cells")
    if not isinstance(cells, dict):
        raise ResultsError("has no 'cells' object (one entry per workload and load)")
    for key, cell in cells.items():
        if not isinstance(cell, dict) or not {"workload", "load", "policies"} <= set(cell) or not isinstance(cell["policies"], dict):
            raise ResultsError(f"cell {key!r} is not an object with 'workload', 'load' and 'policies'")
    settings = doc.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("policies"), list) or not isinstance(settings.get("loads"), list):
        raise ResultsError("has no 'settings' object with 'policies' and 'loads' lists")


def _pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.{digits}f}%" if signed else f"{100 * x:.{digits}f}%"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _share_70b(r: dict[str, Any]) -> float | None:
    return r["share_by_model"].get("llama-3.1-70b")


def _cmp(r: dict[str, Any], key: str) -> float | None:
    return r.get("comparison", {}).get(key)


#: a column of a per-policy table: (header, Markdown alignment, the cell from one policy's result)
Column = tuple[str, str, Callable[[dict[str, Any]], str]]

#: the results file's table of a cell: every figure
FULL_COLUMNS: list[Column] = [
    ("J/request", "---:", lambda r: f"{r['energy_per_request_joules']:.0f}"),
    ("dynamic", "---:", lambda r: f"{r['dynamic_energy_per_request_joules']:.0f}"),
    ("idle", "---:", lambda r: f"{r['idle_energy_per_request_joules']:.0f}"),
    ("J/output token", "---:", lambda r: f"{r['energy_per_output_token_joules']:.2f}"),
    ("vs baseline", "---:", lambda r: _pct(_cmp(r, "energy_vs_baseline"), signed=True)),
    ("vs oracle", "---:", lambda r: _pct(_cmp(r, "energy_vs_oracle"), signed=True)),
    ("SLO", "---:", lambda r: _pct(r["slo_attainment"], 2)),
    ("TTFT p50/p90/p99 (s)", "---",
     lambda r: f"{_s(r['ttft_p50_seconds'])}/{_s(r['ttft_p90_seconds'])}/{_s(r['ttft_p99_seconds'])}"),
    ("TPOT p50/p90/p99 (ms)", "---",
     lambda r: f"{_ms(r['tpot_p50_seconds'])}/{_ms(r['tpot_p90_seconds'])}/{_ms(r['tpot_p99_seconds'])}"),
    ("quality retained", "---:", lambda r: _pct(_cmp(r, "quality_retained"))),
    ("share to 70B", "---:", lambda r: _pct(_share_70b(r))),
    ("GPU-h busy", "---:", lambda r: f"{r['gpu_hours_busy']:.2f}"),
    ("GPU-h parked", "---:", lambda r: f"{r['gpu_hours_parked']:.2f}"),
]
#: docs/benchmarks.md's table of a cell: the figures a reader compares, energy split in one column
DOC_COLUMNS: list[Column] = [
    ("J/request (dynamic + idle)", "---:", lambda r: f"{r['energy_per_request_joules']:.0f} "
     f"({r['dynamic_energy_per_request_joules']:.0f} + {r['idle_energy_per_request_joules']:.0f})"),
    ("vs baseline", "---:", lambda r: _pct(_cmp(r, "energy_vs_baseline"), signed=True)),
    ("vs oracle", "---:", lambda r: _pct(_cmp(r, "energy_vs_oracle"), signed=True)),
    ("SLO attainment", "---:", lambda r: _pct(r["slo_attainment"], 2)),
    ("TTFT p99 (s)", "---:", lambda r: _s(r["ttft_p99_seconds"])),
    ("TPOT p99 (ms)", "---:", lambda r: _ms(r["tpot_p99_seconds"])),
    ("quality retained", "---:", lambda r: _pct(_cmp(r, "quality_retained"))),
    ("to 70B", "---:", lambda r: _pct(_share_70b(r), 0)),
    ("GPU-h busy / parked", "---:", lambda r: f"{r['gpu_hours_busy']:.2f} / {r['gpu_hours_parked']:.2f}"),
]


def _policy_table(policies: dict[str, dict[str, Any]], columns: list[Column]) -> list[str]:
    """One row per policy of a cell."""
    lines = ["| policy | " + " | ".join(h for h, _, _ in columns) + " |", "|---|" + "".join(a + "|" for _, a, _ in columns)]
    lines += [f"| {name} | " + " | ".join(fn(r) for _, _, fn in columns) + " |" for name, r in policies.items()]
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    st = doc["settings"]
    lines = [
        "# Fleet bench: energy, latency and quality per policy set against the baseline and an oracle (method: simulated)",
        "",
        f"Command: `{doc.get('command', 'wattlane bench fleet')}` (generated {doc['generated_at']}; {doc['run']['wall_seconds']:.0f} s wall"
        + (f", {doc['run']['cpu_seconds']:.0f} CPU-seconds" if "cpu_seconds" in doc["run"] else "")
        + f" for {doc['run']['jobs']} replays on {doc['run']['cpu_cores']} cores, {st['workers']} worker(s)).",
        f"Every figure is simulated (scheduler/sim; docs/sim.md). Window: {st['minutes']:g} virtual minutes per run at every load; seed {st['seed']}.",
        "Energy is the GPU energy of all 8 GPUs over the run (idle included) per completed request; dynamic = drawn while running",
        "batches, idle = drawn with no batch (parked included). SLO attainment: share of all requests with TTFT and TPOT both within",
        "the SLO. Quality retained: label-implied accuracy against the baseline's on the same prompts. Definitions: docs/benchmarks.md.",
        "",
    ]
    for cell in doc["cells"].values():
        lines += [f"## {cell['workload']}, load {cell['load']:g}x", "", *_policy_table(cell["policies"], FULL_COLUMNS), ""]
    if ABLATION_REFERENCE in st["policies"] and any(p not in _NOT_ABLATIONS for p in st["policies"]):
        lines += [f"## What each capability adds (energy per request against `{ABLATION_REFERENCE}`)", "",
                  render_ablations(doc), ""]
    loads = st["loads"]
    mid = 1.0 if 1.0 in loads else loads[len(loads) // 2]
    lines += [f"## Where the energy goes, load {mid:g}x (per model pool)", "",
              "Joules per completed request of the whole run drawn by each pool's GPUs: busy (running batches), idle (no batch,",
              "not parked) and parked (idle at the lowest clock); GPU-seconds in each state; the mean SM clock its batches ran at;",
              "its requests that missed the TTFT or the TPOT target.", "",
              "| workload | policy | pool | GPUs | requests | busy J/req | idle J/req | parked J/req | GPU-s busy/idle/parked | batch clock (MHz) | TTFT / TPOT misses |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for cell in doc["cells"].values():
        if cell["load"] != mid:
            continue
        for name, r in cell["policies"].items():
            for mid_, b in (r.get("by_model") or {}).items():
                clock = b.get("mean_busy_clock_mhz")
                lines.append(f"| {cell['workload']} | {name} | {mid_} | {b['gpus']} | {b['requests']} | {b['busy_joules_per_request']:.0f} | "
                             f"{b['idle_joules_per_request']:.0f} | {b['parked_joules_per_request']:.0f} | "
                             f"{b['busy_seconds']:.0f}/{b['idle_seconds']:.0f}/{b['parked_seconds']:.0f} | "
                             f"{'-' if clock is None else f'{clock:.0f}'} | {b['ttft_misses']} / {b['tpot_misses']} |")
    lines.append("")
    band = doc.get("sensitivity_band") or {}
    if band:
        lines += ["## Sensitivity band (unfitted GPU constants)", "",
                  "The same cells rerun with the simulator's unfitted GPU constants (voltage floor, bandwidth knee, memory-bound SM",
                  "activity) at the low and the high end of their plausible values (benchmarks/power_replay.py, SENSITIVITY_BAND).",
                  "Energy change against the baseline run with the same constants:", "",
                  "| workload | load | policy | low | central | high | range |", "|---|---:|---|---:|---:|---:|---|"]
        for w, b in band.items():
            for p, e in b["policies"].items():
                lo, hi = e.get("low", {}), e.get("high", {})
                cen = e.get("central", {})
                lines.append(f"| {w} | {b['load']:g}x | {p} | {_pct(lo.get('energy_vs_baseline'), signed=True)} | "
                             f"{_pct(cen.get('energy_vs_baseline'), signed=True)} | {_pct(hi.get('energy_vs_baseline'), signed=True)} | "
                             f"{_pct(e['range'][0], signed=True)} to {_pct(e['range'][1], signed=True)} |")
        lines.append("")
    lines += ["Policy sets:", ""]
    for name, p in doc["policy_sets"].items():
        lines.append(f"- `{name}`: {p['label']} (fleet {doc['fleets'][p['fleet']]}).")
    lines.append("")
    return "\n".join(lines)


def _cells_by_workload(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for cell in doc["cells"].values():
        out.setdefault(cell["workload"], []).append(cell)
    for cells in out.values():
        cells.sort(key=lambda c: c["load"])
    return out


def render_ablations(doc: dict[str, Any]) -> str:
    """Each ablation's energy per request against `wattlane` at every load, and SLO attainment with / without it."""
    by_w = _cells_by_workload(doc)
    names = [p for p in doc["settings"]["policies"] if p not in _NOT_ABLATIONS]
    loads = " / ".join(f"{x:g}x" for x in doc["settings"]["loads"])
    lines = ["| capability | " + " | ".join(f"{w} {loads}" for w in by_w) + f" | SLO attainment (with / without), {loads} |",
             "|---|" + "---|" * len(by_w) + "---|"]
    for name in names:
        energy, slo = [], []
        for w, cells in by_w.items():
            parts, slos = [], []
            for c in cells:
                r, ref = c["policies"].get(name), c["policies"].get(ABLATION_REFERENCE)
                if r is None or ref is None:
                    parts.append("-")
                    slos.append("-")
                    continue
                parts.append(_pct(energy_change(r, ref), signed=True))
                slos.append(f"{_points(r['slo_attainment'])} vs {_points(ref['slo_attainment'])}")
            energy.append(" / ".join(parts))
            slo.append(f"{w}: " + " / ".join(slos))
        lines.append(f"| {name} | " + " | ".join(energy) + " | " + "; ".join(slo) + " |")
    return "\n".join(lines)


def render_cells(doc: dict[str, Any]) -> str:
    """Every (workload, load) cell: energy split as dynamic + idle, against the baseline and the oracle."""
    lines: list[str] = []
    for cells in _cells_by_workload(doc).values():
        for c in cells:
            pol = c["policies"]
            first = pol.get("baseline") or next(iter(pol.values()))
            lines += [f"#### {c['workload']}, load {c['load']:g}x ({first['requests']} requests)", "",
                      *_policy_table(pol, DOC_COLUMNS), ""]
    return "\n".join(lines).rstrip("\n")


def render_band(doc: dict[str, Any]) -> str:
    """The sensitivity band: each policy's energy change against the baseline run with the same constants."""
    lines = ["| workload | load | policy | low end | central | high end |", "|---|---:|---|---:|---:|---:|"]
    for w, b in (doc.get("sensitivity_band") or {}).items():
        for p, e in b["policies"].items():
            ends = []
            for end in ("low", "central", "high"):
                x = e.get(end) or {}
                slo = x.get("slo_attainment")
                ends.append(f"{_pct(x.get('energy_vs_baseline'), signed=True)}"
                            + ("" if slo is None else f" ({_pct(slo, 2)} SLO)"))
            lines.append(f"| {w} | {b['load']:g}x | {p} | " + " | ".join(ends) + " |")
    return "\n".join(lines)


def render_doc_blocks(doc: dict[str, Any]) -> dict[str, str]:
    """The DOC_BLOCKS of docs/benchmarks.md, rendered from a results document."""
    return {"ablations": render_ablations(doc), "cells": render_cells(doc), "band": render_band(doc)}


def _block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- fleet-bench:{name} -->\n)(.*?)(\n<!-- /fleet-bench:{name} -->)", re.S)


def doc_block(text: str, name: str) -> str:
    """The content of block `name` in a document's text."""
    m = _block_pattern(name).search(text)
    if m is None:
        raise DocBlockError(f"no block '{name}': it lies between '<!-- fleet-bench:{name} -->' and "
                            f"'<!-- /fleet-bench:{name} -->', each on a line of its own")
    return m.group(2)


def sync_doc_blocks(text: str, blocks: dict[str, str]) -> str:
    """`text` with each named block's content replaced; DocBlockError when a block's markers are missing."""
    for name, content in blocks.items():
        doc_block(text, name)  # raises when absent
        text = _block_pattern(name).sub(lambda m, c=content: m.group(1) + c + m.group(3), text, count=1)
    return text


def render_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """energy-vs-load.png, slo-vs-load.png and energy-breakdown.png (at load 1 or the middle load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = doc["settings"]["workloads"]
    loads = doc["settings"]["loads"]
    policies = doc["settings"]["policies"]
    paths = []
    for metric, fname, ylabel, scale in (("energy_per_request_joules", "energy-vs-load.png", "J per request (simulated)", 1.0),
                                         ("slo_attainment", "slo-vs-load.png", "SLO attainment (%)", 100.0)):
        fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
        for ax, w in zip(axes[0], workloads):
            for p in policies:
                xs, ys = [], []
                for x in loads:
                    r = doc["cells"].get(f"{w}@{x:g}", {}).get("policies", {}).get(p)
                    if r is not None and r[metric] is not None:  # a window with no request has no SLO attainment
                        xs.append(x)
                        ys.append(r[metric] * scale)
                ax.plot(xs, ys, marker="o", label=p, linestyle="--" if p == "oracle" else "-")
            ax.set_title(w)
            ax.set_xlabel("load (x recorded rate)")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.set_xticks(loads, [f"{x:g}x" for x in loads])
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    mid = 1.0 if 1.0 in loads else loads[len(loads) // 2]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        pol = doc["cells"].get(f"{w}@{mid:g}", {}).get("policies", {})
        names = [p for p in policies if p in pol]
        dyn = [pol[p]["dynamic_energy_per_request_joules"] for p in names]
        idle = [pol[p]["idle_energy_per_request_joules"] for p in names]
        ax.bar(names, dyn, label="dynamic (running batches)")
        ax.bar(names, idle, bottom=dyn, label="idle (incl. parked)")
        ax.set_title(f"{w}, load {mid:g}x")
        ax.set_ylabel("J per request (simulated)")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "energy-breakdown.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths

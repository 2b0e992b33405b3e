"""Renders a fleet-bench result document (scheduler.sim.bench) as Markdown tables and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.{digits}f}%" if signed else f"{100 * x:.{digits}f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


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
    for key, cell in doc["cells"].items():
        pol = cell["policies"]
        lines += [f"## {cell['workload']}, load {cell['load']:g}x", "",
                  "| policy | J/request | dynamic | idle | J/output token | vs baseline | vs oracle | SLO | TTFT p50/p90/p99 (s) | TPOT p50/p90/p99 (ms) | quality retained | share to 70B | GPU-h busy | GPU-h parked |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
        for name, r in pol.items():
            c = r.get("comparison", {})
            share = r["share_by_model"].get("llama-3.1-70b")
            lines.append(
                f"| {name} | {r['energy_per_request_joules']:.0f} | {r['dynamic_energy_per_request_joules']:.0f} | "
                f"{r['idle_energy_per_request_joules']:.0f} | {r['energy_per_output_token_joules']:.2f} | "
                f"{_pct(c.get('energy_vs_baseline'), signed=True)} | {_pct(c.get('energy_vs_oracle'), signed=True)} | "
                f"{_pct(r['slo_attainment'], 2)} | {_s(r['ttft_p50_seconds'])}/{_s(r['ttft_p90_seconds'])}/{_s(r['ttft_p99_seconds'])} | "
                f"{_ms(r['tpot_p50_seconds'])}/{_ms(r['tpot_p90_seconds'])}/{_ms(r['tpot_p99_seconds'])} | "
                f"{_pct(c.get('quality_retained'))} | {_pct(share)} | {r['gpu_hours_busy']:.2f} | {r['gpu_hours_parked']:.2f} |"
            )
        lines.append("")
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
                    if r is not None:
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

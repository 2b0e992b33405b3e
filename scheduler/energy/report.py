"""Energy reports from the ledger (`wattlane report`): totals, breakdowns, savings, carbon, charts; md, html or csv.

Every figure comes from the same ledger queries as the HTTP reports (Ledger.summary and totals behind
GET /v1/energy/summary, Ledger.method_breakdown behind /v1/energy/methods), so a report and the
summary of the same window agree to the last digit (tests/unit/energy/test_report.py checks it).
Charts are PNG (matplotlib, the [report] extra): files beside a markdown report, embedded as base64
in an HTML one, so the HTML report is one self-contained file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from scheduler.energy.ledger import Ledger

ReportGroup = Literal["team", "key", "model", "device"]
ReportFormat = Literal["md", "html", "csv"]
#: the report's --group-by names -> the ledger's group_by names
GROUP_BY = {"team": "team", "key": "api_key", "model": "model", "device": "device"}
#: the summary figures a report shows per group, in column order (the keys of Ledger.summary rows)
FIGURES = ("requests", "requests_with_energy", "joules", "dynamic_joules", "idle_joules", "gco2e", "prompt_tokens",
           "completion_tokens", "tokens_per_joule", "requests_with_baseline", "baseline_joules", "saved_joules",
           "saved_gco2e", "saved_fraction")


def parse_time(value: str | float | None) -> float | None:
    """Unix seconds or ISO 8601 (naive means UTC) -> unix seconds; None or "" -> None; ValueError otherwise."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):  # SQLite binds NaN as NULL: the window would match nothing, silently
            raise ValueError(f"must be a finite time (unix seconds or ISO 8601), not {value!r}")
        return seconds
    try:
        dt = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"must be unix seconds or ISO 8601 (e.g. 2026-11-23T15:00:00Z), not {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@dataclass
class Report:
    """One window's figures, ready to render."""

    since: float | None
    until: float | None
    group_by: str  # the ledger's name (team, api_key, model, device)
    totals: dict[str, Any]
    groups: list[dict[str, Any]]
    hours: list[dict[str, Any]]
    #: joules, gCO2e and requests per (carbon source, region)
    carbon: list[dict[str, Any]] = field(default_factory=list)
    #: joules and requests per energy method (measured, estimated, simulated, none)
    methods: list[dict[str, Any]] = field(default_factory=list)
    #: requests and saved joules per baseline method
    baselines: list[dict[str, Any]] = field(default_factory=list)
    generated_unix_s: float = 0.0

    def window_text(self) -> str:
        def t(x: float | None, open_end: str) -> str:
            return open_end if x is None else _iso(x)
        return f"{t(self.since, 'the first row')} to {t(self.until, 'the last row')} (UTC, until exclusive)"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(ledger: Ledger, group_by: ReportGroup, *, since: float | None = None, until: float | None = None,
                 now_s: float | None = None) -> Report:
    """Read one window's figures from the ledger (the summary route's queries, nothing of its own)."""
    grp = GROUP_BY[group_by]
    window = {"since": since, "until": until}
    carbon: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"requests": 0, "joules": 0.0, "gco2e": 0.0})
    methods: dict[tuple[str, str, str], dict[str, float]] = defaultdict(lambda: {"requests": 0, "joules": 0.0})
    for r in ledger.method_breakdown(grp, **window):
        c = carbon[(r["carbon_source"] or "none", r["carbon_region"] or "")]
        m = methods[(r["method_kind"], r["energy_method"] or "", r["energy_scope"] or "")]
        for acc in (c, m):
            acc["requests"] += r["requests"]
            acc["joules"] += r["joules"]
        c["gco2e"] += r["gco2e"]
    return Report(
        since=since, until=until, group_by=grp,
        totals=ledger.totals(**window),
        groups=ledger.summary(grp, **window),
        hours=ledger.summary("hour", **window),
        carbon=[{"carbon_source": s, "carbon_region": reg, **v} for (s, reg), v in sorted(carbon.items())],
        methods=[{"method_kind": k, "energy_method": em, "energy_scope": sc, **v}
                 for (k, em, sc), v in sorted(methods.items(), key=lambda kv: -kv[1]["joules"])],
        baselines=ledger.baseline_methods(**window),
        generated_unix_s=now_s if now_s is not None else datetime.now(timezone.utc).timestamp(),
    )


# --- csv -------------------------------------------------------------------------------------------

def render_csv(report: Report) -> str:
    """One row per group, then a total row; figures as the summary route returns them (repr floats)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", report.group_by, *FIGURES])
    for g in report.groups:
        w.writerow(["group", g[report.group_by], *(_csv_value(g[f]) for f in FIGURES)])
    w.writerow(["total", "", *(_csv_value(report.totals[f]) for f in FIGURES)])
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


# --- figures as text -------------------------------------------------------------------------------

def fmt_joules(j: float | None) -> str:
    if j is None:
        return "n/a"
    a = abs(j)
    for scale, unit in ((1e9, "GJ"), (1e6, "MJ"), (1e3, "kJ")):
        if a >= scale:
            return f"{j / scale:.4g} {unit}"
    return f"{j:.4g} J"


def fmt_num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


_GROUP_TITLES = {"team": "Team", "api_key": "API key", "model": "Model", "device": "Device"}


def _tables(report: Report) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table, shared by the markdown and HTML renderers."""
    t = report.totals
    name = _GROUP_TITLES[report.group_by]
    totals = ("Totals", ["Figure", "Value"], [
        ["Requests", f"{t['requests']} ({t['requests'] - t['requests_with_energy']} without an energy figure)"],
        ["Energy", f"{fmt_joules(t['joules'])} ({fmt_num(t['joules'] / 3.6e6)} kWh; "
                   f"dynamic {fmt_joules(t['dynamic_joules'])}, idle share {fmt_joules(t['idle_joules'])})"],
        ["Carbon", f"{fmt_num(t['gco2e'])} g CO2e"],
        ["Tokens", f"{t['prompt_tokens']} prompt + {t['completion_tokens']} completion"],
        ["Tokens per joule", fmt_num(t["tokens_per_joule"])],
        ["Baseline (estimate)", f"{fmt_joules(t['baseline_joules'])} for {t['requests_with_baseline']} requests"],
        ["Saved (estimate)", f"{fmt_joules(t['saved_joules'])} ({fmt_pct(t['saved_fraction'])} of the baseline), "
                             f"{fmt_num(t['saved_gco2e'])} g CO2e"],
    ], "")
    groups = (f"Per {name.lower()}", [name, "Requests", "Energy", "Idle share", "g CO2e", "Tokens", "Tokens/J",
                                      "Baseline (est.)", "Saved (est.)", "Saved %"],
              [[g[report.group_by] or "(none)", str(g["requests"]), fmt_joules(g["joules"]),
                fmt_joules(g["idle_joules"]), fmt_num(g["gco2e"]), str(g["prompt_tokens"] + g["completion_tokens"]),
                fmt_num(g["tokens_per_joule"]),
                fmt_joules(g["baseline_joules"]), fmt_joules(g["saved_joules"]), fmt_pct(g["saved_fraction"])]
               for g in report.groups],
              "Baseline and savings are estimates (see How the figures were obtained).")
    carbon = ("Carbon by source and region", ["Source", "Region", "Requests", "Energy", "g CO2e"],
              [[c["carbon_source"], c["carbon_region"] or "-", str(c["requests"]), fmt_joules(c["joules"]),
                fmt_num(c["gco2e"])] for c in report.carbon], "")
    methods = ("How the energy was obtained", ["Kind", "Method", "Scope", "Requests", "Energy"],
               [[m["method_kind"], m["energy_method"] or "-", m["energy_scope"] or "-", str(m["requests"]),
                 fmt_joules(m["joules"])] for m in report.methods],
               "measured: nvml-counter, rapl; estimated: cpu-estimate and other named estimates; simulated: the "
               "simulator; none: the request has no energy figure (counted, never as 0 J).")
    baselines = ("How the savings were estimated", ["Baseline method", "Requests", "Baseline", "Saved"],
                 [[b["baseline_method"] or "-", str(b["requests"]), fmt_joules(b["baseline_joules"]),
                   fmt_joules(b["saved_joules"])] for b in report.baselines],
                 "Baseline: the largest model that could serve each request, at the power settings in force "
                 "(docs/energy.md, Savings). largest-model/replica-stats scales the request's own joules by the "
                 "two models' published joules per token; largest-model/size-prior by the size prior; "
                 "largest-model/served: it ran on the baseline model; largest-model/cascade-repeat: a cascade's "
                 "second attempt, and largest-model/retried-attempt: the work of an attempt that failed before "
                 "the request was retried, whose joules are all extra.")
    return [totals, groups, carbon, methods, baselines]


# --- charts ----------------------------------------------------------------------------------------

def charts(report: Report) -> dict[str, bytes]:
    """PNG charts by file name (energy vs baseline per group, tokens per joule, carbon, energy per hour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    names = [g[report.group_by] or "(none)" for g in report.groups]

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()

    if names:
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [g["joules"] for g in report.groups], 0.4, label="energy used")
        ax.bar([x + 0.2 for x in xs], [g["baseline_joules"] for g in report.groups], 0.4, label="baseline (estimate)",
               hatch="//", fill=False)
        ax.set_xticks(list(xs), names, rotation=20, ha="right")
        ax.set_ylabel("joules")
        ax.set_title(f"Energy used and its baseline, per {_GROUP_TITLES[report.group_by].lower()}")
        ax.legend()
        save(fig, "energy-vs-baseline.png")

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, [g["tokens_per_joule"] or 0.0 for g in report.groups])
        ax.set_ylabel("tokens per joule")
        ax.set_title(f"Tokens per joule, per {_GROUP_TITLES[report.group_by].lower()}")
        ax.tick_params(axis="x", rotation=20)
        save(fig, "tokens-per-joule.png")
    if report.carbon:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{c['carbon_source']} {c['carbon_region']}".strip() for c in report.carbon]
        ax.barh(labels, [c["gco2e"] for c in report.carbon])
        ax.set_xlabel("g CO2e")
        ax.set_title("Carbon by intensity source and region")
        save(fig, "carbon-by-source.png")
    if report.hours:
        from datetime import timedelta

        fig, ax = plt.subplots(figsize=(8, 4))
        # each hour's bar is centred on its half hour; the baseline is a dash over the same bar
        centres = [datetime.fromisoformat(h["hour"].replace("Z", "+00:00")) + timedelta(minutes=30)
                   for h in report.hours]
        ax.bar(centres, [h["joules"] for h in report.hours], width=0.8 / 24, label="energy used")
        ax.plot(centres, [h["baseline_joules"] for h in report.hours], linestyle="none", marker="_", markersize=28,
                markeredgewidth=2.5, color="black", label="baseline (estimate)")
        ax.set_xlim(min(centres) - timedelta(hours=1), max(centres) + timedelta(hours=1))
        ax.set_ylim(bottom=0)
        ax.set_ylabel("joules")
        ax.set_title("Energy per hour (UTC)")
        ax.legend()
        fig.autofmt_xdate()
        save(fig, "energy-per-hour.png")
    return out


# --- markdown and html -----------------------------------------------------------------------------

_INTRO = ("Energy is attributed per request from metered (or, where labelled, estimated or simulated) device "
          "energy; carbon = joules / 3.6e6 x PUE x grid intensity. Baseline and savings are estimates.")


CHART_ORDER = ("energy-vs-baseline.png", "tokens-per-joule.png", "carbon-by-source.png", "energy-per-hour.png")


def render_markdown(report: Report, chart_dir_name: str | None = None, chart_names: tuple[str, ...] = ()) -> str:
    """Markdown; charts are linked as <chart_dir_name>/<name> (files write_report puts there)."""
    lines = [f"# Wattlane energy report, per {_GROUP_TITLES[report.group_by].lower()}", "",
             f"Window: {report.window_text()}. Generated {_iso(report.generated_unix_s)}.", "", _INTRO, ""]
    for title, header, rows, note in _tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += [""] + ([note, ""] if note else [])
    if chart_dir_name is not None and chart_names:
        lines += ["## Charts", ""]
        lines += [f"![{n.removesuffix('.png').replace('-', ' ')}]({chart_dir_name}/{n})"
                  for n in CHART_ORDER if n in chart_names]
        lines.append("")
    return "\n".join(lines)


def render_html(report: Report, drawn: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML file: inline CSS, charts as base64 PNG data URLs, nothing fetched."""
    e = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Wattlane energy report, per {e(_GROUP_TITLES[report.group_by].lower())}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #bbb;padding:.25rem .5rem;"
             "text-align:left}td{font-variant-numeric:tabular-nums}img{max-width:100%}</style></head><body>",
             f"<h1>Wattlane energy report, per {e(_GROUP_TITLES[report.group_by].lower())}</h1>",
             f"<p>Window: {e(report.window_text())}. Generated {e(_iso(report.generated_unix_s))}.</p>",
             f"<p>{e(_INTRO)}</p>"]
    for title, header, rows, note in _tables(report):
        parts.append(f"<h2>{e(title)}</h2><table><caption>{e(title)}</caption><thead><tr>"
                     + "".join(f"<th scope=\"col\">{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>" + (f"<p>{e(note)}</p>" if note else ""))
    if drawn:
        parts.append("<h2>Charts</h2>")
        for n in CHART_ORDER:
            if n in drawn:
                data = base64.b64encode(drawn[n]).decode("ascii")
                parts.append(f'<figure><img alt="{e(n.removesuffix(".png"))}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{e(n.removesuffix('.png').replace('-', ' '))}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, fmt: ReportFormat, out: Path, *, with_charts: bool = True) -> list[Path]:
    """Write the report (and, for markdown, its PNG charts in <out stem>-charts/); returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    if fmt == "csv":
        out.write_text(render_csv(report), encoding="utf-8")
        return written
    drawn = charts(report) if with_charts else {}
    if fmt == "html":
        out.write_text(render_html(report, drawn), encoding="utf-8")
        return written
    chart_dir = out.parent / f"{out.stem}-charts"
    if drawn:
        chart_dir.mkdir(exist_ok=True)
        for name, png in drawn.items():
            (chart_dir / name).write_bytes(png)
            written.append(chart_dir / name)
    out.write_text(render_markdown(report, chart_dir.name, tuple(drawn)), encoding="utf-8")
    return written

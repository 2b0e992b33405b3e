"""The `wattlane simulate` command: replay a trace through a simulated fleet in virtual time and report energy and latency."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import typer


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"'{item}' is not key=value", param_hint="--power-option")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _positive(value: float | None, option: str) -> None:
    # typer's min= is inclusive and lets nan and inf through; a zero would divide, a nan turn every figure nan
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a positive finite number, got {value:g}", param_hint=option)


def check_output_file(path: Path, option: str) -> None:
    """Exit 2 on a path that cannot be written as a file, before the replay rather than after it."""
    problem = None
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if path.is_dir():
        problem = f"{path} is a directory; give a file path, e.g. {path / 'result.json'}"
    elif parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK)):
        problem = f"{path} cannot be written: {parent} is not a writable directory"
    if problem:
        # an error line rather than BadParameter's box, which wraps a long path across lines
        typer.echo(f"error: {option} {problem}", err=True)
        raise typer.Exit(2)


def run_simulation(
    trace_path: Path,
    config_path: Path,
    *,
    seed: int = 0,
    minutes: float | None = None,
    speedup: float = 1.0,
    model: str | None = None,
    placement: str | None = None,
    power_policy: str | None = None,
    power_options: dict | None = None,
    governor_factory: str | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    timeline_interval_seconds: float = 60.0,
    auto_selection: str = "route",
    min_quality: float | None = None,
) -> dict:
    """Everything `wattlane simulate` does, minus printing; returns FleetResult.summary().

    model: every request's model id or 'auto', over the trace's Model column; None: that column where the trace has
    one, else 'auto'.
    """
    from scheduler.config import load_config
    from scheduler.sim.fleet import FleetSimulator
    from scheduler.sim.hooks import resolve_governor, resolve_placement
    from scheduler.sim.trace import load_trace

    for value, option in ((minutes, "--minutes"), (speedup, "--speedup"), (slo_ttft_ms, "--slo-ttft-ms"),
                          (slo_tpot_ms, "--slo-tpot-ms"), (timeline_interval_seconds, "--timeline-interval")):
        _positive(value, option)
    if seed < 0:  # numpy seeds only with non-negative integers
        raise typer.BadParameter(f"must be 0 or more, got {seed}", param_hint="--seed")
    config = load_config(config_path)
    if model not in (None, "auto") and model not in {m.id for m in config.models}:
        raise typer.BadParameter(f"{model!r} is not a model of {config_path} ({', '.join(m.id for m in config.models)}); "
                                 "give one of them, or 'auto'", param_hint="--model")
    trace = load_trace(trace_path).window(minutes, speedup)

    def factory(cfg, devices, clock):
        return resolve_governor(cfg, devices, clock, policy=power_policy, options=power_options, factory=governor_factory)

    sim = FleetSimulator(
        config, placement=resolve_placement(placement, seed=seed), governor_factory=factory, seed=seed, model=model,
        slo_ttft_seconds=None if slo_ttft_ms is None else slo_ttft_ms / 1000,
        slo_tpot_seconds=None if slo_tpot_ms is None else slo_tpot_ms / 1000,
        timeline_interval_seconds=timeline_interval_seconds, auto_selection=auto_selection, min_quality=min_quality,
    )
    summary = sim.run(trace).summary()
    summary["settings"].update({
        "trace": str(trace_path), "config": str(config_path), "minutes": minutes, "speedup": speedup,
        "placement": placement or "round-robin", "power_policy": power_policy or "config", "power_options": power_options or {},
    })
    return summary


def _routing_rows(r: dict, f) -> list[tuple[str, str]]:
    if not r:
        return []
    from scheduler.cli_text import escape

    shares = escape(", ".join(f"{m} {n}" for m, n in r["requests_by_model"].items()))  # rows are printed as markup
    return [
        (f"model selection (quality target {r['min_quality']:g})", shares),
        ("share sent to the large model", f(r["large_model_share"], "{:.1%}")),
        ("label-implied accuracy (held-out prompts)", f(r["label_accuracy"], "{:.1%}")),
        ("route() time mean / p99 (ms)", f"{r['route_seconds_mean'] * 1000:.3f} / {r['route_seconds_p99'] * 1000:.3f}"),
    ]


def print_summary(s: dict) -> None:
    from rich.console import Console
    from scheduler.cli_text import escape
    from rich.table import Table

    con = Console()

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    t = Table(title=f"Wattlane simulation (method: simulated) - {s['requests']} requests, {s['virtual_seconds']:.0f} s virtual, {s['wall_seconds']:.1f} s wall")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("completed / rejected", f"{s['completed']} / {s['rejected']}"),
        ("GPU energy (kJ)", f(s["energy_joules"] / 1000, "{:.1f}")),
        ("energy per request (J)", f(s["energy_per_request_joules"], "{:.1f}")),
        ("output tokens per joule", f(s["tokens_per_joule"], "{:.3f}")),
        ("TTFT p50 / p90 / p99 (s)", " / ".join(f(s[k]) for k in ("ttft_p50_seconds", "ttft_p90_seconds", "ttft_p99_seconds"))),
        ("TPOT p50 / p90 / p99 (ms)", " / ".join(f(None if s[k] is None else s[k] * 1000, "{:.1f}") for k in ("tpot_p50_seconds", "tpot_p90_seconds", "tpot_p99_seconds"))),
        (f"SLO attainment (TTFT <= {s['slo']['ttft_seconds']:g} s, TPOT <= {s['slo']['tpot_seconds'] * 1000:g} ms)", f(s["slo_attainment"], "{:.2%}")),
        ("preemptions", str(s["preemptions"])),
        *_routing_rows(s.get("routing") or {}, f),
        ("governor steps", str(s["governor_steps"])),
    ]
    for r in rows:
        t.add_row(*r)
    con.print(t)
    d = Table(title="Per-device power timeline (interval means)")
    for c in ("device", "profile", "energy kJ", "mean W", "min W", "max W", "final limit W", "clock lock"):
        d.add_column(c, justify="right" if c not in ("device", "profile") else "left")
    for dev, v in s["devices"].items():
        d.add_row(escape(dev), escape(v["profile"]), f(v["energy_joules"] / 1000, "{:.1f}"), f(v["mean_power_watts"], "{:.0f}"),
                  f(v["min_interval_power_watts"], "{:.0f}"), f(v["max_interval_power_watts"], "{:.0f}"),
                  f(v["power_limit_watts_final"], "{:.0f}"), str(v["locked_clocks_mhz_final"] or "-"))
    con.print(d)


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        trace: Optional[Path] = typer.Option(None, "--trace", help="request trace CSV, plain or .gz (Azure format: TIMESTAMP, ContextTokens, GeneratedTokens[, Model]); default: the packaged Azure LLM 2023 conversation trace"),
        config: Optional[Path] = typer.Option(None, "--config", help="Wattlane config with simulated devices and models; default: the packaged sim-fleet.yaml (8 simulated H100, 4x Llama-3.1-8B + 1x Llama-3.1-70B)"),
        json_path: Optional[Path] = typer.Option(None, "--json", help="also write the full result (with the per-device timeline) as JSON"),
        seed: int = typer.Option(0, "--seed", min=0, help="seed for every random choice (placement ties, round-robin start)"),
        minutes: Optional[float] = typer.Option(None, "--minutes", help="replay only the first M minutes of the trace (> 0)"),
        speedup: float = typer.Option(1.0, "--speedup", "--rate-scale", help="divide inter-arrival times by X (2 = twice the traffic; > 0)"),
        model: Optional[str] = typer.Option(None, "--model", help="model id for every request, or 'auto' (model selection by the router, see --auto-selection); "
                                            "overrides the trace's Model column (default: that column where the trace has one, else auto)"),
        placement: Optional[str] = typer.Option(None, "--placement", help="round-robin (default), energy (the router's own placement), or module:attribute"),
        auto_selection: str = typer.Option("route", "--auto-selection", help="route: the gateway's model selection + placement with prompts from the held-out routing split; placement-only: the placement hook chooses among every replica (no model selection)"),
        min_quality: Optional[float] = typer.Option(None, "--min-quality", min=0.0, max=1.0, help="quality target for model selection (default: routing.default_min_quality of the config)"),
        power_policy: Optional[str] = typer.Option(None, "--power-policy", help="override config.power: none, static, slo-feedback, budget, carbon-aware, parking"),
        power_option: list[str] = typer.Option([], "--power-option", help="policy option key=value (JSON values), repeatable"),
        governor: Optional[str] = typer.Option(None, "--governor", help="module:attribute factory(config, devices, clock) replacing the built-in governor"),
        slo_ttft_ms: Optional[float] = typer.Option(None, "--slo-ttft-ms", help="TTFT target in ms (> 0; default: the config's routing.default_slo)"),
        slo_tpot_ms: Optional[float] = typer.Option(None, "--slo-tpot-ms", help="TPOT target in ms (> 0; default: the config's routing.default_slo)"),
        timeline_interval: float = typer.Option(60.0, "--timeline-interval", help="seconds per power-timeline sample (> 0)"),
    ) -> None:
        """Replay a trace through a simulated fleet in virtual time (every figure is method 'simulated')."""
        from scheduler import datafiles
        from scheduler.config import ConfigError
        from scheduler.sim.hooks import HookError
        from scheduler.sim.profiles import ProfileError
        from scheduler.sim.prompts import PromptPoolError
        from scheduler.sim.trace import TraceError
        from scheduler.sim.fleet import AUTO_SELECTIONS, ReplayTooLongError

        if auto_selection not in AUTO_SELECTIONS:
            raise typer.BadParameter(f"must be one of {', '.join(AUTO_SELECTIONS)}", param_hint="--auto-selection")
        if json_path is not None:
            check_output_file(json_path, "--json")

        try:
            summary = run_simulation(
                trace or datafiles.conversation_trace(), config or datafiles.sim_fleet_config(), seed=seed, minutes=minutes, speedup=speedup, model=model, placement=placement,
                power_policy=power_policy, power_options=_parse_options(power_option), governor_factory=governor,
                slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, timeline_interval_seconds=timeline_interval,
                auto_selection=auto_selection, min_quality=min_quality,
            )
        except (ConfigError, TraceError, ProfileError, HookError, PromptPoolError, datafiles.DataFileError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except ReplayTooLongError as exc:
            typer.echo(f"error: {exc}; raise --speedup or --timeline-interval, or replay fewer --minutes", err=True)
            raise typer.Exit(2) from None
        print_summary(summary)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            typer.echo(f"wrote {json_path}")

"""The fleet bench: replay workloads at several loads under named policy sets on the same simulated GPUs, against a baseline and an oracle.

One run of `wattlane bench fleet` replays each workload (the recorded Azure conversation trace and
the generated prompt-heavy trace, scheduler.sim.workloads) at each load level under every policy
set in POLICY_SETS, all on the same 8 simulated H100 GPUs (two fleet shapes: 2x Llama-3.1-70B TP4,
or 4x Llama-3.1-8B + 1x Llama-3.1-70B TP4), through scheduler.sim.fleet.FleetSimulator, the same
replay code `wattlane simulate` and the benchmarks use. Every figure is method "simulated".

Load levels scale the arrival rate over a window of the same virtual length: load x over a window of
M minutes replays the first x M minutes of the conversation trace with inter-arrival times divided
by x, and generates M minutes of prompt-heavy traffic at x times its base rate.

The oracle (policy "oracle") is the practical bound, computed greedily per request in arrival order:
it knows, from the prompt's correctness labels, whether the small model answers as well as the large
one (weak correct, or strong wrong too), and it knows each request's true prompt and output length;
it sees the live state of every replica (queue, batch, settings) from the simulator, and picks,
with the router's own placement predictions, the model and replica with the lowest predicted energy
among those adequate that are predicted to meet the SLO. Device settings come from the same governor
and parking as full Wattlane. What it ignores: future arrivals (no look-ahead, no deliberate
batching or delaying), the errors of the placement model's predictions, and quality traded below
the large model's (it never sends a request the small model would get wrong and the large one
right). A policy that gives up quality, or that plans ahead, can therefore use less energy.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.sim.bench_report import energy_change

LARGE, SMALL = "llama-3.1-70b", "llama-3.1-8b"
FLEETS = {"large": "sim-fleet-70b.yaml", "mixed": "sim-fleet.yaml"}
WORKLOADS = ("conversation", "prompt-heavy")
DEFAULT_LOADS = (0.5, 1.0, 2.0)
DEFAULT_MINUTES = 10.0
#: prompt-heavy traffic at load 1: this many times the Azure coding trace's recorded 2.57 requests/s, the rate at
#: which the baseline holds 99% SLO attainment on the simulated node (at 1x it holds 98%, at 2x 44%; docs/benchmarks.md)
PROMPT_HEAVY_RATE_SCALE = 0.5
#: parking: a replica with no work for this long locks its GPUs to the lowest clock
PARK_IDLE_SECONDS = 2.0
#: the sensitivity band's runs: these policies at load 1 on both workloads
BAND_POLICIES = ("baseline", "wattlane", "wattlane-all-governor", "wattlane-all", "oracle")


@dataclass(frozen=True)
class PolicySet:
    name: str
    label: str
    fleet: str  # key of FLEETS
    model: str  # LARGE or "auto"
    placement: str  # "round-robin" or "energy"
    governor: bool = False  # slo-feedback on every GPU
    park: bool = False
    quality_budget: bool = False
    #: the quality budget's ranking (scheduler.routing.quality_budget.RANKS; the config's default)
    budget_rank: str = "gain-per-joule"
    slo_batching: bool = False
    batch_clocks: bool = False  # the engine sets the clock per batch (replaces the governor's clock lock)
    oracle: bool = False
    #: with oracle: how it picks among the adequate models that meet the SLO (FleetSimulator.oracle_model_choice)
    oracle_model_choice: str = "lowest-energy"
    pools: bool = False  # GPUs move between the 8B and the 70B pool with the load (scheduler/sim/pools.py)
    #: what routing is told of output lengths (scheduler.sim.fleet.OUTPUT_LENGTHS)
    output_lengths: str = "known"


POLICY_SETS: tuple[PolicySet, ...] = (
    PolicySet("baseline", "baseline: 2x 70B, round-robin, default power", "large", LARGE, "round-robin"),
    PolicySet("routing", "routing only (model selection, round-robin)", "mixed", "auto", "round-robin"),
    PolicySet("placement", "placement only (2x 70B, energy placement)", "large", LARGE, "energy"),
    PolicySet("governor", "governor only (2x 70B, slo-feedback)", "large", LARGE, "round-robin", governor=True),
    PolicySet("wattlane", "Wattlane: routing + placement + governor", "mixed", "auto", "energy", governor=True),
    PolicySet("wattlane+park", "Wattlane + parking", "mixed", "auto", "energy", governor=True, park=True),
    PolicySet("wattlane+budget", "Wattlane + quality budget", "mixed", "auto", "energy", governor=True, quality_budget=True),
    PolicySet("wattlane+slo-batching", "Wattlane + SLO-aware batching", "mixed", "auto", "energy", governor=True, slo_batching=True),
    PolicySet("wattlane+batch-clocks", "Wattlane with per-batch clocks instead of the slo-feedback governor", "mixed", "auto", "energy",
              batch_clocks=True),
    PolicySet("wattlane-all-governor", "Wattlane + parking, quality budget, SLO-aware batching, slo-feedback governor", "mixed", "auto",
              "energy", governor=True, park=True, quality_budget=True, slo_batching=True),
    PolicySet("wattlane-all", "full Wattlane (+ parking, quality budget by gain per joule, SLO-aware batching, per-batch clocks)",
              "mixed", "auto", "energy",
              park=True, quality_budget=True, slo_batching=True, batch_clocks=True),
    PolicySet("wattlane-all+pools", "full Wattlane + pools that follow the load (8B GPUs lent to a second 70B replica)",
              "mixed", "auto", "energy", park=True, quality_budget=True, slo_batching=True, batch_clocks=True, pools=True),
    PolicySet("wattlane-all-by-gain", "full Wattlane, quality budget ranked by predicted gain alone", "mixed", "auto", "energy",
              park=True, quality_budget=True, budget_rank="gain", slo_batching=True, batch_clocks=True),
    PolicySet("wattlane-all-blind", "full Wattlane, output lengths not known to routing (running mean)", "mixed", "auto",
              "energy", park=True, quality_budget=True, slo_batching=True, batch_clocks=True, output_lengths="running-mean"),
    PolicySet("oracle", "oracle (true adequacy and lengths, greedy)", "mixed", "auto", "energy", park=True,
              slo_batching=True, batch_clocks=True, oracle=True),
    PolicySet("perfect-predictor", "full Wattlane's routing rule with a perfect predictor (true adequacy, the smallest "
              "adequate model, no quality budget)", "mixed", "auto", "energy", park=True, slo_batching=True,
              batch_clocks=True, oracle=True, oracle_model_choice="smallest"),
)
POLICIES = {p.name: p for p in POLICY_SETS}


class BenchError(ValueError):
    """Bad bench arguments; the message says which and how to fix them."""


@dataclass(frozen=True)
class Job:
    workload: str
    load: float
    policy: str
    minutes: float
    seed: int
    band: str | None = None  # None: central constants; "low" / "high": SENSITIVITY_BAND end
    clock_switch_seconds: float | None = None  # per-batch clocks: stall per clock change (None: the core's default)
    #: the routed policies' quality threshold (None: the fleet config's routing.default_min_quality)
    min_quality: float | None = None
    #: the quality budget's prompt_token_weight (None: the size prior's)
    budget_prompt_weight: float | None = None


def build_trace(workload: str, load: float, minutes: float, seed: int):
    """The requests of one (workload, load) cell: the same for every policy."""
    from scheduler.datafiles import conversation_trace
    from scheduler.sim.workloads import prompt_heavy_trace

    if workload == "conversation":
        full = _conversation(str(conversation_trace()))
        if minutes * load > 60.0 + 1e-9:
            raise BenchError(f"load {load:g} x {minutes:g} minutes needs {minutes * load:g} minutes of the one-hour "
                             "conversation trace; lower --minutes or the load")
        return full.window(minutes * load, speedup=load)
    if workload == "prompt-heavy":
        return prompt_heavy_trace(minutes, rate_scale=load * PROMPT_HEAVY_RATE_SCALE, seed=seed)
    raise BenchError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


_TRACES: dict[str, Any] = {}


def _conversation(path: str):
    from scheduler.sim.trace import load_trace

    if path not in _TRACES:
        _TRACES[path] = load_trace(path)
    return _TRACES[path]


_BUDGET_TARGET: dict[float, float] = {}


def budget_target(min_quality: float) -> float:
    """The window-mean target that matches the per-request wall at min_quality on the held-out prompts.

    Under the wall, a request's served predicted quality is a when a >= min_quality (small model)
    and 1 otherwise (large); the budget holds the mean of that, so it routes the same way in steady
    state and differs only when the large model is saturated.
    """
    if min_quality not in _BUDGET_TARGET:
        from scheduler.routing.adequacy import load_predictor
        from scheduler.routing.quality_budget import QualityBudget
        from scheduler.sim.prompts import held_out_pool

        pred, pool = load_predictor(None), held_out_pool()
        a = np.array([pred.adequacy(p) for p in pool.prompts])
        _BUDGET_TARGET[min_quality] = QualityBudget.served_mean_under_wall(a, min_quality)
    return _BUDGET_TARGET[min_quality]


def run_job(job: Job) -> dict[str, Any]:
    """One replay; returns the policy's metrics (plain JSON types)."""
    from contextlib import nullcontext

    from scheduler.config import load_config
    from scheduler.datafiles import REPOSITORY_DIR
    from scheduler.routing.placement import place as energy_place
    from scheduler.routing.quality_budget import QualityBudget
    from scheduler.sim.fleet import FleetSimulator
    from scheduler.sim.hooks import RoundRobin, resolve_governor
    from scheduler.sim.profiles import gpu_constant_overrides

    p = POLICIES[job.policy]
    constants = SENSITIVITY_BAND[job.band] if job.band else None
    with gpu_constant_overrides(**constants) if constants else nullcontext():
        config = load_config(_config_path(p.fleet, REPOSITORY_DIR))
        slo = config.routing.default_slo
        governor = None
        if p.governor:
            opts = {"tpot_slo_seconds": slo.tpot_ms / 1000.0, "ttft_slo_seconds": slo.ttft_ms / 1000.0}

            def governor(cfg, devices, clock):
                return resolve_governor(cfg, devices, clock, policy="slo-feedback", options=opts)

        mq = config.routing.default_min_quality if job.min_quality is None else job.min_quality
        routed = p.model == "auto" and not p.oracle
        budget = QualityBudget(budget_target(mq), initial_threshold=mq, rank=p.budget_rank,
                               prompt_token_weight=job.budget_prompt_weight) if p.quality_budget else None
        sim = FleetSimulator(
            config, seed=job.seed, model=p.model, strong_models=[LARGE], min_quality=mq if routed else None,
            placement=energy_place if p.placement == "energy" else RoundRobin(start=job.seed),
            governor_factory=governor, park_idle_seconds=PARK_IDLE_SECONDS if p.park else None,
            oracle=p.oracle, oracle_model_choice=p.oracle_model_choice, quality_budget=budget,
            slo_batching=p.slo_batching, batch_clocks=p.batch_clocks,
            clock_switch_seconds=job.clock_switch_seconds, pools=p.pools, output_lengths=p.output_lengths,
            timeline_interval_seconds=60.0,
        )
        trace = build_trace(job.workload, job.load, job.minutes, job.seed)
        result = sim.run(trace)
    return {"job": asdict(job), **metrics(result, mq if routed else None)}


def _config_path(fleet: str, repo: Path) -> Path:
    path = repo / "configs" / FLEETS[fleet]
    if not path.is_file():  # installed without the repository: the packaged copy
        from scheduler import datafiles

        path = datafiles.sim_fleet_config().with_name(FLEETS[fleet])
    return path


def metrics(result, min_quality: float | None) -> dict[str, Any]:
    """The bench's figures for one replay (see docs/benchmarks.md for each definition)."""
    s = result.summary()
    r = result.routing
    acc = result.accounting
    busy_j = sum(a["busy_joules"] for a in acc.values())
    idle_j = sum(a["idle_joules"] for a in acc.values())
    parked_j = sum(a["parked_joules"] for a in acc.values())
    done = max(result.completed, 1)
    served = r["served_model_index"] >= 0 if r else None
    by_model = r.get("requests_by_model", {}) if r else {}
    n_served = sum(by_model.values())
    return {
        "method": "simulated",
        "requests": result.requests, "completed": result.completed, "rejected": result.rejected,
        "virtual_seconds": result.virtual_seconds, "wall_seconds": result.wall_seconds,
        "energy_joules": result.energy_joules,
        "energy_per_request_joules": result.energy_joules / done,
        "dynamic_energy_per_request_joules": busy_j / done,
        "idle_energy_per_request_joules": idle_j / done,
        "parked_energy_per_request_joules": parked_j / done,
        "energy_per_output_token_joules": result.energy_joules / max(result.completion_tokens, 1),
        "completion_tokens": result.completion_tokens, "prompt_tokens": result.prompt_tokens,
        **{k: s[k] for k in ("ttft_p50_seconds", "ttft_p90_seconds", "ttft_p99_seconds",
                             "tpot_p50_seconds", "tpot_p90_seconds", "tpot_p99_seconds", "slo_attainment")},
        "slo": s["slo"],
        "share_by_model": {m: (n / n_served if n_served else 0.0) for m, n in by_model.items()},
        "requests_by_model": by_model,
        "label_accuracy": r.get("label_accuracy") if r else None,
        # the baseline serves every request with the large model: its accuracy on the same prompts
        "large_model_accuracy_same_prompts": float(r["strong_correct"][served].mean()) if r and served.any() else None,
        "gpu_hours_busy": sum(a["busy_seconds"] for a in acc.values()) / 3600.0,
        "gpu_hours_idle": sum(a["idle_seconds"] for a in acc.values()) / 3600.0,
        "gpu_hours_parked": sum(a["parked_seconds"] for a in acc.values()) / 3600.0,
        "energy_components_joules": {"dynamic": busy_j, "idle": idle_j, "parked_part_of_idle": parked_j},
        "parks": result.parks, "preemptions": result.preemptions,
        "min_quality": min_quality,
        "by_model": by_model_breakdown(result),
        "clock_switches": result.settings.get("clock_switches", 0),
        "quality_budget": r.get("quality_budget") if r else None,
        "best_effort_requests": r.get("best_effort_requests") if r else None,
        "pools": result.settings.get("pools"),
    }


def by_model_breakdown(result) -> dict[str, dict[str, Any]]:
    """Where the energy goes, per model pool: busy, idle (not parked) and parked joules per completed request of the
    whole run, GPU-seconds in each state, the mean clock its batches ran at, and its requests' SLO misses."""
    done = max(result.completed, 1)
    out: dict[str, dict[str, Any]] = {}
    for rep in result.replicas.values():
        m = out.setdefault(rep["model"], {"gpus": 0, "requests": 0, "busy_joules": 0.0, "idle_joules": 0.0, "parked_joules": 0.0,
                                          "busy_seconds": 0.0, "idle_seconds": 0.0, "parked_seconds": 0.0, "_clock": 0.0})
        m["requests"] += rep["completed"]
        if not rep.get("active", True):  # a pool move took its GPUs: they count for the replica holding them at the end
            continue
        m["gpus"] += len(rep["devices"])
        for d in rep["devices"]:
            a = result.accounting[d]
            m["busy_joules"] += a["busy_joules"]
            m["idle_joules"] += a["idle_joules"] - a["parked_joules"]
            m["parked_joules"] += a["parked_joules"]
            m["busy_seconds"] += a["busy_seconds"]
            m["idle_seconds"] += a["idle_seconds"] - a["parked_seconds"]
            m["parked_seconds"] += a["parked_seconds"]
            m["_clock"] += a.get("busy_clock_mhz_seconds", 0.0)
    ttft_s, tpot_s = result.slo["ttft_seconds"], result.slo["tpot_seconds"]
    for mid, m in out.items():
        clock = m.pop("_clock")
        m["mean_busy_clock_mhz"] = clock / m["busy_seconds"] if m["busy_seconds"] > 0 else None
        for k in ("busy", "idle", "parked"):
            m[f"{k}_joules_per_request"] = m[f"{k}_joules"] / done
        reqs = [r for r in result.done if r.model_id == mid]
        m["ttft_misses"] = sum(1 for r in reqs if r.ttft_seconds is None or r.ttft_seconds > ttft_s)
        m["tpot_misses"] = sum(1 for r in reqs if r.tpot_seconds is not None and r.tpot_seconds > tpot_s)
    return out


#: benchmarks/power_replay.py's SENSITIVITY_BAND, for an installed package without the benchmarks folder
#: (tests/unit/sim/test_fleet_bench.py checks that the two agree)
PACKAGED_BAND = {"low": {"voltage_floor_fraction": 0.5, "memory_clock_knee": 0.02, "memory_bound_sm_activity": 0.15},
                 "high": {"voltage_floor_fraction": 0.75, "memory_clock_knee": 0.15, "memory_bound_sm_activity": 0.5}}


def _band() -> dict[str, dict[str, float]]:
    """Plausible ends of the unfitted GPU constants: the same band as `python -m benchmarks.power_replay --band`."""
    try:
        from benchmarks.power_replay import SENSITIVITY_BAND as band
    except ImportError:
        band = PACKAGED_BAND
    return band


SENSITIVITY_BAND = _band()


def plan(workloads: list[str], loads: list[float], policies: list[str], minutes: float, seed: int, band: bool,
         clock_switch_seconds: float | None = None, min_quality: float | None = None,
         budget_prompt_weight: float | None = None) -> list[Job]:
    for w in workloads:
        if w not in WORKLOADS:
            raise BenchError(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    for p in policies:
        if p not in POLICIES:
            raise BenchError(f"unknown policy set {p!r}; known: {', '.join(POLICIES)}")
    if "baseline" not in policies:
        raise BenchError("the policy sets must include 'baseline' (every comparison is against it)")
    if not loads or any(x <= 0 or not math.isfinite(x) for x in loads):
        raise BenchError(f"loads must be positive numbers, got {loads}")
    if not (minutes > 0 and math.isfinite(minutes)):  # nan passes a `<= 0` check
        raise BenchError(f"minutes must be a positive finite number, got {minutes:g}")
    if seed < 0:  # numpy seeds only with non-negative integers
        raise BenchError(f"seed must be 0 or more, got {seed}")
    if clock_switch_seconds is not None and not (clock_switch_seconds >= 0 and math.isfinite(clock_switch_seconds)):
        raise BenchError(f"clock switch seconds must be >= 0, got {clock_switch_seconds:g}")
    if min_quality is not None and not 0.0 <= min_quality <= 1.0:
        raise BenchError(f"min quality must be between 0 and 1, got {min_quality:g}")
    if budget_prompt_weight is not None and not (0.0 <= budget_prompt_weight <= 10.0):
        raise BenchError(f"budget prompt weight must be between 0 and 10, got {budget_prompt_weight:g}")
    cs, mq, bw = clock_switch_seconds, min_quality, budget_prompt_weight
    jobs = [Job(w, x, p, minutes, seed, None, cs, mq, bw) for w in workloads for x in loads for p in policies]
    if band:
        mid = 1.0 if 1.0 in loads else loads[len(loads) // 2]
        jobs += [Job(w, mid, p, minutes, seed, end, cs, mq, bw) for end in SENSITIVITY_BAND for w in workloads
                 for p in BAND_POLICIES if p in policies]
    for j in jobs:
        if j.workload == "conversation" and j.minutes * j.load > 60.0 + 1e-9:
            raise BenchError(f"load {j.load:g} x {j.minutes:g} minutes needs more than the one-hour conversation trace; lower --minutes")
    # the longest jobs first, so the pool's last worker does not finish alone
    return sorted(jobs, key=lambda j: -(j.load * (2.0 if POLICIES[j.policy].governor else 1.0)))


def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (workload, load): every policy against the baseline and the oracle."""
    cells: dict[str, dict[str, Any]] = {}
    for r in results:
        j = r["job"]
        if j["band"] is not None:
            continue
        key = f"{j['workload']}@{j['load']:g}"
        cells.setdefault(key, {"workload": j["workload"], "load": j["load"], "policies": {}})["policies"][j["policy"]] = r
    for cell in cells.values():
        pol = cell["policies"]
        base, oracle = pol.get("baseline"), pol.get("oracle")
        for name, r in pol.items():
            c: dict[str, Any] = {}
            if base is not None:
                c["energy_vs_baseline"] = energy_change(r, base)
                ba = base["label_accuracy"]
                c["quality_retained"] = (r["label_accuracy"] / ba) if (ba and r["label_accuracy"] is not None) else None
                c["slo_points_vs_baseline"] = (None if r["slo_attainment"] is None or base["slo_attainment"] is None
                                               else 100.0 * (r["slo_attainment"] - base["slo_attainment"]))
            if oracle is not None:
                c["energy_vs_oracle"] = energy_change(r, oracle)
            r["comparison"] = c
    return cells


def band_summary(results: list[dict[str, Any]], cells: dict[str, Any]) -> dict[str, Any]:
    """For each workload: each band policy's change against the baseline at the central constants and at each band end."""
    out: dict[str, Any] = {}
    ends: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        j = r["job"]
        if j["band"] is not None:
            ends[(j["workload"], j["policy"], j["band"])] = r
    if not ends:
        return out
    for (w, p, end), r in ends.items():
        base = ends.get((w, "baseline", end))
        if base is None:
            continue
        load = r["job"]["load"]
        central = cells.get(f"{w}@{load:g}", {}).get("policies", {})
        entry = out.setdefault(w, {"load": load, "constants": SENSITIVITY_BAND, "policies": {}}).setdefault("policies", {}).setdefault(p, {})
        entry[end] = {"energy_per_request_joules": r["energy_per_request_joules"],
                      "baseline_energy_per_request_joules": base["energy_per_request_joules"],
                      "energy_vs_baseline": energy_change(r, base),
                      "slo_attainment": r["slo_attainment"]}
        if p in central and "baseline" in central:
            entry["central"] = {"energy_per_request_joules": central[p]["energy_per_request_joules"],
                                "energy_vs_baseline": central[p]["comparison"]["energy_vs_baseline"],
                                "slo_attainment": central[p]["slo_attainment"]}
    for w in out.values():
        for p, e in w["policies"].items():
            vals = [v["energy_vs_baseline"] for v in e.values() if isinstance(v, dict) and v.get("energy_vs_baseline") is not None]
            e["range"] = [min(vals), max(vals)] if vals else [None, None]
    return out


def run_bench(*, workloads: list[str], loads: list[float], policies: list[str], minutes: float, seed: int = 0,
              band: bool = False, workers: int = 1, progress: Any = None, clock_switch_seconds: float | None = None,
              min_quality: float | None = None, budget_prompt_weight: float | None = None) -> dict[str, Any]:
    """Every job of the plan (in a process pool when workers > 1); returns the whole result document."""
    import resource

    from scheduler.sim.core import CLOCK_SWITCH_SECONDS

    jobs = plan(workloads, loads, policies, minutes, seed, band, clock_switch_seconds, min_quality, budget_prompt_weight)
    t0 = time.perf_counter()

    def cpu() -> float:  # this process and its reaped workers: the machine-independent cost of the run
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))

    cpu0 = cpu()
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for j in jobs:
            results.append(run_job(j))
            if progress is not None:
                progress(j)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(run_job, j): j for j in jobs}
            for f in as_completed(futures):
                results.append(f.result())
                if progress is not None:
                    progress(futures[f])
    order = {(w, x, p): i for i, (w, x, p) in enumerate((w, x, p) for w in workloads for x in loads for p in policies)}
    results.sort(key=lambda r: (r["job"]["band"] or "", order.get((r["job"]["workload"], r["job"]["load"], r["job"]["policy"]), 0)))
    cells = compare(results)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "benchmark": "fleet-bench", "method": "simulated",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"workloads": workloads, "loads": loads, "policies": policies, "minutes": minutes, "seed": seed,
                     "band": band, "workers": workers, "park_idle_seconds": PARK_IDLE_SECONDS,
                     "prompt_heavy_rate_scale": PROMPT_HEAVY_RATE_SCALE,
                     "clock_switch_seconds": CLOCK_SWITCH_SECONDS if clock_switch_seconds is None else clock_switch_seconds,
                     "min_quality": min_quality, "budget_prompt_weight": budget_prompt_weight},
        "policy_sets": {p.name: asdict(p) for p in POLICY_SETS if p.name in policies},
        "fleets": FLEETS,
        "cells": {k: {"workload": c["workload"], "load": c["load"],
                      "policies": {p: {k2: v for k2, v in r.items() if k2 != "job"} for p, r in c["policies"].items()}}
                  for k, c in cells.items()},
        "sensitivity_band": band_summary(results, cells),
        "run": {"wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - cpu0, "jobs": len(jobs), "cpu_cores": cores,
                "python": platform.python_version()},
    }


def write_outputs(doc: dict[str, Any], out_dir: Path, command: str) -> list[Path]:
    from scheduler.sim.bench_report import render_markdown, render_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    doc["command"] = command
    paths = [out_dir / "fleet-bench.json", out_dir / "fleet-bench.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=_json_default) + "\n", encoding="utf-8")
    paths[1].write_text(render_markdown(doc), encoding="utf-8")
    try:
        paths += render_plots(doc, out_dir)
    except ImportError:
        import warnings

        warnings.warn("no PNG plots: they need matplotlib (pip install 'wattlane[bench]'); JSON and Markdown are written", stacklevel=2)
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def register(app) -> None:
    import typer

    bench = typer.Typer(help="Benchmarks on the simulated fleet (every figure is method 'simulated').", no_args_is_help=True)
    app.add_typer(bench, name="bench")

    @bench.command("fleet")
    def fleet(
        out: Path = typer.Option(..., "--out", help="folder for fleet-bench.json, fleet-bench.md and the PNG plots"),
        minutes: float = typer.Option(DEFAULT_MINUTES, "--minutes", help="virtual minutes replayed per run (the same at every load)"),
        loads: str = typer.Option(",".join(f"{x:g}" for x in DEFAULT_LOADS), "--loads", help="comma-separated multiples of the recorded rate"),
        policies: str = typer.Option(",".join(POLICIES), "--policies", help=f"comma-separated policy sets: {', '.join(POLICIES)}"),
        workloads: str = typer.Option(",".join(WORKLOADS), "--workloads", help=f"comma-separated: {', '.join(WORKLOADS)}"),
        seed: int = typer.Option(0, "--seed", min=0),
        band: bool = typer.Option(True, "--band/--no-band", help="rerun baseline, Wattlane and the oracle at load 1 with the unfitted GPU constants at each end of their band"),
        workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers", min=1, help="processes replaying in parallel"),
        clock_switch_seconds: float = typer.Option(None, "--clock-switch-seconds",
                                                   help="per-batch clocks: stall of one clock change (default 0.02; an assumption)"),
        min_quality: float = typer.Option(None, "--min-quality",
                                          help="quality threshold of the routed policies (default: the fleet config's routing.default_min_quality)"),
        budget_prompt_weight: float = typer.Option(None, "--budget-prompt-weight",
                                                   help="quality budget by gain per joule: a prompt token's energy as a fraction of an "
                                                        "output token's (default: the size prior's 0.1; an assumption)"),
        docs: Path = typer.Option(None, "--docs", help="also rewrite this page's fleet-bench blocks (docs/benchmarks.md) from the results"),
    ) -> None:
        """Replay workloads at several loads under every policy set against the baseline and an oracle (method: simulated)."""
        import sys

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from scheduler import datafiles
        from scheduler.config import ConfigError
        from scheduler.sim.profiles import ProfileError
        from scheduler.sim.prompts import PromptPoolError
        from scheduler.sim.trace import TraceError

        try:
            load_list = [float(x) for x in loads.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"'{loads}' is not a comma-separated list of numbers", param_hint="--loads") from None
        pol = [p.strip() for p in policies.split(",") if p.strip()]
        wl = [w.strip() for w in workloads.split(",") if w.strip()]
        try:
            n = len(plan(wl, load_list, pol, minutes, seed, band, clock_switch_seconds, min_quality, budget_prompt_weight))
        except BenchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        # both are written after every replay: a bad one found then would throw the whole run away
        if out.exists() and not out.is_dir():
            typer.echo(f"error: --out {out} is a file; give a folder (new or existing) for the results", err=True)
            raise typer.Exit(2)
        if docs is not None:
            _check_page(docs)
        con = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=con) as prog:
            task = prog.add_task("fleet bench", total=n)

            def tick(job: Job) -> None:
                prog.update(task, advance=1, description=f"{job.workload} x{job.load:g} {job.policy}" + (f" ({job.band})" if job.band else ""))

            try:
                doc = run_bench(workloads=wl, loads=load_list, policies=pol, minutes=minutes, seed=seed, band=band,
                                workers=workers, progress=tick, clock_switch_seconds=clock_switch_seconds, min_quality=min_quality,
                                budget_prompt_weight=budget_prompt_weight)
            except (BenchError, ConfigError, TraceError, ProfileError, PromptPoolError, datafiles.DataFileError) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
        command = "wattlane bench fleet " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else f"wattlane bench fleet --out {out}"
        for path in write_outputs(doc, out, command.strip()):
            typer.echo(f"wrote {path}")
        if docs is not None:
            _sync_docs(doc, docs)

    @bench.command("docs")
    def docs_command(
        results: Path = typer.Option(Path("docs/results/fleet-bench/fleet-bench.json"), "--results",
                                     help="a fleet bench's fleet-bench.json"),
        docs: Path = typer.Option(Path("docs/benchmarks.md"), "--docs", help="the page whose fleet-bench blocks are rendered from it"),
        check: bool = typer.Option(False, "--check", help="change nothing; exit 1 if a block differs from the results"),
    ) -> None:
        """Rewrite the tables of docs/benchmarks.md that quote a fleet bench's results (ablations, every cell, the band)."""
        from scheduler.sim.bench_report import ResultsError, check_results

        try:
            doc = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            typer.echo(f"error: cannot read {results}: {exc}", err=True)
            raise typer.Exit(2) from None
        try:
            check_results(doc)
        except ResultsError as exc:
            typer.echo(f"error: {results} is not a fleet bench's results: it {exc}; give a fleet-bench.json that "
                       "`wattlane bench fleet` wrote", err=True)
            raise typer.Exit(2) from None
        if check:
            stale = _stale_doc_blocks(doc, docs)
            if stale:
                typer.echo(f"{docs}: block(s) {', '.join(stale)} differ from {results}; "
                           f"rerun without --check to rewrite them", err=True)
                raise typer.Exit(1)
            typer.echo(f"{docs}: every fleet-bench block matches {results}")
            return
        _sync_docs(doc, docs)

    def _read_page(page: Path) -> str:
        try:
            return page.read_text(encoding="utf-8")
        except OSError as exc:
            typer.echo(f"error: cannot read {page}: {exc}", err=True)
            raise typer.Exit(2) from None

    def _check_page(page: Path) -> None:
        from scheduler.sim.bench_report import DOC_BLOCKS, DocBlockError, doc_block

        text = _read_page(page)
        try:
            for name in DOC_BLOCKS:
                doc_block(text, name)
        except DocBlockError as exc:
            typer.echo(f"error: {page}: {exc}", err=True)
            raise typer.Exit(2) from None

    def _stale_doc_blocks(doc: dict[str, Any], page: Path) -> list[str]:
        from scheduler.sim.bench_report import DocBlockError, doc_block, render_doc_blocks

        text = _read_page(page)
        try:
            return [name for name, content in render_doc_blocks(doc).items() if doc_block(text, name) != content]
        except DocBlockError as exc:
            typer.echo(f"error: {page}: {exc}", err=True)
            raise typer.Exit(2) from None

    def _sync_docs(doc: dict[str, Any], page: Path) -> None:
        from scheduler.sim.bench_report import DocBlockError, render_doc_blocks, sync_doc_blocks

        try:
            page.write_text(sync_doc_blocks(_read_page(page), render_doc_blocks(doc)), encoding="utf-8")
        except DocBlockError as exc:
            typer.echo(f"error: {page}: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"rewrote the fleet-bench blocks of {page}")

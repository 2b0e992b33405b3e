"""Attribution accuracy: each request's attributed joules when run concurrently, against its cost run alone.

The same requests run twice on one GPU through Wattlane's Attributor (scheduler/energy/attribution.py),
fed as in serving: meter intervals from the device's energy counter every 100 ms, cumulative
progress reports every 100 ms, finish() once the meter has covered the finish time.
- isolated: each request alone on a fresh device; its measurement is the device counter's delta
  over the request (the ground truth when nothing else runs), and its attribution must match it;
- concurrent: all requests arrive within the first --spread-seconds and are batched together.

Running together is cheaper per request (weights are read once per iteration for the whole batch),
so concurrent joules are compared with the isolated ones scaled to the same total: the error says
how far the attribution rule (work = decode tokens + prefill tokens x prefill_token_weight) splits a
shared batch from the requests' stand-alone costs. That reference is a convention, not a truth
about who caused which joule; both figures and the unscaled ratio are published.

On machines without a GPU the device is scheduler.devices.simulated.SimulatedGpu driven by the
simulator's engine core on a virtual clock (method "simulated"): this checks the attribution rules
and their bookkeeping, not hardware.

    python -m benchmarks.attribution_accuracy [--requests 32] [--seed 7] [--band]
writes docs/results/attribution-accuracy.json and .md. --band reruns it with the simulated GPU's unfitted
constants at the low and high ends of their plausible values (benchmarks.power_replay.SENSITIVITY_BAND).
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.devices.simulated import SimulatedGpu
from scheduler.energy.attribution import Attributor
from scheduler.sim.core import BatchCore, CoreListener, SimRequest
from scheduler.sim.profiles import model_profile

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
METER_INTERVAL_SECONDS = 0.1
DEVICE = "gpu0"


@dataclass(frozen=True)
class Spec:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    arrival_s: float


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Finished(CoreListener):
    def __init__(self) -> None:
        self.done: list[SimRequest] = []

    def on_finish(self, req: SimRequest, now: float) -> None:
        self.done.append(req)


def replay(specs: list[Spec], gpu_profile: str = "h100-sxm", model: str = "llama-3.1-8b") -> dict[str, Any]:
    """Run these requests on one simulated GPU with the attributor fed as in serving; per-request joules and the balance."""
    clock = _Clock()
    gpu = SimulatedGpu(DEVICE, gpu_profile, node="sim", clock=clock)
    listener = _Finished()
    core = BatchCore(model_profile(model, gpu_profile), [gpu], listener=listener)
    attributor = Attributor()
    attributor.register_device(DEVICE)
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, payload: Any = None) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    reqs = {s.request_id: SimRequest(s.request_id, s.prompt_tokens, s.output_tokens, s.arrival_s) for s in specs}
    for s in specs:
        push(s.arrival_s, "arrive", s.request_id)
    counter_start = gpu.energy_joules_at(0.0)
    push(METER_INTERVAL_SECONDS, "meter")
    segment_end: float | None = None
    last_meter_t, last_meter_e = 0.0, counter_start
    waiting_finish: list[SimRequest] = []
    out: dict[str, dict[str, Any]] = {}
    while events:
        t, _, kind, payload = heapq.heappop(events)
        clock.t = t
        if kind == "arrive":
            req = reqs[payload]
            attributor.start(req.request_id, DEVICE, t)
            req.tag = gpu.energy_joules_at(t)  # counter at the start (the isolated measurement)
            end = core.submit(req, t)
            if end is not None and end != segment_end:
                segment_end = end
                push(end, "segment", end)
        elif kind == "segment":
            if payload != segment_end:
                continue  # superseded by a re-plan
            segment_end = None
            end = core.advance(t)
            for req in listener.done:
                # the replica's last report carries the final counts at the finish
                attributor.progress(req.request_id, req.prompt_tokens, req.output_tokens, t)
                req.tag = (req.tag, gpu.energy_joules_at(t))
                waiting_finish.append(req)
            listener.done.clear()
            if end is not None:
                segment_end = end
                push(end, "segment", end)
        elif kind == "meter":
            e = gpu.energy_joules_at(t)
            # progress first (reports arrive every ~100 ms), then the interval that covers them
            for req in reqs.values():
                if req.state in ("prefill", "running", "left"):
                    prefill = req._prefilled if req.state == "prefill" else req.prompt_tokens
                    attributor.progress(req.request_id, prefill, core.generated(req) if req.state == "running" else req._gen_join, t)
            attributor.on_interval(DEVICE, last_meter_t, t, e - last_meter_e)
            last_meter_t, last_meter_e = t, e
            covered = attributor.covered_until(DEVICE) or 0.0
            for req in [r for r in waiting_finish if r.finish_s <= covered]:
                waiting_finish.remove(req)
                energy = attributor.finish(req.request_id, req.finish_s, prefill_tokens_done=req.prompt_tokens,
                                           decode_tokens_done=req.output_tokens)
                e0, e1 = req.tag
                out[req.request_id] = {"attributed_joules": energy.joules, "dynamic_joules": energy.dynamic_joules,
                                       "idle_joules": energy.idle_joules, "counter_joules_during": e1 - e0,
                                       "start_s": req.arrival_s, "finish_s": req.finish_s, "complete": energy.complete}
            if len(out) < len(specs):
                push(t + METER_INTERVAL_SECONDS, "meter")
    balance = attributor.balance(DEVICE)
    return {"requests": out, "counter_joules": last_meter_e - counter_start, "end_s": last_meter_t,
            "balance": {"metered_joules": balance.metered_joules, "dynamic_joules": balance.dynamic_joules,
                        "idle_assigned_joules": balance.idle_assigned_joules, "idle_pool_joules": balance.idle_pool_joules,
                        "unsettled_joules": balance.unsettled_joules}}


def make_specs(n: int, seed: int, spread_seconds: float) -> list[Spec]:
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(400), 0.9, n), 16, 4000).astype(int)
    outputs = np.clip(rng.lognormal(np.log(180), 0.8, n), 8, 1500).astype(int)
    arrivals = np.sort(rng.uniform(0.0, spread_seconds, n))
    return [Spec(f"req-{i:03d}", int(p), int(o), float(a)) for i, (p, o, a) in enumerate(zip(prompts, outputs, arrivals))]


def evaluate(specs: list[Spec], gpu_profile: str = "h100-sxm") -> dict[str, Any]:
    isolated = {s.request_id: replay([Spec(s.request_id, s.prompt_tokens, s.output_tokens, 0.0)], gpu_profile)["requests"][s.request_id]
                for s in specs}
    concurrent = replay(specs, gpu_profile)
    # leave-one-out: what the device would have spent on the same traffic without this request
    without = {s.request_id: replay([x for x in specs if x is not s], gpu_profile)["counter_joules"] for s in specs}
    marginal = {k: concurrent["counter_joules"] - v for k, v in without.items()}
    rows = []
    iso_total = sum(isolated[s.request_id]["counter_joules_during"] for s in specs)
    conc_total = sum(r["attributed_joules"] for r in concurrent["requests"].values())
    scale = conc_total / iso_total
    marginal_scale = conc_total / sum(marginal.values())
    for s in specs:
        iso, conc = isolated[s.request_id], concurrent["requests"][s.request_id]
        reference = iso["counter_joules_during"] * scale
        rows.append({"request_id": s.request_id, "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens,
                     "isolated_measured_joules": iso["counter_joules_during"], "isolated_attributed_joules": iso["attributed_joules"],
                     "concurrent_attributed_joules": conc["attributed_joules"], "concurrent_reference_joules": reference,
                     "isolated_error": iso["attributed_joules"] / iso["counter_joules_during"] - 1,
                     "concurrent_error": conc["attributed_joules"] / reference - 1,
                     "marginal_joules": marginal[s.request_id],
                     "marginal_error": conc["attributed_joules"] / (marginal[s.request_id] * marginal_scale) - 1})
    iso_err = np.array([abs(r["isolated_error"]) for r in rows])
    conc_err = np.array([abs(r["concurrent_error"]) for r in rows])
    worst = max(rows, key=lambda r: abs(r["concurrent_error"]))
    marg_err = np.array([abs(r["marginal_error"]) for r in rows])
    b = concurrent["balance"]
    return {
        "isolated": {"mape": float(iso_err.mean()), "worst_abs_error": float(iso_err.max())},
        "concurrent": {"mape": float(conc_err.mean()), "worst_abs_error": float(conc_err.max()), "worst_request": worst["request_id"],
                       "batching_ratio": conc_total / iso_total,
                       "conservation_error": (b["dynamic_joules"] + b["idle_assigned_joules"] + b["idle_pool_joules"]
                                              + b["unsettled_joules"]) / concurrent["counter_joules"] - 1},
        "marginal": {"mape": float(marg_err.mean()), "worst_abs_error": float(marg_err.max()),
                     "worst_request": max(rows, key=lambda r: abs(r["marginal_error"]))["request_id"]},
        "concurrent_balance": b, "concurrent_counter_joules": concurrent["counter_joules"], "rows": rows,
    }


def render_md(doc: dict[str, Any]) -> str:
    i, c, m = doc["result"]["isolated"], doc["result"]["concurrent"], doc["result"]["marginal"]
    lines = [
        "# Attribution accuracy (method: simulated)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"{doc['requests']} requests (seeded lognormal prompts and outputs, seed {doc['seed']}) on one simulated "
        f"{doc['gpu_profile']} running {doc['model']}, arriving within {doc['spread_seconds']:g} s. The device is the "
        "simulator's (scheduler.devices.simulated, engine core scheduler.sim.core); the attributor, its 100 ms meter "
        "intervals and progress reports are the serving ones. This checks the attribution rules, not hardware.",
        "",
        "| comparison | MAPE | worst case |",
        "|---|---|---|",
        f"| isolated: attributed vs the device counter over the request | {100 * i['mape']:.2f}% | {100 * i['worst_abs_error']:.2f}% |",
        f"| concurrent: attributed vs isolated cost scaled to the same total | {100 * c['mape']:.2f}% | "
        f"{100 * c['worst_abs_error']:.2f}% ({c['worst_request']}) |",
        f"| concurrent: attributed vs leave-one-out marginal cost scaled to the same total | {100 * m['mape']:.2f}% | "
        f"{100 * m['worst_abs_error']:.2f}% ({m['worst_request']}) |",
        "",
        f"Running together cost {100 * c['batching_ratio']:.1f}% of running alone (sum of attributed joules vs sum of "
        f"isolated measurements). Conservation in the concurrent run: requests + idle pool + unsettled vs the device "
        f"counter's own delta: {100 * c['conservation_error']:+.4f}%.",
        "",
        "Both concurrent references are conventions, not truths about who caused which joule: a request's share of the "
        "batch in proportion to what it costs alone, or to what the device would have saved without it (the same "
        "traffic replayed without that request). The attributor shares each 100 ms interval by the work done in it "
        "(decode tokens + 0.25 x prefill tokens), so a request that runs on into the batch's thin tail, where few "
        "requests share each iteration's weight reads, pays more per token than in the crowded middle; alone, every "
        "token costs about the same. That is the likely main cause of the gap to the isolated reference (not "
        "separated out by an experiment here). Alone, attribution runs slightly under the counter: the intervals "
        "where a request starts or ends are shared by busy time, not busy power, so part of their busy joules goes "
        "to the idle pool.",
        "",
        "| request | prompt | output | isolated measured (J) | isolated attributed (J) | concurrent attributed (J) | isolated-share reference (J) | error | marginal (J) | error vs marginal share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "sensitivity_band" in doc:
        lines[lines.index("| request | prompt | output | isolated measured (J) | isolated attributed (J) | concurrent attributed (J) | isolated-share reference (J) | error | marginal (J) | error vs marginal share |"):0] = [
            "Sensitivity band: the same run with the simulated GPU's unfitted constants (voltage floor, bandwidth knee, "
            "memory-bound SM activity) at the low and high ends of their plausible values. They change how much a "
            "memory-bound iteration draws, so the batch's cost split; the attribution rules are the same. No GPU result "
            "is in the repository yet.", "",
            "| end | constants | isolated MAPE (worst) | concurrent vs isolated share MAPE (worst) | vs marginal share MAPE (worst) | together / alone |",
            "|---|---|---|---|---|---|",
            f"| central | as in gpus.json | {100 * i['mape']:.2f}% ({100 * i['worst_abs_error']:.2f}%) | {100 * c['mape']:.2f}% ({100 * c['worst_abs_error']:.2f}%) | "
            f"{100 * m['mape']:.2f}% ({100 * m['worst_abs_error']:.2f}%) | {100 * c['batching_ratio']:.1f}% |",
            *[f"| {end} | {', '.join(f'{k} {v:g}' for k, v in e['constants'].items())} | {100 * e['isolated']['mape']:.2f}% "
              f"({100 * e['isolated']['worst_abs_error']:.2f}%) | {100 * e['concurrent']['mape']:.2f}% ({100 * e['concurrent']['worst_abs_error']:.2f}%) | "
              f"{100 * e['marginal']['mape']:.2f}% ({100 * e['marginal']['worst_abs_error']:.2f}%) | {100 * e['batching_ratio']:.1f}% |"
              for end, e in doc["sensitivity_band"].items()],
            "",
        ]
    for r in doc["result"]["rows"]:
        lines.append(f"| {r['request_id']} | {r['prompt_tokens']} | {r['output_tokens']} | {r['isolated_measured_joules']:.1f} | "
                     f"{r['isolated_attributed_joules']:.1f} | {r['concurrent_attributed_joules']:.1f} | "
                     f"{r['concurrent_reference_joules']:.1f} | {100 * r['concurrent_error']:+.1f}% | {r['marginal_joules']:.1f} | "
                     f"{100 * r['marginal_error']:+.1f}% |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attribution_accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--spread-seconds", type=float, default=0.5)
    ap.add_argument("--gpu-profile", default="h100-sxm")
    ap.add_argument("--out", type=Path, default=RESULTS / "attribution-accuracy")
    ap.add_argument("--band", action="store_true", help="also at the low and high ends of the simulated GPU's unfitted constants")
    args = ap.parse_args(argv)
    specs = make_specs(args.requests, args.seed, args.spread_seconds)
    result = evaluate(specs, args.gpu_profile)
    band = None
    if args.band:
        from benchmarks.power_replay import SENSITIVITY_BAND
        from scheduler.sim.profiles import gpu_constant_overrides

        band = {}
        for end, constants in SENSITIVITY_BAND.items():
            with gpu_constant_overrides(**constants):
                r = evaluate(specs, args.gpu_profile)
            band[end] = {"constants": constants, **{k: {x: r[k][x] for x in ("mape", "worst_abs_error")} for k in ("isolated", "concurrent", "marginal")},
                         "batching_ratio": r["concurrent"]["batching_ratio"]}
            print(f"band {end}: concurrent MAPE {100 * r['concurrent']['mape']:.2f}% (worst {100 * r['concurrent']['worst_abs_error']:.2f}%)", flush=True)
    doc = {"benchmark": "attribution-accuracy", "method": "simulated",
           "command": ("python -m benchmarks.attribution_accuracy " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
           "requests": args.requests, "seed": args.seed, "spread_seconds": args.spread_seconds, "gpu_profile": args.gpu_profile,
           "model": "llama-3.1-8b", "python": platform.python_version(), "result": result}
    if band is not None:
        doc["sensitivity_band"] = band
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render_md(doc), encoding="utf-8")
    i, c, m = result["isolated"], result["concurrent"], result["marginal"]
    print(f"vs marginal share: MAPE {100 * m['mape']:.2f}% (worst {100 * m['worst_abs_error']:.2f}%)")
    print(f"isolated MAPE {100 * i['mape']:.2f}% (worst {100 * i['worst_abs_error']:.2f}%); concurrent MAPE {100 * c['mape']:.2f}% "
          f"(worst {100 * c['worst_abs_error']:.2f}%); conservation {100 * c['conservation_error']:+.4f}%")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

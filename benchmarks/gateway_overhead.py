"""Measure what Wattlane's gateway adds over a plain Ray Serve app running the same engine and model.

    python -m benchmarks.gateway_overhead   # writes docs/results/gateway-overhead.md and .json (~3 min)

One Ray session, one Serve HTTP proxy, two applications:
- plain (route prefix /plain): a FastAPI ingress deployment that forwards the chat to a deployment
  holding the same LlamaCppEngine with the same weights, and answers the text and token counts;
- Wattlane's embedded default (route prefix /): the real gateway, routing, replica, node agent,
  energy attribution, carbon and ledger.
The same non-streaming chat (max_tokens 1) is sent sequentially over one keep-alive HTTP connection,
alternating plain and Wattlane (and which goes first) so that both see the same machine load, in
several rounds on the one deployment. Every Wattlane answer is
checked for usage.energy and usage.carbon, and its ledger row is read right after the answer (the
row must already be committed: Wattlane awaits the commit before the last byte).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scheduler.datafiles import REPOSITORY_DIR

RESULTS_DIR = REPOSITORY_DIR / "docs" / "results"
MODEL_ID = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Say hi."}]


def _plain_app(config_json: dict[str, Any], state_dir: str):
    """The baseline: FastAPI ingress -> handle -> a deployment running the same llama.cpp engine."""
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="plain_model", ray_actor_options={"num_cpus": 0})
    class PlainModel:
        def __init__(self, config: dict[str, Any], state: str):
            from scheduler.config import WattlaneConfig
            from scheduler.engines.factory import build_engine

            cfg = WattlaneConfig.model_validate(config)
            self.engine = build_engine(cfg.model(MODEL_ID), cfg, Path(state))

        async def generate(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
            from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams

            request = GenerationRequest("plain", ModelKind.CHAT, messages=messages,
                                        params=SamplingParams(max_tokens=max_tokens))
            text, last = [], None
            started = time.monotonic()
            async for ev in self.engine.generate(request):
                text.append(ev.text)
                last = ev
            return {"text": "".join(text), "prompt_tokens": last.prompt_tokens,
                    "completion_tokens": last.completion_tokens, "engine_seconds": time.monotonic() - started}

    @serve.deployment(name="plain_ingress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class PlainIngress:
        def __init__(self, model: Any):
            self.model = model

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> JSONResponse:
            # named here so that cloudpickle ships Request with the class: FastAPI resolves the string
            # annotation in the replica, from the globals the function carries
            handler_started = time.monotonic()
            body = await Request.json(request)
            called = time.monotonic()
            out = await self.model.generate.remote(body["messages"], int(body.get("max_tokens") or 16))
            replica_ms = (time.monotonic() - called) * 1000
            # the stages it shares with Wattlane's Server-Timing, timed the same way (its body is read in the
            # handler: Wattlane's is read and validated before its handler runs)
            return JSONResponse(
                {"object": "chat.completion", "model": MODEL_ID,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                              "finish_reason": "length"}],
                 "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"]}},
                headers={"Server-Timing": f"replica;dur={replica_ms:.3f}, engine;dur={out['engine_seconds'] * 1000:.3f}, "
                                          f"total;dur={(time.monotonic() - handler_started) * 1000:.3f}"})

    return PlainIngress.bind(PlainModel.bind(config_json, state_dir))


def _process_group(title: str) -> str | None:
    """Whose CPU a Ray process's time is: 'plain', 'wattlane' or 'shared' (Serve's proxy and controller, Ray)."""
    if "ServeReplica:plain:" in title:
        return "plain"
    if "ServeReplica:" in title or "NodeAgent" in title:
        return "wattlane"
    if title.startswith("ray::") or any(k in title for k in ("raylet", "gcs_server")):
        return "shared"
    return None


def _process_name(title: str) -> str:
    """A Ray process's name for the CPU table. Ray titles an actor's process by the task it runs now
    ("ray::ServeReplica:app:deployment.handle_request_with_rejection"): the task goes, so that a process keeps
    one name across snapshots (deployment names have no dots)."""
    return re.sub(r"\.[A-Za-z_]\w*$", "", os.path.basename(title.split(" ")[0]))


def _cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (title, user + system CPU seconds used so far, threads included) of each Ray process."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or ())
            if _process_group(title) is not None:
                t = proc.cpu_times()
                out[proc.pid] = (_process_name(title), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _cpu_used_by_title(start: dict[int, tuple[str, float]], end: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each title's processes used between two snapshots, by pid: a process that ended in between
    (another Ray session's leftover) is left out, as its share of the window is unknown; one that started counts
    from zero."""
    used: dict[str, float] = {}
    for pid, (key, cpu_s) in end.items():
        used[key] = used.get(key, 0.0) + cpu_s - (start[pid][1] if pid in start else 0.0)
    return used


def parse_server_timing(header: str) -> dict[str, float]:
    """Server-Timing "name;dur=ms, ..." -> {name: milliseconds}."""
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur.split(";")[0])
    return out


#: Wattlane's stages (Server-Timing) and the parts derived from them, with whether the plain app does the same
STAGE_ROWS = (
    ("route", "routing: model and replica chosen (routing.select)", False),
    ("serve_and_transport", "replica - engine - energy: Serve's routing to the replica, the call and its answer", True),
    ("engine", "the engine: llama.cpp generating the token", True),
    ("energy", "the node agent's answer with the request's joules (agent link)", False),
    ("accounting", "carbon, the ledger row's commit, metrics", False),
    ("gateway_rest", "total - route - replica - accounting: the handler, the job, the answer's JSON (plain: "
                     "its body's JSON too)", True),
    ("outside_handler", "client's time - total: HTTP, Serve's proxy, the body's read and validation (plain: "
                        "read in the handler)", True),
)


def _p50_and_mean(values_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(values_ms, 50)), "mean_ms": float(np.mean(values_ms))}


def stage_breakdown(samples: list[tuple[float, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per stage, p50 and mean in ms over the timed Wattlane answers; samples are (client's seconds, stages in ms)."""
    rows: dict[str, list[float]] = {name: [] for name, _, _ in STAGE_ROWS}
    for elapsed_s, ms in samples:
        derived = {
            "route": ms.get("route", 0.0), "engine": ms.get("engine", 0.0), "energy": ms.get("energy", 0.0),
            "accounting": ms.get("accounting", 0.0),
            "serve_and_transport": ms["replica"] - ms.get("engine", 0.0) - ms.get("energy", 0.0),
            "gateway_rest": ms["total"] - ms.get("route", 0.0) - ms["replica"] - ms.get("accounting", 0.0),
            "outside_handler": elapsed_s * 1000.0 - ms["total"],
        }
        for name, value in derived.items():
            rows[name].append(value)
    return {name: _p50_and_mean(v) for name, v in rows.items() if v}


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.array(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def added_p50_interval_ms(plain_s: list[float], wattlane_s: list[float], resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """95% interval of the added p50 (Wattlane's p50 less the plain app's), from a paired bootstrap over the
    request pairs: whether the target is met should not rest on one draw of a noisy machine's latencies."""
    plain, watt = np.asarray(plain_s), np.asarray(wattlane_s)
    if len(plain) != len(watt) or len(plain) < 2:
        raise ValueError("the added p50's interval needs two or more pairs of requests")
    idx = np.random.default_rng(seed).integers(0, len(plain), size=(resamples, len(plain)))
    added_ms = (np.median(watt[idx], axis=1) - np.median(plain[idx], axis=1)) * 1000.0
    low, high = np.percentile(added_ms, [2.5, 97.5])
    return float(low), float(high)


def run(requests: int, warmup: int, rounds_count: int = 3) -> dict[str, Any]:
    from ray import serve

    from scheduler.cluster.lifecycle import Deployment
    from scheduler.config import load_config
    from tests.support.server import free_port

    state_dir = Path(tempfile.mkdtemp(prefix="wattlane-overhead-"))
    os.environ["WATTLANE_STATE_DIR"] = str(state_dir)
    cfg = load_config(None)
    port = free_port()
    cfg.server.host, cfg.server.port = "127.0.0.1", port
    dep = Deployment(cfg, state_dir)
    load_before = os.getloadavg()
    try:
        dep.start(host="127.0.0.1", port=port)
        serve.run(_plain_app(cfg.model_dump(mode="json"), str(state_dir)), name="plain", route_prefix="/plain",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL_ID, "messages": PROMPT, "max_tokens": 1}
        ledger = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
        with httpx.Client(base_url=url, timeout=60.0) as client:
            deadline = time.time() + 300
            while (probe := client.post("/plain/v1/chat/completions", json=body)).status_code != 200:
                if time.time() > deadline or 400 <= probe.status_code < 500:
                    raise RuntimeError(f"the plain app did not come up ({probe.status_code} {probe.text[:300]})")
                time.sleep(0.5)
            pair = (("plain", "/plain/v1/chat/completions"), ("wattlane", "/v1/chat/completions"))
            rounds: list[dict[str, list[float]]] = []
            missing_footprint = missing_rows = 0
            stage_samples: list[tuple[float, dict[str, float]]] = []
            plain_transport_ms: list[float] = []  # the plain ingress's call to its model and back, less the engine
            plain_engine_ms: list[float] = []
            plain_rest_ms: list[float] = []  # its handler less the call: the body's JSON, the answer's
            plain_outside_ms: list[float] = []  # the client's time less the handler's
            cpu_start: dict[str, float] = {}
            for round_index in range(rounds_count):
                timings: dict[str, list[float]] = {"plain": [], "wattlane": []}
                for i in range((warmup if round_index == 0 else 0) + requests):
                    if round_index == 0 and i == warmup:
                        cpu_start = _cpu_seconds_by_process()
                    # which app goes first alternates too, so neither always follows the other's leftovers
                    for name, path in pair if i % 2 == 0 else pair[::-1]:
                        t0 = time.perf_counter()
                        r = client.post(path, json=body)
                        elapsed = time.perf_counter() - t0
                        if r.status_code != 200:
                            raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
                        if name == "wattlane":
                            usage = r.json()["usage"]
                            if not (usage.get("energy", {}).get("joules") is not None and usage.get("carbon")):
                                missing_footprint += 1
                            rid = r.headers["x-request-id"]
                            if ledger.execute("SELECT COUNT(*) FROM requests WHERE request_id = ?", (rid,)).fetchone()[0] != 1:
                                missing_rows += 1
                        if round_index > 0 or i >= warmup:
                            timings[name].append(elapsed)
                            stages = parse_server_timing(r.headers["server-timing"])
                            if name == "wattlane":
                                stage_samples.append((elapsed, stages))
                            else:
                                plain_transport_ms.append(stages["replica"] - stages["engine"])
                                plain_engine_ms.append(stages["engine"])
                                plain_rest_ms.append(stages["total"] - stages["replica"])
                                plain_outside_ms.append(elapsed * 1000.0 - stages["total"])
                rounds.append(timings)
            cpu_end = _cpu_seconds_by_process()
        ledger.close()
    finally:
        load_after = os.getloadavg()
        dep.stop()
        shutil.rmtree(state_dir, ignore_errors=True)  # the assembled weights alone are 244 MB
    timed = requests * rounds_count
    # the processes' background work (the agent's meter, the gateway's refresher) counts: it is part of the cost
    cpu_ms_by_process = {k: v * 1000.0 / timed for k, v in sorted(_cpu_used_by_title(cpu_start, cpu_end).items())}
    cpu_ms_per_request = {g: sum(v for k, v in cpu_ms_by_process.items() if _process_group(k) == g)
                          for g in ("plain", "wattlane", "shared")}
    plain_s = [t for r in rounds for t in r["plain"]]
    watt_s = [t for r in rounds for t in r["wattlane"]]
    plain, watt = _percentiles(plain_s), _percentiles(watt_s)
    per_round = []
    for r in rounds:
        p, w = _percentiles(r["plain"]), _percentiles(r["wattlane"])
        per_round.append({"plain_p50_ms": p["p50_ms"], "plain_p99_ms": p["p99_ms"], "wattlane_p50_ms": w["p50_ms"],
                          "wattlane_p99_ms": w["p99_ms"], "added_p50_ms": w["p50_ms"] - p["p50_ms"],
                          "added_p99_ms": w["p99_ms"] - p["p99_ms"]})
    return {
        "benchmark": "gateway_overhead",
        "command": "python -m benchmarks.gateway_overhead" + (f" --rounds {rounds_count}" if rounds_count != 3 else "")
                   + (f" --requests {requests}" if requests != 200 else ""),
        "model": MODEL_ID,
        "requests_each": requests,
        "rounds": rounds_count,
        "warmup_each": warmup,
        "max_tokens": 1,
        "plain_ray_serve": plain,
        "wattlane": watt,
        "added_p50_ms": watt["p50_ms"] - plain["p50_ms"],
        "added_p99_ms": watt["p99_ms"] - plain["p99_ms"],
        "added_p50_ms_ci95": list(added_p50_interval_ms(plain_s, watt_s)),
        "added_median_of_pairs_ms": statistics.median(
            w - p for r in rounds for w, p in zip(r["wattlane"], r["plain"])) * 1000,
        "per_round": per_round,
        "added_p50_ms_median_of_rounds": statistics.median(r["added_p50_ms"] for r in per_round),
        "added_p99_ms_median_of_rounds": statistics.median(r["added_p99_ms"] for r in per_round),
        "cpu_ms_per_request": cpu_ms_per_request,
        "cpu_ms_per_request_by_process": cpu_ms_by_process,
        "wattlane_stages_ms": stage_breakdown(stage_samples),
        "plain_stages_ms": {"serve_and_transport": _p50_and_mean(plain_transport_ms),
                            "engine": _p50_and_mean(plain_engine_ms), "gateway_rest": _p50_and_mean(plain_rest_ms),
                            "outside_handler": _p50_and_mean(plain_outside_ms)},
        "wattlane_answers_without_energy_or_carbon": missing_footprint,
        "wattlane_answers_whose_ledger_row_was_not_committed": missing_rows,
        "target": {"added_p50_ms": 1.0, "added_p99_ms": 3.0},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "time_unix_s": time.time(),
    }


def _stage_lines(stages: dict[str, dict[str, float]], result: dict[str, Any]) -> list[str]:
    own = [name for name, _, plain_too in STAGE_ROWS if not plain_too and name in stages]
    own_p50 = sum(stages[n]["p50_ms"] for n in own)
    plain = result.get("plain_stages_ms", {})

    def plain_cell(name: str, plain_too: bool) -> str:
        if name in plain:
            return f"{plain[name]['p50_ms']:.2f}"
        return "not measured" if plain_too else "-"

    lines = [
        "Where Wattlane's time goes: the stages of its answers' `Server-Timing` headers (measured in the gateway and "
        "the replica on every timed answer), and the parts derived from them; the plain app times its call to the "
        "model and the engine the same way:",
        "",
        "| stage | Wattlane p50 (ms) | Wattlane mean (ms) | plain p50 (ms) |",
        "|---|---:|---:|---:|",
        *[f"| `{name}`: {what} | {stages[name]['p50_ms']:.2f} | {stages[name]['mean_ms']:.2f} | "
          f"{plain_cell(name, plain_too)} |" for name, what, plain_too in STAGE_ROWS if name in stages],
        "",
        f"The stages the plain app has no counterpart for ({', '.join(f'`{n}`' for n in own)}) take {own_p50:.2f} ms "
        f"at their medians, against {result['added_p50_ms']:.1f} ms added at p50.",
    ]
    if "serve_and_transport" in plain and "serve_and_transport" in stages:
        slower = stages["serve_and_transport"]["p50_ms"] - plain["serve_and_transport"]["p50_ms"]
        lines[-1] += (f" Serve's call to the model and back takes {slower:.2f} ms longer for Wattlane (its request "
                      "router's placement, typed messages, the replica's reports to its node agent, and more processes "
                      f"sharing the 2 cores) than for the plain app: together {own_p50 + slower:.2f} ms.")
    if "outside_handler" in plain and "outside_handler" in stages:
        front = (stages["outside_handler"]["p50_ms"] + stages["gateway_rest"]["p50_ms"]
                 - plain["outside_handler"]["p50_ms"] - plain["gateway_rest"]["p50_ms"])
        lines[-1] += (f" Before and after the call (HTTP, the proxy, the body's read, Wattlane's validation, "
                      f"middlewares and authentication, the answer): {front:+.2f} ms against the plain app "
                      "(`outside_handler` + `gateway_rest`; the plain app reads its body inside its handler).")
    return [*lines, ""]


def write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gateway-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    p, w = result["plain_ray_serve"], result["wattlane"]
    m = result["machine"]
    met = result["added_p50_ms"] <= 1.0 and result["added_p99_ms"] <= 3.0
    lines = [
        "# Gateway overhead: Wattlane vs a plain Ray Serve app",
        "",
        f"Command: `{result.get('command', 'python -m benchmarks.gateway_overhead')}`. {result['rounds']} rounds of "
        f"{result['requests_each']} sequential non-streaming chats to each app "
        f"(max_tokens {result['max_tokens']}, after {result['warmup_each']} warm-up requests each) to "
        f"`{result['model']}` on llama.cpp, alternating a plain Ray Serve app (FastAPI ingress -> handle -> "
        "a deployment running the same engine and weights) and Wattlane's embedded default, on one Ray "
        "session and one Serve proxy.",
        "",
        "All rounds pooled:",
        "",
        "| | p50 (ms) | p99 (ms) | mean (ms) |",
        "|---|---:|---:|---:|",
        f"| plain Ray Serve | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['mean_ms']:.1f} |",
        f"| Wattlane | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | {w['mean_ms']:.1f} |",
        f"| **added by Wattlane** | **{result['added_p50_ms']:.1f}** | **{result['added_p99_ms']:.1f}** | "
        f"{w['mean_ms'] - p['mean_ms']:.1f} |",
        "",
        *([f"Added p50, 95% interval (paired bootstrap over the {len(result.get('per_round', [])) * result['requests_each']} "
           f"pairs of requests, 2,000 resamples): {ci[0]:.2f} to {ci[1]:.2f} ms.", ""]
          if (ci := result.get("added_p50_ms_ci95")) else []),
        "Each round:",
        "",
        "| round | plain p50 | Wattlane p50 | added p50 | plain p99 | Wattlane p99 | added p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {i + 1} | {r['plain_p50_ms']:.1f} | {r['wattlane_p50_ms']:.1f} | {r['added_p50_ms']:.1f} | "
          f"{r['plain_p99_ms']:.1f} | {r['wattlane_p99_ms']:.1f} | {r['added_p99_ms']:.1f} |"
          for i, r in enumerate(result.get("per_round", []))],
        "",
        f"Median over rounds: {result.get('added_p50_ms_median_of_rounds', result['added_p50_ms']):.1f} ms p50 and "
        f"{result.get('added_p99_ms_median_of_rounds', result['added_p99_ms']):.1f} ms p99 added.",
        "",
        f"Median of the per-pair differences: {result['added_median_of_pairs_ms']:.1f} ms. "
        f"Target: at most 1 ms p50 and 3 ms p99 added: {'met' if met else 'not met'}.",
        "",
        *([f"CPU time per request, user + system, from the processes' counters over the timed rounds (psutil; "
           "background loops included): plain app's replicas (ingress and model) "
           f"{c['plain']:.2f} ms, Wattlane's (gateway, model replica, node agent) {c['wattlane']:.2f} ms, shared "
           f"(Serve's proxy and controller, Ray's raylet and GCS; per pair of requests) {c['shared']:.2f} ms. "
           "On 2 cores every ms of CPU that a request's processes need while others run is also a wait.", "",
           "| process | CPU ms per request |", "|---|---:|",
           *[f"| `{k}` | {v:.2f} |" for k, v in sorted(result.get("cpu_ms_per_request_by_process", {}).items(),
                                                      key=lambda kv: -kv[1])], ""]
          if (c := result.get("cpu_ms_per_request")) else []),
        *(_stage_lines(st, result) if (st := result.get("wattlane_stages_ms")) else []),
        f"Every Wattlane answer carried usage.energy and usage.carbon "
        f"({result['wattlane_answers_without_energy_or_carbon']} without), and its ledger row was already "
        f"committed when the answer arrived ({result['wattlane_answers_whose_ledger_row_was_not_committed']} not).",
        "",
        *([f"Before ({b['label']}; the same benchmark): Wattlane {b['wattlane']['p50_ms']:.1f} ms p50 / {b['wattlane']['p99_ms']:.1f} "
           f"ms p99 against plain {b['plain_ray_serve']['p50_ms']:.1f} / {b['plain_ray_serve']['p99_ms']:.1f}, "
           f"i.e. {b['added_p50_ms']:.1f} ms p50 and {b['added_p99_ms']:.1f} ms p99 added.", ""]
          if (b := result.get("before")) else []),
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}. Load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_before'])} before and "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_after'])} after. The machine is shared with other "
        "work, so the tails (p99) are noisy; alternating the two apps gives both the same noise.",
        "",
    ]
    (out_dir / "gateway-overhead.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests to each app per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of interleaved requests, on one deployment")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--before", type=Path, help="the JSON of a run on an earlier commit, to show beside this one")
    ap.add_argument("--before-label", default="an earlier commit")
    args = ap.parse_args()
    result = run(args.requests, args.warmup, args.rounds)
    if args.before:
        before = json.loads(args.before.read_text())
        result["before"] = {"label": args.before_label,
                            **{k: before[k] for k in ("plain_ray_serve", "wattlane", "added_p50_ms", "added_p99_ms")}}
    write(result, args.out)
    print(json.dumps({k: result[k] for k in ("command", "plain_ray_serve", "wattlane", "added_p50_ms", "added_p99_ms",
                                             "per_round")}, indent=2))


if __name__ == "__main__":
    main()

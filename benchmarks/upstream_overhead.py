"""Measure what the `openai` upstream engine, and the whole gateway, add over calling an upstream server directly.

    python -m benchmarks.upstream_overhead   # writes docs/results/upstream-overhead.md and .json

The upstream is llama-cpp-python's own server (`python -m llama_cpp.server`) on SmolLM2-135M, one
thread. Every request is a completion of "Hi" with max_tokens=1, so the server's own work is as small
as it gets and what is measured is the path. Two comparisons, each with 300 requests sequentially and
300 at concurrency 8:
- engine: a streaming POST with one shared httpx.AsyncClient, reading the SSE to its end, against
  UpstreamEngine.generate() on the same request in the same process (its body, its SSE parser, its
  EngineEvents, its health bookkeeping, its health checker thread running as in a replica): the
  engine's own cost. An A/A side, the same direct call again, takes turns with the two in the same
  rotation, so the file shows how far two identical sides differ on this machine (the noise band),
  and the comparison runs in several rounds (per-round figures, the median over rounds, and all
  rounds pooled). Garbage-collector pauses of the process are booked to the side whose requests were
  in flight, so a tail made by one pause shows as such;
- gateway: a non-streaming POST to the server against the same POST through `wattlane serve`
  (gateway, routing, Ray Serve, the replica hosting the engine, node agent, energy, ledger commit),
  one round.
The sides take turns request by request (sequential) or batch by batch (concurrent) so that all see
the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from scheduler.datafiles import REPOSITORY_DIR

RESULTS_DIR = REPOSITORY_DIR / "docs" / "results"
MODEL_ID = "smollm2-135m-instruct"
ALIAS = "smol"
BODY = {"model": ALIAS, "prompt": "Hi", "max_tokens": 1, "temperature": 0.0}
#: issue #12's target for the engine: at most this much added over calling the server directly
TARGET_ADDED_MS = {50: 2.0, 99: 5.0}
#: a garbage-collector pause at least this long is counted as one that can make a tail
GC_PAUSE_COUNTED_MS = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout_s:g} s")


def start_llama_server(workdir: Path, n_batch: int) -> tuple[subprocess.Popen, str]:
    from scheduler.config import load_config
    from scheduler.weights import resolve_weights

    cfg = load_config(None)
    weights = resolve_weights(cfg.model(MODEL_ID), cfg, cache_dir=workdir / "models")
    port = _free_port()
    log = open(workdir / "llama-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(weights), "--model_alias", ALIAS,
                             "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "2048",
                             "--n_batch", str(n_batch), "--n_ubatch", str(n_batch), "--verbose", "False",
                             "--interrupt_requests", "False"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/v1/models", proc, 120, "llama_cpp.server")
    return proc, url


def start_wattlane(workdir: Path, upstream_url: str) -> tuple[subprocess.Popen, str]:
    config = {"models": [{"id": "smol-up", "kind": "chat", "engine": "openai", "params_b": 0.135,
                          "max_ongoing_requests": 16,
                          "endpoints": [{"base_url": upstream_url, "served_model_name": ALIAS, "devices": ["cpu0"],
                                         "server": "generic"}]}],
              "devices": {"nvml": False, "cpu": True},
              "energy": {"carbon": {"provider": "fixed", "intensity_gco2e_per_kwh": 400.0}}}
    path = workdir / "wattlane.yaml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WATTLANE_"))}
    env.update(WATTLANE_STATE_DIR=str(workdir / "state"))
    log = open(workdir / "wattlane.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--config", str(path), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/readyz", proc, 300, "wattlane serve")
    return proc, url


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- the two sides of each comparison ------------------------------------------------------------------


async def direct_stream(client: httpx.AsyncClient, url: str) -> float:
    """One streaming request read to the end of its body, as the openai client does, so its connection is kept."""
    t0 = time.perf_counter()
    done = False
    async with client.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            done = done or line == "data: [DONE]"
    assert done
    return time.perf_counter() - t0


async def engine_stream(engine: Any) -> float:
    from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams

    request = GenerationRequest("bench", ModelKind.COMPLETION, prompt="Hi",
                                params=SamplingParams(max_tokens=1, temperature=0.0))
    t0 = time.perf_counter()
    async with contextlib.aclosing(engine.generate(request)) as events:  # as the replica reads them
        async for ev in events:
            if ev.finished:
                break
    return time.perf_counter() - t0


async def post_json(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


class GcPauses:
    """This process's garbage-collector pauses, each booked to the side whose requests were in flight."""

    def __init__(self) -> None:
        self.side: str | None = None
        self.pauses: list[tuple[str | None, int, float]] = []  # (side, generation, milliseconds)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((self.side, info["generation"], (time.perf_counter() - self._started) * 1000))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def by_side(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for side, generation, ms in self.pauses:
            if side is None:
                continue
            d = out.setdefault(side, {"collections": 0, "full_collections": 0,
                                      f"pauses_over_{GC_PAUSE_COUNTED_MS:g}_ms": 0, "longest_pause_ms": 0.0})
            d["collections"] += 1
            d["full_collections"] += generation == 2
            d[f"pauses_over_{GC_PAUSE_COUNTED_MS:g}_ms"] += ms >= GC_PAUSE_COUNTED_MS
            d["longest_pause_ms"] = round(max(d["longest_pause_ms"], ms), 3)
        return out


async def rotate(sides: dict[str, Callable[[], Awaitable[float]]], n: int, concurrency: int,
                 pauses: GcPauses | None = None, warmup: int = 5) -> dict[str, list[float]]:
    """n timings of each side, the sides taking turns: one request each (concurrency 1), or one batch of
    `concurrency` requests each, a batch all in flight together; every side sees the same load."""
    for _ in range(warmup):  # warm connections and caches on every side
        for f in sides.values():
            await f()
    timings: dict[str, list[float]] = {name: [] for name in sides}
    done = 0
    while done < n:
        k = min(concurrency, n - done)
        for name, f in sides.items():
            if pauses is not None:
                pauses.side = name
            timings[name] += await asyncio.gather(*(f() for _ in range(k)))
        if pauses is not None:
            pauses.side = None
        done += k
    return timings


def summary(direct: list[float], through: list[float]) -> dict[str, Any]:
    d, t = np.array(direct) * 1000, np.array(through) * 1000
    out = {"n": len(d)}
    for q in (50, 99):
        out[f"direct_p{q}_ms"] = round(float(np.percentile(d, q)), 3)
        out[f"through_p{q}_ms"] = round(float(np.percentile(t, q)), 3)
        out[f"added_p{q}_ms"] = round(float(np.percentile(t, q) - np.percentile(d, q)), 3)
    return out


def _pct(samples_s: list[float], q: int) -> float:
    return float(np.percentile(np.array(samples_s) * 1000, q))


def stalled_batches(rounds: list[dict[str, list[float]]], concurrency: int) -> dict[str, Any]:
    """Per side, the batches (single requests at concurrency 1) whose slowest request took over twice the
    median batch's slowest, all sides and rounds together: a stall that the engine made would show as more
    of them on the engine's side; noise spreads them evenly."""
    maxima = {side: [max(r[side][i:i + concurrency]) for r in rounds for i in range(0, len(r[side]), concurrency)]
              for side in rounds[0]}
    threshold_s = 2 * statistics.median(x for v in maxima.values() for x in v)
    return {"threshold_ms": round(threshold_s * 1000, 3), "batches_per_side": len(maxima["direct"]),
            **{side: sum(x > threshold_s for x in v) for side, v in maxima.items()}}


def engine_summary(rounds: list[dict[str, list[float]]], concurrency: int = 1) -> dict[str, Any]:
    """Per-round and over-round figures of the engine and of the A/A side (direct_again), both against direct."""
    per_round = []
    for r in rounds:
        row: dict[str, Any] = {"n": len(r["direct"])}
        for q in (50, 99):
            d = _pct(r["direct"], q)
            row[f"direct_p{q}_ms"] = round(d, 3)
            for side, key in (("engine", "engine"), ("direct_again", "aa")):
                row[f"{key}_p{q}_ms"] = round(_pct(r[side], q), 3)
                row[f"{key}_added_p{q}_ms"] = round(_pct(r[side], q) - d, 3)
        per_round.append(row)
    pooled = {name: [t for r in rounds for t in r[name]] for name in rounds[0]}
    out: dict[str, Any] = {"rounds": len(rounds), "requests_per_round": len(rounds[0]["direct"])}
    for q in (50, 99):
        d = _pct(pooled["direct"], q)
        for key in ("engine", "aa"):
            added = [row[f"{key}_added_p{q}_ms"] for row in per_round]
            out[f"{key}_added_p{q}_ms_median_of_rounds"] = round(statistics.median(added), 3)
            out[f"{key}_added_p{q}_ms_range_of_rounds"] = [min(added), max(added)]
        out[f"pooled_direct_p{q}_ms"] = round(d, 3)
        out[f"pooled_engine_p{q}_ms"] = round(_pct(pooled["engine"], q), 3)
        out[f"pooled_engine_added_p{q}_ms"] = round(_pct(pooled["engine"], q) - d, 3)
        out[f"pooled_aa_added_p{q}_ms"] = round(_pct(pooled["direct_again"], q) - d, 3)
    out["stalled_batches"] = stalled_batches(rounds, concurrency)
    out["per_round"] = per_round
    return out


def engine_verdict(conc: int, s: dict[str, Any]) -> str:
    """One line of the results' reading: the engine's added p50 and p99 against the target and the A/A band."""
    parts = []
    for q in (50, 99):
        added, target = s[f"engine_added_p{q}_ms_median_of_rounds"], TARGET_ADDED_MS[q]
        lo, hi = s[f"aa_added_p{q}_ms_range_of_rounds"]
        band = "inside" if lo <= added <= hi else "above" if added > hi else "below"
        parts.append(f"p{q} {added:+.2f} ms (median of {s['rounds']} rounds; target +{target:g} ms: "
                     f"{'met' if added <= target else 'NOT met'}; the A/A band of the rounds is {lo:+.2f} .. "
                     f"{hi:+.2f} ms, the engine's median is {band} it; all rounds pooled: engine "
                     f"{s[f'pooled_engine_added_p{q}_ms']:+.2f} ms, A/A {s[f'pooled_aa_added_p{q}_ms']:+.2f} ms)")
    st = s["stalled_batches"]
    what = "batches whose slowest request took" if conc > 1 else "requests that took"
    parts.append(f"{what} over twice the median ({st['threshold_ms']:.1f} ms), of "
                 f"{st['batches_per_side']} per side: engine {st['engine']}, direct {st['direct']}, "
                 f"A/A {st['direct_again']}")
    return f"- **Engine, concurrency {conc}:** " + "; ".join(parts) + "."


async def engine_part(url: str, n: int, rounds_count: int) -> dict[str, Any]:
    from scheduler.config import UpstreamEndpointConfig, UpstreamOptions
    from scheduler.engines.base import ModelKind
    from scheduler.engines.openai_upstream import UpstreamEngine

    # health checks on, as build_upstream_engine makes it: its checker thread is part of the engine's cost
    engine = UpstreamEngine("smol-up", ModelKind.COMPLETION,
                            UpstreamEndpointConfig(base_url=url, served_model_name=ALIAS, devices=["cpu0"]),
                            UpstreamOptions(), context_length=2048)
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for conc in (1, 8):
            rounds = []
            with GcPauses() as pauses:
                for i in range(rounds_count):
                    sides = {"direct": lambda: direct_stream(client, url), "engine": lambda: engine_stream(engine),
                             "direct_again": lambda: direct_stream(client, url)}
                    order = list(sides) if i % 2 == 0 else list(sides)[::-1]  # neither direct side always leads
                    rounds.append(await rotate({k: sides[k] for k in order}, n, conc, pauses))
            out[f"concurrency_{conc}"] = {**engine_summary(rounds, conc), "gc_pauses_by_side": pauses.by_side()}
    await engine.close()
    return out


async def gateway_part(url: str, gateway: str, n: int) -> dict[str, Any]:
    out = {}
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=60, limits=limits) as direct, \
            httpx.AsyncClient(timeout=60, limits=limits) as through:
        for conc in (1, 8):
            t = await rotate({"direct": lambda: post_json(direct, url, BODY),
                              "through": lambda: post_json(through, gateway, {**BODY, "model": "smol-up"})}, n, conc)
            out[f"concurrency_{conc}"] = summary(t["direct"], t["through"])
    return out


def write_results(results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "upstream-overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    before, after = results["load_average_before"], results["load_average_after"]
    engine = results["engine"]
    lines = [
        "# Upstream engine overhead",
        "",
        f"Command: `{results['command']}` ({results['date_utc']}, {results['machine']}; 1/5/15-minute load "
        f"average {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f} before, "
        f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f} after).",
        "",
        "What the `openai` engine, and the whole gateway, add to a request over calling the same",
        "OpenAI-compatible server directly: llama-cpp-python's server on SmolLM2-135M (one thread), a",
        f"completion of \"Hi\" with max_tokens=1, {results['requests']} requests sequentially and "
        f"{results['requests']} at concurrency 8, the",
        "sides taking turns (request by request, or batch of 8 by batch of 8) so that all see the same load.",
        "Target (issue #12): at most +2 ms p50 and +5 ms p99 for the engine.",
        "",
        "## Engine (in-process, streaming) vs direct httpx, with an A/A side",
        "",
        "Three sides take turns in every round: direct, the engine, and direct again (A/A: the same call as",
        "direct, so whatever it \"adds\" is noise). `added` is a side's percentile minus direct's, per round;",
        "the A/A band is the lowest and highest A/A figure over the rounds.",
        "",
        "| concurrency | rounds x requests | engine added p50 ms (median of rounds) | A/A p50 band ms "
        "| engine added p99 ms (median of rounds) | A/A p99 band ms | pooled: direct p99 / engine p99 ms "
        "| pooled added p99 ms: engine / A/A |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for conc in (1, 8):
        e = engine[f"concurrency_{conc}"]
        lo50, hi50 = e["aa_added_p50_ms_range_of_rounds"]
        lo99, hi99 = e["aa_added_p99_ms_range_of_rounds"]
        lines.append(f"| {conc} | {e['rounds']} x {e['requests_per_round']} "
                     f"| {e['engine_added_p50_ms_median_of_rounds']} "
                     f"| {lo50} .. {hi50} | {e['engine_added_p99_ms_median_of_rounds']} | {lo99} .. {hi99} "
                     f"| {e['pooled_direct_p99_ms']} / {e['pooled_engine_p99_ms']} "
                     f"| {e['pooled_engine_added_p99_ms']} / {e['pooled_aa_added_p99_ms']} |")
    lines += ["", "Per round:", "",
              "| concurrency | round | direct p50 ms | engine p50 ms | A/A p50 ms | direct p99 ms | engine p99 ms "
              "| A/A p99 ms | engine added p99 ms | A/A added p99 ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for conc in (1, 8):
        for i, r in enumerate(engine[f"concurrency_{conc}"]["per_round"], 1):
            lines.append(f"| {conc} | {i} | {r['direct_p50_ms']} | {r['engine_p50_ms']} | {r['aa_p50_ms']} "
                         f"| {r['direct_p99_ms']} | {r['engine_p99_ms']} | {r['aa_p99_ms']} "
                         f"| {r['engine_added_p99_ms']} | {r['aa_added_p99_ms']} |")
    lines += ["", f"Garbage-collector pauses of the benchmark's process, booked to the side in flight "
                  f"(collections / full collections / pauses of {GC_PAUSE_COUNTED_MS:g} ms or more / longest ms):", ""]
    for conc in (1, 8):
        by_side = engine[f"concurrency_{conc}"]["gc_pauses_by_side"]
        cells = [f"{side} {d['collections']} / {d['full_collections']} / "
                 f"{d[f'pauses_over_{GC_PAUSE_COUNTED_MS:g}_ms']} / {d['longest_pause_ms']:.1f}"
                 for side, d in sorted(by_side.items())]
        lines.append(f"- concurrency {conc}: " + ("; ".join(cells) or "none"))
    if results["gateway"]:
        lines += ["", "## `wattlane serve` vs direct (non-streaming HTTP, one round)", "",
                  "| concurrency | direct p50 ms | through p50 ms | added p50 ms | direct p99 ms | through p99 ms "
                  "| added p99 ms |",
                  "|---|---|---|---|---|---|---|"]
        for conc in (1, 8):
            r = results["gateway"][f"concurrency_{conc}"]
            lines.append(f"| {conc} | {r['direct_p50_ms']} | {r['through_p50_ms']} | {r['added_p50_ms']} | "
                         f"{r['direct_p99_ms']} | {r['through_p99_ms']} | {r['added_p99_ms']} |")
    lines += ["", "## Reading it", ""]
    lines += [engine_verdict(conc, engine[f"concurrency_{conc}"]) for conc in (1, 8)]
    if results["gateway"]:
        g1, g8 = results["gateway"]["concurrency_1"], results["gateway"]["concurrency_8"]
        lines.append(f"- **Whole gateway:** {g1['added_p50_ms']:+.1f} ms p50 sequentially, "
                     f"{g8['added_p50_ms']:+.1f} ms at concurrency 8 (one round, no A/A): the gateway's own path "
                     "(Serve proxy, routing, the replica hop, energy, ledger), measured for local engines by "
                     "`benchmarks/gateway_overhead.py` (issue #11), plus the upstream hop.")
    lines += ["", "Both sides keep their connections: the direct side reads each response to its end, as the "
              "openai client does, and so does the engine (it stopped at [DONE] before, which made httpx "
              "close the connection after every request: 0.5 to 1.5 ms more per request here, a TCP or TLS "
              "handshake more against a remote server).",
              "", "At concurrency 8 one llama.cpp thread serves eight clients, and a batch of eight is in flight "
              "together, so one stall (the process descheduled on a busy machine, a full garbage collection) "
              "delays a whole batch: with 300 requests p99 is the 3rd-worst sample, usually from one batch, "
              "i.e. one event. A single round's p99 at concurrency 8 says little; the A/A band says how "
              "little. What tells an engine's stall from noise is the count of stalled batches: one the engine "
              "made would show as more of them on the engine's side, noise spreads them over all three."]
    if results["notes"]:
        lines += ["", results["notes"]]
    lines.append("")
    (RESULTS_DIR / "upstream-overhead.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per side, per round, per concurrency")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the engine comparison")
    parser.add_argument("--n-batch", type=int, default=int(os.environ.get("LLAMA_SERVER_N_BATCH", "512")),
                        help="the llama.cpp server's batch size (1 where the build's batched kernels fault)")
    parser.add_argument("--skip-gateway", action="store_true", help="measure the engine alone (no Ray)")
    parser.add_argument("--notes", default="", help="a paragraph added to the results' reading")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="wattlane-upstream-bench-"))
    server, url = start_llama_server(workdir, args.n_batch)
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.upstream_overhead", *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "llama_server_n_batch": args.n_batch,
        "requests": args.requests,
        "target_added_ms": {f"p{q}": v for q, v in TARGET_ADDED_MS.items()},
        "notes": args.notes,
    }
    try:
        results["engine"] = asyncio.run(engine_part(url, args.requests, args.rounds))
        for conc in (1, 8):
            print(engine_verdict(conc, results["engine"][f"concurrency_{conc}"]))
        results["gateway"] = {}
        if not args.skip_gateway:
            wattlane, gateway = start_wattlane(workdir, url)
            try:
                results["gateway"] = asyncio.run(gateway_part(url, gateway, args.requests))
                print(json.dumps(results["gateway"], indent=2))
            finally:
                _stop(wattlane, signal.SIGINT)
    finally:
        _stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_results(results)


if __name__ == "__main__":
    main()

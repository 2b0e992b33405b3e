"""Measure what the `openai` upstream engine, and the whole gateway, add over calling an upstream server directly.

    python -m benchmarks.upstream_overhead   # writes docs/results/upstream-overhead.md and .json

The upstream is llama-cpp-python's own server (`python -m llama_cpp.server`) on SmolLM2-135M, one
thread. Every request is a completion of "Hi" with max_tokens=1, so the server's own work is as small
as it gets and what is measured is the path. Two comparisons, each 300 requests sequentially and
300 at concurrency 8, the two sides interleaved request by request (sequential) or batch by batch
(concurrent) so that both see the same machine load:
- engine: a streaming POST with one shared httpx.AsyncClient, reading the SSE to [DONE], against
  UpstreamEngine.generate() on the same request in the same process (its body, its SSE parser,
  its EngineEvents, its health bookkeeping): the engine's own cost;
- gateway: a non-streaming POST to the server against the same POST through `wattlane serve`
  (gateway, routing, Ray Serve, the replica hosting the engine, node agent, energy, ledger commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                break
    return time.perf_counter() - t0


async def engine_stream(engine: Any) -> float:
    from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams

    request = GenerationRequest("bench", ModelKind.COMPLETION, prompt="Hi",
                                params=SamplingParams(max_tokens=1, temperature=0.0))
    t0 = time.perf_counter()
    async for ev in engine.generate(request):
        if ev.finished:
            break
    return time.perf_counter() - t0


async def post_json(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


async def compare(a, b, n: int, concurrency: int) -> tuple[list[float], list[float]]:
    """n timings of each side, interleaved (sequential) or in alternating batches of `concurrency`."""
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(5):  # warm connections and caches on both sides
        await a()
        await b()
    done = 0
    while done < n:
        k = min(concurrency, n - done)
        ta += await asyncio.gather(*(a() for _ in range(k)))
        tb += await asyncio.gather(*(b() for _ in range(k)))
        done += k
    return ta, tb


def summary(direct: list[float], through: list[float]) -> dict[str, Any]:
    d, t = np.array(direct) * 1000, np.array(through) * 1000
    out = {"n": len(d)}
    for q in (50, 99):
        out[f"direct_p{q}_ms"] = round(float(np.percentile(d, q)), 3)
        out[f"through_p{q}_ms"] = round(float(np.percentile(t, q)), 3)
        out[f"added_p{q}_ms"] = round(float(np.percentile(t, q) - np.percentile(d, q)), 3)
    return out


async def engine_part(url: str, n: int) -> dict[str, Any]:
    from scheduler.config import UpstreamEndpointConfig, UpstreamOptions
    from scheduler.engines.base import ModelKind
    from scheduler.engines.openai_upstream import UpstreamEngine

    engine = UpstreamEngine("smol-up", ModelKind.COMPLETION,
                            UpstreamEndpointConfig(base_url=url, served_model_name=ALIAS, devices=["cpu0"]),
                            UpstreamOptions(), context_length=2048, health_checks=False)
    out = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for conc in (1, 8):
            d, t = await compare(lambda: direct_stream(client, url), lambda: engine_stream(engine), n, conc)
            out[f"concurrency_{conc}"] = summary(d, t)
    await engine.close()
    return out


async def gateway_part(url: str, gateway: str, n: int) -> dict[str, Any]:
    out = {}
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=60, limits=limits) as direct, \
            httpx.AsyncClient(timeout=60, limits=limits) as through:
        for conc in (1, 8):
            d, t = await compare(lambda: post_json(direct, url, BODY),
                                 lambda: post_json(through, gateway, {**BODY, "model": "smol-up"}), n, conc)
            out[f"concurrency_{conc}"] = summary(d, t)
    return out


def write_results(results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "upstream-overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Upstream engine overhead",
        "",
        f"Command: `{results['command']}` ({results['date_utc']}, {results['machine']}).",
        "",
        "What the `openai` engine, and the whole gateway, add to a request over calling the same",
        "OpenAI-compatible server directly: llama-cpp-python's server on SmolLM2-135M (one thread), a",
        "completion of \"Hi\" with max_tokens=1, 300 requests sequentially and 300 at concurrency 8, the",
        "two sides interleaved so that both see the same load. Target (issue #12): at most +2 ms p50 and",
        "+5 ms p99 for the engine.",
        "",
        "| comparison | concurrency | direct p50 ms | through p50 ms | added p50 ms | direct p99 ms | through p99 ms "
        "| added p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part, label in (("engine", "engine in-process vs direct httpx (streaming)"),
                        ("gateway", "`wattlane serve` vs direct (non-streaming HTTP)")):
        for conc in (1, 8):
            r = results[part].get(f"concurrency_{conc}")
            if r:
                lines.append(f"| {label} | {conc} | {r['direct_p50_ms']} | {r['through_p50_ms']} | "
                             f"{r['added_p50_ms']} | "
                             f"{r['direct_p99_ms']} | {r['through_p99_ms']} | {r['added_p99_ms']} |")
    lines += ["", "## Reading it", "", results["notes"], ""]
    (RESULTS_DIR / "upstream-overhead.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--n-batch", type=int, default=int(os.environ.get("LLAMA_SERVER_N_BATCH", "512")),
                        help="the llama.cpp server's batch size (1 where the build's batched kernels fault)")
    parser.add_argument("--skip-gateway", action="store_true", help="measure the engine alone (no Ray)")
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="wattlane-upstream-bench-"))
    server, url = start_llama_server(workdir, args.n_batch)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.upstream_overhead " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "llama_server_n_batch": args.n_batch,
        "notes": args.notes,
    }
    try:
        results["engine"] = asyncio.run(engine_part(url, args.requests))
        print(json.dumps(results["engine"], indent=2))
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
    write_results(results)


if __name__ == "__main__":
    main()

"""Load and fault test of a running Wattlane: bounded mixed traffic, abandoned streams and bad input, then checks.

Starts `wattlane serve` on a config in a subprocess, sends a bounded, seeded mix of requests for a fixed time
at a fixed concurrency (plain and streamed chat, completions, streams the client abandons after the first
chunk, malformed bodies), stops the server, and then checks what a tester would: no 5xx other than
no-capacity refusals, every accepted request has exactly one ledger row (abandoned streams included), no
device is left with running requests, and memory before and after. Results go to docs/results/.

    python -m benchmarks.load_fault --config configs/local.yaml --concurrency 4 --seconds 60 --name load-fault-llamacpp
    python -m benchmarks.load_fault --config configs/sim-fleet.yaml --concurrency 32 --seconds 60 --name load-fault-sim
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"

#: request kinds and their share of the traffic
MIX = {"chat": 0.35, "chat-stream": 0.25, "completion": 0.10, "abandoned-stream": 0.15, "bad-input": 0.15}

BAD_BODIES = [
    b"{not json",
    b"[]",
    json.dumps({"model": "auto"}).encode(),
    json.dumps({"model": "auto", "messages": "hello"}).encode(),
    json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}).encode(),
    json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
]

PROMPTS = ["What is the capital of France?", "Name three primes.", "Say hello in Spanish.",
           "Give one use for a paperclip.", "What colour is the sky on a clear day?", "Count to five."]


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; 0 when the connection itself failed
    latency_seconds: float
    accepted: bool  # the gateway took the request on (a ledger row is owed)
    request_id: str = ""  # the id the client saw (body or first chunk), to look up in the ledger
    error: str = ""


@dataclass
class Report:
    config: str
    concurrency: int
    seconds: float
    requests: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    accepted: int = 0
    ledger_rows: int = 0
    ledger_rows_by_status: dict[str, int] = field(default_factory=dict)
    accepted_without_row: int = 0  # accepted requests whose id the client saw but the ledger lacks
    accepted_without_id: int = 0
    running_requests_after: int = -1
    rss_mib_before: float = 0.0
    rss_mib_after: float = 0.0
    unexpected_5xx: int = 0
    connection_errors: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (Ray's raylet, GCS and workers included)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def chat_models(url: str) -> list[str]:
    data = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    return [m["id"] for m in data]


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, models: list[str]) -> Outcome:
    t0 = time.perf_counter()
    msg = [{"role": "user", "content": rng.choice(PROMPTS)}]
    try:
        if kind == "bad-input":
            r = await client.post("/v1/chat/completions", content=rng.choice(BAD_BODIES),
                                  headers={"Content-Type": "application/json"})
            return Outcome(kind, r.status_code, time.perf_counter() - t0, accepted=False)
        if kind == "completion":
            model = "auto" if "auto" in models else models[0]
            r = await client.post("/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                                           "max_tokens": 8})
            return Outcome(kind, r.status_code, time.perf_counter() - t0, accepted=r.status_code == 200,
                           request_id=r.json().get("id", "") if r.status_code == 200 else "")
        body: dict[str, Any] = {"model": "auto", "messages": msg, "max_tokens": rng.choice([4, 8, 16])}
        if kind == "chat":
            r = await client.post("/v1/chat/completions", json=body)
            return Outcome(kind, r.status_code, time.perf_counter() - t0, accepted=r.status_code == 200,
                           request_id=r.json().get("id", "") if r.status_code == 200 else "")
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(kind, r.status_code, time.perf_counter() - t0, accepted=False)
            request_id = ""
            async for line in r.aiter_lines():
                if line.startswith("data: {") and not request_id:
                    request_id = json.loads(line[6:]).get("id", "")
                if kind == "abandoned-stream" and request_id:
                    break  # the client walks away after its first chunk; the work done is still owed a row
        return Outcome(kind, 200, time.perf_counter() - t0, accepted=True, request_id=request_id)
    except httpx.HTTPError as exc:
        return Outcome(kind, 0, time.perf_counter() - t0, accepted=False, error=type(exc).__name__)


async def drive(url: str, concurrency: int, seconds: float, seed: int) -> list[Outcome]:
    models = chat_models(url)
    deadline = time.monotonic() + seconds
    outcomes: list[Outcome] = []
    kinds, weights = zip(*MIX.items())

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                outcomes.append(await one_request(client, rng.choices(kinds, weights)[0], rng, models))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return outcomes


def read_ledger(state_dir: Path) -> tuple[Counter, set[str]]:
    """Rows per status and the request ids present, read from the SQLite file after the server stopped."""
    con = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        counts = Counter(dict(con.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall()))
        ids = {row[0] for row in con.execute("SELECT DISTINCT request_id FROM requests")}
        return counts, ids
    finally:
        con.close()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 90, 99)} | {"max": round(float(a.max()), 4)}


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"wattlane serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("wattlane serve was not ready in time")


def run(config: Path, concurrency: int, seconds: float, seed: int) -> Report:
    report = Report(config=str(config), concurrency=concurrency, seconds=seconds,
                    machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="wattlane-load-") as tmp:
        state_dir = Path(tmp)
        env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--config", str(config),
                                 "--port", str(port), "--state-dir", str(state_dir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            wait_ready(url, proc)
            time.sleep(2)
            report.rss_mib_before = round(tree_rss_mib(proc.pid), 1)
            outcomes = asyncio.run(drive(url, concurrency, seconds, seed))
            time.sleep(3)  # let abandoned generations stop and their rows commit
            devices = httpx.get(url + "/v1/devices", timeout=10).json()["data"]
            report.running_requests_after = sum(int(d.get("running_requests") or 0) for d in devices)
            report.rss_mib_after = round(tree_rss_mib(proc.pid), 1)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        counts, ledger_ids = read_ledger(state_dir)

    report.requests = len(outcomes)
    report.status_counts = {str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())}
    for kind in MIX:
        mine = [o for o in outcomes if o.kind == kind]
        report.by_kind[kind] = {"requests": len(mine),
                                "status_counts": {str(k): v for k, v in sorted(Counter(o.status for o in mine).items())},
                                "latency_seconds": percentiles([o.latency_seconds for o in mine if o.status == 200])}
    report.accepted = sum(o.accepted for o in outcomes)
    report.ledger_rows = sum(counts.values())
    report.ledger_rows_by_status = dict(counts)
    accepted = [o for o in outcomes if o.accepted]
    report.accepted_without_id = sum(1 for o in accepted if not o.request_id)
    report.accepted_without_row = sum(1 for o in accepted if o.request_id and o.request_id not in ledger_ids)
    report.unexpected_5xx = sum(1 for o in outcomes if o.status >= 500 and o.status != 503)
    report.connection_errors = sum(1 for o in outcomes if o.status == 0)
    bad = [o for o in outcomes if o.kind == "bad-input"]
    report.checks = {
        "no_unexpected_5xx": report.unexpected_5xx == 0 and report.connection_errors == 0,
        "bad_input_is_4xx": all(400 <= o.status < 500 for o in bad),
        "every_accepted_request_has_a_row": report.accepted_without_row == 0 and report.accepted_without_id == 0,
        "no_running_requests_left": report.running_requests_after == 0,
    }
    return report


def write(report: Report, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    lines = [f"# Load and fault test: {report.config}", "",
             f"`python -m benchmarks.load_fault --config {report.config} --concurrency {report.concurrency} "
             f"--seconds {report.seconds:g} --name {name}` on {report.machine['cpus']} CPUs, {report.machine['date']}.",
             "", f"{report.requests} requests at concurrency {report.concurrency} for {report.seconds:g} s; "
             f"status counts {report.status_counts}.", "",
             "| kind | requests | statuses | latency p50 / p90 / p99 (s, 200s only) |", "|---|---|---|---|"]
    for kind, k in report.by_kind.items():
        lat = k["latency_seconds"]
        lat_s = f"{lat['p50']} / {lat['p90']} / {lat['p99']}" if lat else "-"
        lines.append(f"| {kind} | {k['requests']} | {k['status_counts']} | {lat_s} |")
    lines += ["", f"- accepted requests: {report.accepted}; ledger rows after stop: {report.ledger_rows} "
              f"{report.ledger_rows_by_status}; accepted requests whose id is missing from the ledger: "
              f"{report.accepted_without_row}",
              f"- devices' running requests after the load: {report.running_requests_after}",
              f"- memory of the server's process tree: {report.rss_mib_before} MiB before, {report.rss_mib_after} MiB after",
              f"- unexpected 5xx: {report.unexpected_5xx}; connection errors: {report.connection_errors}",
              f"- checks: {report.checks}", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "local.yaml")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="load-fault")
    args = ap.parse_args()
    report = run(args.config, args.concurrency, args.seconds, args.seed)
    write(report, args.name)
    print(json.dumps({"requests": report.requests, "status_counts": report.status_counts, "checks": report.checks}))
    sys.exit(0 if all(report.checks.values()) else 1)


if __name__ == "__main__":
    main()

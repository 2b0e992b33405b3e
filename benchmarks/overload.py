"""Overload test: drive a real `wattlane serve` far past its capacity and record what clients see.

Starts the CLI on a config (default configs/sim-fleet.yaml, the simulated 8-GPU H100 node),
keeps `--concurrency` requests in flight for `--seconds` (each client sends its next request as
soon as the last one answers), and writes status counts, Retry-After, and latency percentiles of
accepted and refused requests to docs/results/overload.{json,md}:

    python -m benchmarks.overload --concurrency 900 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


class Server:
    """`wattlane serve` in a subprocess; stopped with SIGINT (its clean shutdown path)."""

    def __init__(self, config: Path, port: int, state_dir: Path, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "scheduler", "serve", "--config", str(config), "--port", str(port),
                    "--state-dir", str(state_dir)]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def drive(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> list[dict[str, Any]]:
    """Closed loop: `concurrency` clients, each sending back to back until `seconds` have passed."""
    results: list[dict[str, Any]] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0, connect=60.0)) as client:
        async def one_client() -> None:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    code = r.json().get("error", {}).get("code") if status != 200 else None
                except httpx.HTTPError as exc:
                    status, retry_after, code = 0, None, type(exc).__name__
                elapsed = time.monotonic() - t0
                results.append({"status": status, "seconds": elapsed, "retry_after": retry_after, "code": code})
                if status in (429, 503) and retry_after:
                    # as the OpenAI client does: wait what Retry-After says before the next request
                    await asyncio.sleep(float(retry_after))

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return results


def summarise(results: list[dict[str, Any]], *, concurrency: int, seconds: float, wall_s: float, config: str,
              body: dict[str, Any], command: str) -> dict[str, Any]:
    ok = [r["seconds"] for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]
    pct = lambda xs: {f"p{q}": percentile(xs, q) for q in (50, 90, 99)} | {"max": max(xs) if xs else None}
    return {
        "command": command,
        "config": config,
        "concurrency": concurrency,
        "duration_seconds": seconds,
        "wall_seconds": round(wall_s, 1),
        "request_body": body,
        "requests": len(results),
        "status_counts": dict(sorted(Counter(str(r["status"]) for r in results).items())),
        "refusal_codes": dict(Counter(r["code"] for r in refused)),
        "refused_with_retry_after": sum(1 for r in refused if r["retry_after"]),
        "accepted_latency_seconds": pct(ok),
        "refused_latency_seconds": pct([r["seconds"] for r in refused]),
        "accepted_per_second": round(len(ok) / wall_s, 1) if wall_s else None,
    }


def write_results(runs: list[dict[str, Any]], out_dir: Path, note: str) -> None:
    """overload.json (every run) and overload.md (a table per run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overload.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    first = runs[0]
    lines = [
        "# Overload: the simulated fleet under more load than it can serve in time",
        "",
        note,
        "",
        f"Command: `{first['command']}`",
        "",
        f"{first['concurrency']} clients in a closed loop for {first['duration_seconds']:g} s; each sends "
        f"`{json.dumps(first['request_body'])[:160]}...` and, when refused, waits what Retry-After says "
        "(as the OpenAI client does). Measured on a shared 2-core machine: the gateway, Ray Serve and "
        "the clients compete for the same CPUs, so absolute latencies are far above what the simulated "
        "GPUs alone would give; compare the runs.",
        "",
        "| run | config | requests | status counts | refused with Retry-After | accepted/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['label']} | `{r['config']}` | {r['requests']} | "
                     f"{', '.join(f'{k}: {v}' for k, v in r['status_counts'].items())} | "
                     f"{r['refused_with_retry_after']} | {r['accepted_per_second']} |")
    lines += ["", "| run | latency (s) | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for r in runs:
        for what, key in (("accepted (200)", "accepted_latency_seconds"), ("refused (429/503)", "refused_latency_seconds")):
            p = r[key]
            lines.append(f"| {r['label']} | {what} | {fmt(p['p50'])} | {fmt(p['p90'])} | {fmt(p['p99'])} | {fmt(p['max'])} |")
    lines.append("")
    (out_dir / "overload.md").write_text("\n".join(lines))


NOTE = (
    "Admission bounds queueing by the SLO (docs/routing.md, Admission): a request whose TTFT target "
    "(its own `slo.ttft_ms`, else `routing.default_slo`) no replica of an adequate model can meet, "
    "because the queue ahead of it is already longer than the target, is refused at once with 503 "
    "`no_capacity` and `Retry-After` instead of waiting.\n\n"
    "Reading (2-core machine): the accepted requests' p99 falls against the baseline, but most of the "
    "load is refused and the accepted rate falls with it. The refused requests' own latency shows why: "
    "they waited many seconds in the HTTP proxy and the gateway's event loop before routing ever saw "
    "them. That CPU backlog in front of the router also slows the start events the gateway counts, so "
    "StartQueue reads it as model queueing and refuses work the simulated GPUs could still take. "
    "Admission at the routing step bounds the queue at the models; it cannot bound the wait in front "
    "of the router, which needs a front-door concurrency limit (refuse before parsing) and enough "
    "gateway CPU. Regenerate with the command above."
)


def run_once(config: Path, body: dict[str, Any], concurrency: int, seconds: float, url: str | None) -> tuple[list, float]:
    with tempfile.TemporaryDirectory(prefix="wattlane-overload-") as tmp:
        server = None
        try:
            if url is None:
                server = Server(config, free_port(), Path(tmp) / "state", Path(tmp) / "serve.log")
                server.wait_ready()
                url = server.url
            t0 = time.monotonic()
            results = asyncio.run(drive(url, body, concurrency, seconds))
            return results, time.monotonic() - t0
        finally:
            if server is not None:
                server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "sim-fleet.yaml")
    ap.add_argument("--concurrency", type=int, default=900)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model", default="auto")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the same load with routing.admission: queue (only Serve's queue bounds waiting)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where overload.json/.md go")
    ap.add_argument("--url", help="an already running server (skips starting one)")
    args = ap.parse_args(argv)
    body = {"model": args.model, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": "Summarise the causes of the French Revolution in a paragraph. " * 8}]}
    command = "python -m benchmarks.overload " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        shown = str(args.config.resolve().relative_to(REPO))
    except ValueError:
        shown = str(args.config)
    variants = [("as configured", args.config, shown)]
    with tempfile.TemporaryDirectory(prefix="wattlane-overload-cfg-") as tmp:
        if args.baseline and not args.url:
            import yaml

            cfg = yaml.safe_load(args.config.read_text())
            cfg.setdefault("routing", {})["admission"] = "queue"
            base = Path(tmp) / "baseline.yaml"
            base.write_text(yaml.safe_dump(cfg))
            variants.append(("baseline: admission queue", base, shown + " with routing.admission: queue"))
        runs = []
        for label, config, name in variants:
            results, wall = run_once(config, body, args.concurrency, args.seconds, args.url)
            summary = summarise(results, concurrency=args.concurrency, seconds=args.seconds, wall_s=wall, config=name,
                                body=body, command=command)
            runs.append({"label": label, **summary})
            print(json.dumps(runs[-1], indent=2))
    write_results(runs, args.out, NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())

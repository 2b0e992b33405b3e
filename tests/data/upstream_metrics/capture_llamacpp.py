"""Captures llama.cpp server's real /metrics and /slots, idle and under load, into this folder.

Not run by the tests (they read the files it wrote); rerun it to refresh the samples against
another llama.cpp build:

    python tests/data/upstream_metrics/capture_llamacpp.py --server /path/to/llama-server \
        --model /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

It starts the given llama-server on a free loopback port with --metrics and 2 parallel slots,
sends 5 concurrent bounded chat requests (so 2 run and 3 wait), scrapes /metrics twice and /slots
once while they run, waits for them to finish, scrapes both once more, and stops the server.
Each file is the response body exactly as the server sent it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ALIAS = "smollm2-135m-instruct"
PARALLEL_SLOTS = 2
REQUESTS = 5
MAX_TOKENS = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(url: str, i: int) -> int:
    body = {"model": ALIAS, "max_tokens": MAX_TOKENS, "temperature": 0.0, "seed": i,
            "messages": [{"role": "user", "content": f"Request {i}: write a long story about a lighthouse keeper."}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300).status_code


def _get(url: str) -> str:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return response.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="path to a llama-server binary")
    ap.add_argument("--model", required=True, help="path to a GGUF model")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (few keep the requests running long enough)")
    args = ap.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    version = subprocess.run([args.server, "--version"], capture_output=True, text=True, timeout=60)
    log_path = Path(tempfile.gettempdir()) / "capture_llamacpp.log"
    log = open(log_path, "w")
    cmd = [args.server, "-m", args.model, "--alias", ALIAS, "--host", "127.0.0.1", "--port", str(port),
           "--metrics", "--parallel", str(PARALLEL_SLOTS), "-c", "4096", "-t", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start; see {log_path}")
            time.sleep(0.2)

        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            futures = [pool.submit(_chat, url, i) for i in range(REQUESTS)]
            time.sleep(2.0)  # every request admitted: two in slots, the rest deferred
            busy = {"llamacpp_metrics_busy1.txt": _get(url + "/metrics"),
                    "llamacpp_slots_busy.json": _get(url + "/slots")}
            time.sleep(1.0)
            busy["llamacpp_metrics_busy2.txt"] = _get(url + "/metrics")
            statuses = [f.result() for f in futures]
        idle = {"llamacpp_metrics_idle.txt": _get(url + "/metrics"), "llamacpp_slots_idle.json": _get(url + "/slots")}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

    for name, body in {**busy, **idle}.items():
        (HERE / name).write_text(body)
    print(json.dumps({"version": (version.stdout + version.stderr).strip(), "command": cmd[1:],
                      "statuses": statuses, "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

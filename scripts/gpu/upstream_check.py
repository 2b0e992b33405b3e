"""Check upstream serving on a real NVIDIA GPU: per-request NVML joules for requests sent through the `openai` engine.

    .venv/bin/python scripts/gpu/upstream_check.py [--gpu gpu0] [--requests 64] [--concurrency 1,8]
    .venv/bin/python scripts/gpu/upstream_check.py --simulated      # CI: a simulated GPU, no hardware

Needs Python, nvidia-ml-py and Wattlane's own dependencies; no Ray, no network. It starts an
OpenAI-compatible server on the GPU, the first of these that is there:
  1. vLLM or SGLang, if importable and --model-path names a local model directory;
  2. llama.cpp's server (llama_cpp.server), if importable and --gguf names a local GGUF file;
  3. else the TEST server of scripts/gpu/openai_test_server.py: a Llama-3.1-8B-shaped model with
     random bf16 weights through transformers on the GPU (PyTorch and transformers needed), one
     request at a time. It is a stand-in to have something on the GPU, not a product engine.
Then it sends a bounded load (--requests at each --concurrency) through Wattlane's UpstreamEngine
(scheduler/engines/openai_upstream.py, in this process) while Wattlane's device layer, meter and
attributor (scheduler/devices, scheduler/energy/meter.py, attribution.py) meter the GPU by its NVML
energy counter and charge each request its share, as a node agent does. It checks conservation
(requests' joules + idle joules no request took = the counter's delta, within 1%) and writes
docs/results/gpu/upstream-check.json and .md: device, driver, per-request joules (method
nvml-counter), J/token and latency.

--simulated runs the same path (engine -> meter -> attributor -> results file) with a simulated H100
(method "simulated") and the test server's simulated backend (or, with --server llamacpp --gguf FILE,
a real llama.cpp server on the CPU while the simulated GPU idles: the engine against a real server),
and writes
docs/results/upstream-check-simulated.json unless --out says otherwise: it checks the bookkeeping,
not hardware. Exit status: 0 when every request got energy and conservation holds, 1 otherwise, 2
when it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
for p in (str(REPO_ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from openai_test_server import SimulatedBackend, TestOpenAIServer  # noqa: E402

from scheduler.config import UpstreamEndpointConfig, UpstreamOptions  # noqa: E402
from scheduler.devices.base import Device  # noqa: E402
from scheduler.energy.attribution import Attributor  # noqa: E402
from scheduler.energy.meter import DeviceMeter  # noqa: E402
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams  # noqa: E402
from scheduler.engines.openai_upstream import UpstreamEngine  # noqa: E402

SERVED_MODEL_NAME = "wattlane-check"
#: the default energy settings of a node agent (scheduler/config.py EnergyConfig)
METER_INTERVAL_SECONDS = 0.1
PREFILL_TOKEN_WEIGHT = 0.25
CONSERVATION_TOLERANCE = 0.01
SERVER_START_TIMEOUT_SECONDS = 600.0


def fail(msg: str) -> None:
    print(f"upstream_check: {msg}", file=sys.stderr)
    raise SystemExit(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the server ------------------------------------------------------------------------------------
@dataclass
class Upstream:
    """An OpenAI-compatible server this run started: a child process or the in-process test server."""

    kind: str  # vllm | sglang | llamacpp | test-server-torch | test-server-simulated
    label: str
    base_url: str
    proc: subprocess.Popen | None = None
    in_process: Any = None

    def stop(self) -> None:
        if self.in_process is not None:
            self.in_process.__exit__(None, None, None)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _wait_for(base_url: str, proc: subprocess.Popen, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base_url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    fail(f"the server did not answer within {SERVER_START_TIMEOUT_SECONDS:g} s; see {log_path}")


def _spawn(kind: str, label: str, cmd: list[str], port: int, log_dir: Path) -> Upstream:
    log_path = log_dir / f"{kind}.log"
    print(f"upstream_check: starting {kind}: {' '.join(cmd)}", flush=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    _wait_for(base_url, proc, log_path)
    return Upstream(kind, label, base_url, proc=proc)


def start_server(args: argparse.Namespace, gpu: Device, log_dir: Path) -> Upstream:
    """The first server of the module docstring's list that can run here."""
    if args.simulated and args.server in ("auto", "test"):
        server = TestOpenAIServer(SimulatedBackend(gpu), SERVED_MODEL_NAME).__enter__()
        return Upstream("test-server-simulated", SimulatedBackend.label, server.base_url, in_process=server)
    py, port = sys.executable, free_port()
    want = args.server
    if want in ("auto", "vllm") and args.model_path and importlib.util.find_spec("vllm"):
        return _spawn("vllm", "vLLM", [py, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model_path,
                                       "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1",
                                       "--port", str(port)], port, log_dir)
    if want in ("auto", "sglang") and args.model_path and importlib.util.find_spec("sglang"):
        return _spawn("sglang", "SGLang", [py, "-m", "sglang.launch_server", "--model-path", args.model_path,
                                           "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1",
                                           "--port", str(port)], port, log_dir)
    if want in ("auto", "llamacpp") and args.gguf and importlib.util.find_spec("llama_cpp"):
        return _spawn("llamacpp", "llama.cpp server (llama_cpp.server)",
                      [py, "-m", "llama_cpp.server", "--model", args.gguf, "--model_alias", SERVED_MODEL_NAME,
                       "--host", "127.0.0.1", "--port", str(port), "--n_gpu_layers", "0" if args.simulated else "-1",
                       "--n_ctx", "2048", "--interrupt_requests", "False"], port, log_dir)
    if args.simulated:
        fail(f"--server {want} cannot start here (not importable, or --model-path/--gguf not given)")
    if want not in ("auto", "test"):
        fail(f"--server {want} cannot start here (not importable, or --model-path/--gguf not given)")
    try:  # only this path needs them; they are not Wattlane dependencies
        import torch
        import transformers
    except ImportError as exc:
        fail(f"no OpenAI-compatible server is installed and {exc.name} is missing for the test server: "
             "pip install torch transformers (or give --model-path with vllm/sglang, --gguf with llama-cpp-python)")
    if not torch.cuda.is_available():
        fail("torch sees no CUDA device")
    from gpu_run import LLAMA_3_1_8B
    from openai_test_server import TorchLlamaBackend

    print("upstream_check: no vLLM/SGLang/llama.cpp server to start; building the TEST server's "
          "Llama-3.1-8B-shaped model (random bf16 weights) on the GPU", flush=True)
    backend = TorchLlamaBackend(torch, transformers, LLAMA_3_1_8B)
    server = TestOpenAIServer(backend, SERVED_MODEL_NAME).__enter__()
    return Upstream("test-server-torch", TorchLlamaBackend.label, server.base_url, in_process=server)


# --- the load through the engine, metered ------------------------------------------------------------
class MeteredRun:
    """One GPU's meter feeding an Attributor, as a node agent wires them (without Ray)."""

    def __init__(self, gpu: Device):
        self.gpu = gpu
        self.attributor = Attributor(prefill_token_weight=PREFILL_TOKEN_WEIGHT,
                                     settle_delay_seconds=max(0.3, 3 * METER_INTERVAL_SECONDS))
        self.attributor.register_device(gpu.device_id)
        self.meter = DeviceMeter([gpu], METER_INTERVAL_SECONDS, name="upstream-check-meter")
        self.meter.add_callback(lambda iv: self.attributor.on_interval(iv.device_id, iv.t0_s, iv.t1_s,
                                                                        iv.energy_joules))

    def start(self) -> None:
        self.counter_start_joules = self.gpu.energy_joules()
        self.meter.start()

    def stop(self) -> None:
        self.meter.sample_now([self.gpu.device_id])
        self.meter.stop()
        self.counter_end_joules = self.gpu.energy_joules()


async def one_request(engine: UpstreamEngine, run: MeteredRun, rid: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    dev = run.gpu.device_id
    request = GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": prompt}],
                                params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
    t0 = time.time()
    run.attributor.start(rid, dev, t0)
    ttft = None
    last = None
    try:
        async for ev in engine.generate(request):
            if ev.completion_tokens and ttft is None:
                ttft = ev.time_s - t0
            if ev.finished:
                last = ev
                break
            run.attributor.progress(rid, ev.prompt_tokens, ev.completion_tokens, ev.time_s)
    except Exception as exc:  # a failed request is recorded, and fails the check
        run.attributor.discard(rid)
        return {"request_id": rid, "error": f"{type(exc).__name__}: {exc}"}
    t1 = last.time_s
    run.meter.sample_now([dev])  # as the node agent does at a finish: the request's energy is exact now
    energy = await run.attributor.finish_when_covered(rid, t1, timeout_seconds=2.0,
                                                      prefill_tokens_done=last.prompt_tokens,
                                                      decode_tokens_done=last.completion_tokens)
    return {"request_id": rid, "prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "ttft_seconds": ttft, "latency_seconds": t1 - t0,
            "tpot_seconds": (t1 - t0 - ttft) / (last.completion_tokens - 1)
            if ttft is not None and last.completion_tokens > 1 else None,
            "energy_joules": energy.joules, "dynamic_joules": energy.dynamic_joules,
            "idle_joules": energy.idle_joules, "energy_method": run.gpu.energy_method.value,
            "metered": energy.metered, "complete": energy.complete,
            "joules_per_output_token": energy.joules / last.completion_tokens if last.completion_tokens else None}


async def phase(engine: UpstreamEngine, run: MeteredRun, concurrency: int, requests: int, max_tokens: int,
                prefix: str) -> dict[str, Any]:
    queue = list(range(requests))
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            # prompts of different lengths, so the attribution has unequal work to share
            prompt = f"Request {i}: " + "Describe the energy used by one inference request. " * (1 + i % 8)
            results.append(await one_request(engine, run, f"{prefix}-{i}", prompt, max_tokens))

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    results.sort(key=lambda r: int(r["request_id"].rsplit("-", 1)[1]))
    ok = [r for r in results if "error" not in r]

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        v = sorted(values)
        return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]

    joules = [r["energy_joules"] for r in ok]
    out_tokens = sum(r["completion_tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": requests, "completed": len(ok), "wall_seconds": wall,
            "output_tokens": out_tokens, "requests_joules": sum(joules),
            "joules_per_request_mean": statistics.fmean(joules) if joules else None,
            "joules_per_output_token": sum(joules) / out_tokens if out_tokens else None,
            "ttft_seconds_p50": pct([r["ttft_seconds"] for r in ok if r["ttft_seconds"] is not None], 0.5),
            "latency_seconds_p50": pct([r["latency_seconds"] for r in ok], 0.5),
            "latency_seconds_p99": pct([r["latency_seconds"] for r in ok], 0.99),
            "per_request": results}


async def drive(args: argparse.Namespace, gpu: Device, upstream: Upstream) -> dict[str, Any]:
    endpoint = UpstreamEndpointConfig(base_url=upstream.base_url, served_model_name=SERVED_MODEL_NAME,
                                      devices=[gpu.device_id], node=gpu.node,
                                      # llama-cpp-python's server has no /metrics or /slots (llama.cpp's own has)
                                      server=upstream.kind if upstream.kind in ("vllm", "sglang") else "generic")
    engine = UpstreamEngine("upstream-check", ModelKind.CHAT, endpoint,
                            UpstreamOptions(read_timeout_seconds=300.0, connect_timeout_seconds=5.0),
                            context_length=8192, node=gpu.node, health_checks=False)
    run = MeteredRun(gpu)
    run.start()
    run.attributor.mark_ready(time.time())
    phases = []
    try:
        for c in args.concurrency:
            print(f"upstream_check: {args.requests} requests at concurrency {c}", flush=True)
            phases.append(await phase(engine, run, c, args.requests, args.max_tokens, f"c{c}"))
            await asyncio.sleep(args.gap_seconds)  # idle between phases: idle energy the check must account for
    finally:
        await engine.close()
        run.stop()
    balance = run.attributor.balance(gpu.device_id)
    counter_delta = run.counter_end_joules - run.counter_start_joules
    requests_joules = sum(p["requests_joules"] for p in phases)
    idle_unassigned = balance.idle_pool_joules + balance.startup_joules + balance.unsettled_joules
    error = abs(requests_joules + idle_unassigned - counter_delta) / counter_delta if counter_delta > 0 else None
    return {"phases": phases, "conservation": {
        "counter_delta_joules": counter_delta, "metered_joules": balance.metered_joules,
        "requests_joules": requests_joules, "idle_unassigned_joules": idle_unassigned,
        "relative_error": error, "tolerance": CONSERVATION_TOLERANCE,
        "holds": error is not None and error <= CONSERVATION_TOLERANCE}}


# --- facts and results -------------------------------------------------------------------------------
def device_facts(gpu: Device) -> dict[str, Any]:
    facts: dict[str, Any] = {"device_id": gpu.device_id, "name": gpu.name, "kind": gpu.kind.value,
                             "uuid": gpu.uuid(), "energy_method": gpu.energy_method.value,
                             "power_limit_watts": gpu.power_limit_watts()}
    if gpu.energy_method.value == "nvml-counter":
        import pynvml

        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else v

        pynvml.nvmlInit()
        try:
            facts["driver"] = text(pynvml.nvmlSystemGetDriverVersion())
            facts["nvml"] = text(pynvml.nvmlSystemGetNVMLVersion())
        finally:
            pynvml.nvmlShutdown()
    else:
        facts["driver"] = None
    return facts


def render_md(doc: dict[str, Any]) -> str:
    c = doc["conservation"]
    dev = doc["device"]
    lines = [f"# Upstream check: per-request energy through the `openai` engine ({doc['mode']})", "",
             f"Command: `{doc['command']}`  ", f"Date: {doc['date']}  ",
             f"Device: {dev['name']} ({dev['kind']}, {dev['device_id']}, uuid {dev['uuid']}), driver "
             f"{dev.get('driver') or 'n/a'}; energy method **{dev['energy_method']}**  ",
             f"Upstream server: {doc['upstream']['kind']}: {doc['upstream']['label']}  ",
             f"Host: {doc['host']}", ""]
    if doc["mode"] == "simulated":
        lines += ["**Simulated**: no GPU was used; this checks the engine -> meter -> attributor -> results path "
                  "and its bookkeeping, not hardware.", ""]
    lines += ["| concurrency | requests (ok) | J/request | J/output token | TTFT p50 s | latency p50 s | latency p99 s | wall s |",
              "|---|---|---|---|---|---|---|---|"]

    def f(x: Any, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    for p in doc["phases"]:
        lines.append(f"| {p['concurrency']} | {p['requests']} ({p['completed']}) | {f(p['joules_per_request_mean'], '.3f')} | "
                     f"{f(p['joules_per_output_token'], '.4f')} | {f(p['ttft_seconds_p50'], '.4f')} | "
                     f"{f(p['latency_seconds_p50'], '.4f')} | {f(p['latency_seconds_p99'], '.4f')} | {p['wall_seconds']:.2f} |")
    lines += ["", f"Conservation: requests {c['requests_joules']:.3f} J + idle no request took "
              f"{c['idle_unassigned_joules']:.3f} J vs the counter's delta {c['counter_delta_joules']:.3f} J: "
              f"error {f(c['relative_error'], '.2e')} (tolerance {c['tolerance']:.0%}): "
              f"**{'holds' if c['holds'] else 'FAILS'}**", "",
              f"Every request has energy ({dev['energy_method']}): **{doc['every_request_has_energy']}**. "
              "Per-request figures are in the JSON file.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulated", action="store_true", help="a simulated H100 and the test server's simulated backend")
    ap.add_argument("--gpu", default="gpu0")
    ap.add_argument("--server", choices=("auto", "vllm", "sglang", "llamacpp", "test"), default="auto")
    ap.add_argument("--model-path", default=None, help="a local model directory for vLLM or SGLang")
    ap.add_argument("--gguf", default=None, help="a local GGUF file for llama.cpp's server")
    ap.add_argument("--requests", type=int, default=64, help="requests at each concurrency")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--gap-seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None, help="output path without suffix")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or any(c < 1 for c in args.concurrency) or args.max_tokens < 1:
        fail("--requests, --concurrency and --max-tokens must be positive")

    if args.simulated:
        from scheduler.devices.simulated import SimulatedGpu

        gpu: Device = SimulatedGpu("gpu0", "h100-sxm", node=platform.node() or "local", nvml_index=0)
        gpu.attach_model(True)
        out = args.out or REPO_ROOT / "docs" / "results" / "upstream-check-simulated"
    else:
        from scheduler.devices.nvml import discover_nvml_gpus, nvml_unavailable_reason

        reason = nvml_unavailable_reason()
        if reason is not None:
            fail(f"no usable NVIDIA GPU: {reason} (use --simulated without one)")
        gpus = {g.device_id: g for g in discover_nvml_gpus(platform.node() or "local")}
        if args.gpu not in gpus:
            fail(f"{args.gpu} not found; visible: {', '.join(gpus) or 'none'}")
        gpu = gpus[args.gpu]
        # the server runs on this GPU only (a child inherits it; the in-process test server uses cuda:0)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu.uuid() or str(gpu.nvml_index)
        out = args.out or REPO_ROOT / "docs" / "results" / "gpu" / "upstream-check"

    log_dir = Path(tempfile.mkdtemp(prefix="wattlane-upstream-check-"))
    upstream = start_server(args, gpu, log_dir)
    try:
        doc = asyncio.run(drive(args, gpu, upstream))
    finally:
        upstream.stop()
    per_request = [r for p in doc["phases"] for r in p["per_request"]]
    every = all("error" not in r and r["metered"] and r["complete"] and r["energy_joules"] > 0
                and r["energy_method"] == gpu.energy_method.value for r in per_request)
    doc = {"mode": "simulated" if args.simulated else "gpu",
           "command": "python scripts/gpu/upstream_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
           "python": platform.python_version(), "device": device_facts(gpu),
           "upstream": {"kind": upstream.kind, "label": upstream.label},
           "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                        "meter_interval_seconds": METER_INTERVAL_SECONDS, "prefill_token_weight": PREFILL_TOKEN_WEIGHT},
           "every_request_has_energy": every, **doc}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_md(doc))
    if upstream.proc is None:  # a child server's log stays for a look; the in-process one wrote none
        shutil.rmtree(log_dir, ignore_errors=True)
    c = doc["conservation"]
    print(f"upstream_check: {len(per_request)} requests, conservation error {c['relative_error']}, "
          f"every request has energy: {every}; wrote {out.with_suffix('.json')} and .md", flush=True)
    return 0 if every and c["holds"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

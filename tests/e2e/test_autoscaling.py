"""Per-model autoscaling on the simulated fleet in real time: a load that rises scales the model out, the
fall scales it back in after the downscale delay, the parking group parks the GPUs it freed, and the replica
left, renumbered to rank 0 if it had another rank, serves rank 0's GPU."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.ray_cluster import LocalRayCluster
from tests.support.server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # Ray clusters start slowly on 2 busy cores

REPO = Path(__file__).resolve().parents[2]
GPUS = ["sim-h100-0", "sim-h100-1", "sim-h100-2"]


def autoscaled_config(state_dir: Path, port: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    small = next(m for m in cfg["models"] if m["id"] == "llama-3.1-8b")
    small.update(devices=GPUS, replicas=3, max_ongoing_requests=4,
                 autoscaling={"min_replicas": 1, "target_ongoing_requests": 2, "upscale_delay_seconds": 1,
                              "downscale_delay_seconds": 6, "look_back_seconds": 3})
    cfg["models"] = [small]
    cfg["devices"]["simulated"] = cfg["devices"]["simulated"][:3]
    cfg["server"].update(port=port, host="127.0.0.1", state_dir=str(state_dir))
    cfg["routing"]["admission"] = "queue"
    cfg["power"] = {"mode": "enforce", "interval_seconds": 0.5,
                    "groups": [{"name": "park", "devices": GPUS, "policy": "parking", "options": {"idle_seconds": 2}}]}
    return cfg


def running_replicas(cluster: LocalRayCluster) -> int:
    """From the dashboard's Serve API (what `serve status` reads), without starting a CLI process every poll."""
    details = httpx.get(cluster.dashboard_url + "/api/serve/applications/", timeout=60).json()
    deployment = details["applications"]["wattlane"]["deployments"]["model-llama-3-1-8b"]
    return sum(1 for r in deployment["replicas"] if r["state"] == "RUNNING")


def test_load_that_rises_and_falls_scales_out_then_in_and_parks_the_freed_gpus(tmp_path):
    port = free_port()
    (tmp_path / "wattlane.yaml").write_text(yaml.safe_dump(autoscaled_config(tmp_path / "state", port)))
    gen = subprocess.run([sys.executable, "-m", "scheduler", "deploy-config", "--config", str(tmp_path / "wattlane.yaml"),
                          "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "serve.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    url = f"http://127.0.0.1:{port}"
    cluster = LocalRayCluster(tmp_path)
    try:
        cluster.start_head(num_cpus=2)
        cluster.serve("deploy", str(tmp_path / "serve.yaml"))
        cluster.wait_app_running()
        assert running_replicas(cluster) == 1

        stop = threading.Event()
        devices_used: set[str] = set()
        statuses: list[int] = []

        def load() -> None:
            while not stop.is_set():
                r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                    "model": "llama-3.1-8b", "max_tokens": 200, "messages": [{"role": "user", "content": "Go on."}]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    devices_used.add(r.json()["usage"]["energy"]["device"])

        threads = [threading.Thread(target=load) for _ in range(10)]
        for t in threads:
            t.start()
        peak = 1
        rise_s = time.time()
        deadline = rise_s + 90
        while peak < 2 and time.time() < deadline:  # the rise: 10 in flight against a target of 2 per replica
            time.sleep(2)
            peak = max(peak, running_replicas(cluster))
        out_s = time.time() - rise_s
        time.sleep(5)  # let the new replicas take work
        stop.set()
        for t in threads:
            t.join(150)
        fall_s = time.time()
        assert peak >= 2, "the model did not scale out under load"
        assert len(devices_used) >= 2, devices_used
        assert set(statuses) <= {200, 503}, statuses

        deadline = time.time() + 120  # the fall: back to min_replicas after the downscale delay
        while running_replicas(cluster) > 1:
            assert time.time() < deadline, "the model did not scale back in"
            time.sleep(2)
        in_s = time.time() - fall_s
        deadline = time.time() + 30  # the GPUs freed (and idle) are parked by the governor
        while True:
            devices = httpx.get(url + "/v1/devices", timeout=30).json()["data"]
            parked = [d["device_id"] for d in devices if d.get("locked_clocks_mhz")]
            if len(parked) >= 2:
                print(f"autoscaling: out to {peak} replicas {out_s:.0f} s into the load, back to 1 replica "
                      f"{in_s:.0f} s after it, {len(parked)} GPUs parked {time.time() - fall_s:.0f} s after it")
                break
            assert time.time() < deadline, devices
            time.sleep(1)
        # the replica left has rank 0 (Serve renumbers the ones it keeps) and follows its rank: it serves rank 0's
        # GPU, so the next replica Serve starts, at rank 1, gets a GPU of its own
        deadline = time.time() + 60
        while (device := request_device(url)) != GPUS[0]:
            assert time.time() < deadline, f"the replica left after scaling in runs on {device}, not rank 0's {GPUS[0]}"
            time.sleep(1)
        # which replica Serve stops is its own choice, so renumber one here: a replica of this model built at
        # rank 0, in a driver of this cluster, told by reconfigure (as Serve tells it) that it is rank 2 now
        moved = cluster.driver(RENUMBER % (str(tmp_path / "wattlane.yaml"), str(tmp_path / "state")))
        assert moved["before"] == ["llama-3.1-8b#0", [GPUS[0]]], moved
        assert moved["after"] == ["llama-3.1-8b#2", [GPUS[2]]], moved
        # its next request ran on rank 2's GPU and was metered there; the GPU it left took no part in it
        assert moved["end"]["device"] == GPUS[2] and moved["end"]["joules"] > 0, moved
        assert moved["start_replica"] == "llama-3.1-8b#2", moved
    finally:
        cluster.stop()


RENUMBER = """
import asyncio
from pathlib import Path
from types import SimpleNamespace

from scheduler.cluster.replica import ModelServer
from scheduler.config import load_config
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams

config = load_config(Path(%r))
server = object.__new__(ModelServer)  # what Serve builds, without a replica context: bound to rank 0 by hand
server.config, server.model, server.state_dir = config, config.model("llama-3.1-8b"), Path(%r)
server._apply(server._bind(0))
server._joules_per_work_token = None
before = [server.replica_id, server.device_ids]


async def main():
    await server.reconfigure(None, rank=SimpleNamespace(rank=2))
    request = GenerationRequest("renumbered-1", ModelKind.CHAT, messages=[{"role": "user", "content": "Go on."}],
                                params=SamplingParams(max_tokens=4))
    return [ev async for ev in server.generate(request, deltas=False)]


events = asyncio.run(main())
end = events[-1]
start = end.start if getattr(end, "start", None) is not None else events[0]
result = {"before": before, "after": [server.replica_id, server.device_ids], "start_replica": start.replica,
          "end": {"device": end.energy.device, "joules": end.energy.joules}}
"""


def request_device(url: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "llama-3.1-8b", "max_tokens": 4, "messages": [{"role": "user", "content": "Go on."}]})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["energy"]["device"]

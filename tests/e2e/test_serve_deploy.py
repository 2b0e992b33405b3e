"""`wattlane deploy-config` writes a Ray Serve config that `serve deploy` puts on a running Ray cluster,
whose application builder starts the node agents itself; the deployment answers with energy, and its two
gateway replicas write each request's ledger row once."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.support.ray_cluster import LocalRayCluster
from tests.support.server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # Ray clusters start slowly on 2 busy cores

REPO = Path(__file__).resolve().parents[2]


def small_sim_config(state_dir: Path, port: int) -> dict:
    """The simulated fleet's 8B model on one simulated H100: the cheapest real deployment."""
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    small = next(m for m in cfg["models"] if m["id"] == "llama-3.1-8b")
    small.update(devices=["sim-h100-0"], replicas=1)
    cfg["models"] = [small]
    cfg["devices"]["simulated"] = cfg["devices"]["simulated"][:1]
    cfg["server"].update(port=port, host="127.0.0.1", state_dir=str(state_dir))
    # two gateway replicas: each request's ledger row is written once, by the replica that served it
    cfg["server"]["gateway_replicas"] = 2
    return cfg


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in fam.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"{key} exported twice"
            out[key] = sample.value
    return out


def test_serve_deploy_of_the_generated_config_serves_with_energy(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    config_file = tmp_path / "wattlane.yaml"
    config_file.write_text(yaml.safe_dump(small_sim_config(state, port)))
    serve_file = tmp_path / "serve.yaml"
    gen = subprocess.run([sys.executable, "-m", "scheduler", "deploy-config", "--config", str(config_file),
                          "--state-dir", str(state), "--out", str(serve_file)], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    written = yaml.safe_load(serve_file.read_text())
    app = written["applications"][0]
    assert app["import_path"] == "scheduler.cluster.serve_app:app_builder"
    assert app["args"]["state_dir"] == str(state) and app["args"]["config"]["models"][0]["id"] == "llama-3.1-8b"

    cluster = LocalRayCluster(tmp_path)
    try:
        cluster.start_head(num_cpus=2)
        cluster.serve("deploy", str(serve_file))
        cluster.wait_app_running()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        resp = client.chat.completions.create(model="auto", max_tokens=8,
                                              messages=[{"role": "user", "content": "Hello there"}])
        assert resp.usage.completion_tokens == 8
        energy = resp.usage.model_extra["energy"]
        assert energy["method"] == "simulated" and energy["device"] == "sim-h100-0" and energy["joules"] > 0
        # the builder started the node agent (the gateway found it) and the gateway wrote the ledger there
        devices = client.get("/devices", cast_to=object)
        assert [d["device_id"] for d in devices["data"]] == ["sim-h100-0"]
        assert (state / "ledger.sqlite3").exists()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            more = list(pool.map(lambda i: client.chat.completions.create(
                model="llama-3.1-8b", max_tokens=4, messages=[{"role": "user", "content": f"Number {i}"}]), range(8)))
        rows = httpx.get(f"http://127.0.0.1:{port}/v1/energy/requests", params={"limit": 100}, timeout=30).json()["data"]
        assert sorted(r["request_id"] for r in rows) == sorted([resp.id] + [m.id for m in more])
        assert sum(r["joules"] for r in rows) == pytest.approx(
            sum(x.usage.model_extra["energy"]["joules"] for x in [resp, *more]))
        # both replicas counted requests (one metric file each), and whichever one a scrape reaches
        # shows them all, with the device once
        files = list((state / "prometheus-multiproc").glob("counter_*.db"))
        assert len({f.stem.rsplit("_", 1)[1] for f in files}) == 2, files
        for _ in range(4):
            scraped = scrape(f"http://127.0.0.1:{port}/metrics")
            assert sum(v for (name, _), v in scraped.items() if name == "wattlane_requests_total") == 1 + len(more)
            assert [dict(labels)["device"] for (name, labels) in scraped if name == "wattlane_device_power_watts"] == [
                "sim-h100-0"]
        # a second deploy (a config change, or the same file again) keeps the one agent per node
        cluster.serve("deploy", str(serve_file))
        cluster.wait_app_running()
        again = client.chat.completions.create(model="llama-3.1-8b", max_tokens=4,
                                               messages=[{"role": "user", "content": "Again"}])
        assert again.usage.model_extra["energy"]["device"] == "sim-h100-0"
        assert len(client.get("/devices", cast_to=object)["data"]) == 1
    finally:
        cluster.stop()


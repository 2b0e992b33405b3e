"""The simulated 8-GPU fleet served in real time through the real gateway: labelled figures, real power control."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.served import served

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    cfg["power"]["mode"] = "enforce"  # simulated GPUs accept settings: exercise the real actuator path
    big = next(m for m in cfg["models"] if m["id"] == "llama-3.1-70b")
    big.update(max_ongoing_requests=1, max_queued_requests=1)  # a tiny queue, to see backpressure
    cfg["routing"]["admission"] = "queue"  # Serve's queue bound alone (SLO admission: tests/e2e/test_overload_admission.py)
    with served(cfg, tmp) as srv:
        yield srv.url, srv.state_dir


def chat(url: str, model: str, max_tokens: int) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "Tell me about GPUs."}],
                         "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()


def test_simulated_responses_are_labelled_and_plausible(fleet):
    url, _ = fleet
    small = chat(url, "llama-3.1-8b", 64)
    answered_s = time.time()
    first_request_pays_no_startup(url, small["usage"]["energy"], answered_s)
    assert small["usage"]["completion_tokens"] == 64
    e = small["usage"]["energy"]
    assert e["method"] == "simulated" and e["scope"] == "gpu" and e["device"].startswith("sim-h100-")
    # an 8B model alone on an H100 spends on the order of 1-5 J per output token (ML.ENERGY, batch 8: 0.46 J)
    assert 0.3 * 64 < e["dynamic_joules"] < 10 * 64, e
    big = chat(url, "llama-3.1-70b", 64)
    e70 = big["usage"]["energy"]
    assert e70["method"] == "simulated" and len(e70["device"].split(",")) == 4  # tensor parallel over 4 GPUs
    assert e70["dynamic_joules"] > 3 * e["dynamic_joules"]


def first_request_pays_no_startup(url: str, energy: dict, answered_s: float) -> None:
    """The first request on a device is charged at most the idle after the service was ready; the idle
    while the models loaded is start-up energy, reported on its own (before, it carried up to 60 s of it)."""
    from scheduler.sim.profiles import gpu_profile

    startup = {s["device"]: s for s in httpx.get(url + "/v1/energy/summary", timeout=30).json()["startup"]}
    assert {d for d in startup} >= {energy["device"]}, startup
    row = startup[energy["device"]]
    idle_watts = gpu_profile("h100-sxm").idle_loaded_watts
    assert energy["idle_joules"] <= idle_watts * (answered_s - row["ready_unix_s"]) + 1.0, (energy, row)
    assert row["method_kind"] == "simulated" and row["ready_unix_s"] > row["started_unix_s"]
    assert row["joules"] > 0.5 * idle_watts * (row["ready_unix_s"] - row["started_unix_s"])


def test_power_limit_set_and_reset_on_a_simulated_gpu(fleet):
    url, _ = fleet
    devices = httpx.get(url + "/v1/devices").json()["data"]
    sims = [d for d in devices if d["kind"] == "simulated-gpu"]
    assert len(sims) == 8
    gpu = sims[0]
    assert gpu["power_limit_watts"] == gpu["default_power_limit_watts"] == 700
    r = httpx.put(url + f"/v1/devices/{gpu['device_id']}/power-limit", json={"watts": 350, "reason": "test"})
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    after = {d["device_id"]: d for d in httpx.get(url + "/v1/devices").json()["data"]}
    assert after[gpu["device_id"]]["power_limit_watts"] == 350
    r = httpx.put(url + f"/v1/devices/{gpu['device_id']}/power-limit", json={"watts": 50})
    assert r.status_code == 400 and "range" in r.json()["error"]["message"]
    r = httpx.delete(url + f"/v1/devices/{gpu['device_id']}/power-limit")
    assert r.status_code == 200
    after = {d["device_id"]: d for d in httpx.get(url + "/v1/devices").json()["data"]}
    assert after[gpu["device_id"]]["power_limit_watts"] == 700
    audit = httpx.get(url + "/v1/power/audit", params={"device": gpu["device_id"]}).json()["data"]
    outcomes = [(a["action"], a["outcome"]) for a in audit]
    assert ("set_power_limit", "applied") in outcomes and ("set_power_limit", "refused") in outcomes
    assert all(a["actor"] for a in audit)
    metrics = httpx.get(url + "/metrics").text
    assert f'wattlane_power_actions_total{{action="set_power_limit",device="{gpu["device_id"]}"}}' in metrics


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", *args], capture_output=True, text=True, timeout=60)


def test_power_cli_against_the_running_gateway(fleet):
    url, _ = fleet
    r = _cli("power", "set", "sim-h100-2", "--watts", "450", "--clocks", "900:1200", "--reason", "cli test", "--url", url)
    assert r.returncode == 0, r.stdout + r.stderr
    dev = {d["device_id"]: d for d in httpx.get(url + "/v1/devices").json()["data"]}["sim-h100-2"]
    assert dev["power_limit_watts"] == 450 and dev["locked_clocks_mhz"] == [900, 1200]
    r = _cli("power", "set", "sim-h100-2", "--watts", "5000", "--url", url)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "range" in (r.stdout + r.stderr)
    r = _cli("power", "reset", "sim-h100-2", "--url", url)
    assert r.returncode == 0, r.stdout + r.stderr
    dev = {d["device_id"]: d for d in httpx.get(url + "/v1/devices").json()["data"]}["sim-h100-2"]
    assert dev["power_limit_watts"] == 700 and dev["locked_clocks_mhz"] is None
    r = _cli("power", "audit", "--url", url, "--json")
    assert r.returncode == 0 and "cli test" in r.stdout


def test_a_full_queue_is_refused_with_503_and_retry_after(fleet):
    url, _ = fleet

    def one(_: int) -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", timeout=120,
                          json={"model": "llama-3.1-70b", "max_tokens": 400,
                                "messages": [{"role": "user", "content": "Write an essay."}]})

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(one, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "5"
    err = refused.json()["error"]
    assert err["code"] == "no_capacity" and "queue full" in err["message"], err


def test_request_path_on_the_fleet_leaves_consistent_rows_and_no_running_count(fleet):
    """No max_tokens is a normal request; TTFT is never negative nor above latency; a client that
    leaves mid-stream gets a cancelled row with its energy; every device's running count returns to 0."""
    import json

    url, _ = fleet
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["model"] == "llama-3.1-8b" and r.json()["usage"]["completion_tokens"] > 0

    body = {"model": "llama-3.1-8b", "max_tokens": 2000, "stream": True,
            "messages": [{"role": "user", "content": "Write an essay."}]}
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = (ln for ln in resp.iter_lines() if ln.startswith("data: {"))
        request_id = [json.loads(next(lines)[6:]) for _ in range(5)][-1]["id"]

    deadline = time.time() + 30
    row = None
    while row is None and time.time() < deadline:
        rows = httpx.get(url + "/v1/energy/requests", params={"limit": 1000}, timeout=10).json()["data"]
        row = next((x for x in rows if x["request_id"] == request_id), None)
        time.sleep(0.5)
    assert row is not None and row["status"] == "cancelled", row
    assert 0 < row["completion_tokens"] < 2000 and row["joules"] > 0, row
    ok = [x for x in rows if x["status"] == "ok"]
    assert ok and all(0 <= x["ttft_seconds"] <= x["latency_seconds"] for x in ok), ok

    deadline = time.time() + 15
    while time.time() < deadline:
        running = sum(d.get("running_requests") or 0 for d in httpx.get(url + "/v1/devices", timeout=10).json()["data"])
        if running == 0:
            break
        time.sleep(0.5)
    assert running == 0

"""Device settings changed through Wattlane are put back: on Ctrl-C, and on the next start after kill -9.

Simulated GPUs are the devices here (no GPU in CI). Like a real GPU, whose power limit survives the
death of the process that set it, a simulated GPU keeps its settings in the state directory; so after
kill -9 the next start finds the device still changed, and the test sees it put back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.server import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _serve(config: Path, state: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WATTLANE_"))}
    env.update(WATTLANE_STATE_DIR=str(state), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--config", str(config), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError("not ready")


def _device(url: str, device_id: str) -> dict:
    (dev,) = [d for d in httpx.get(url + "/v1/devices", timeout=30).json()["data"] if d["device_id"] == device_id]
    return dev


def test_restore_after_kill_9_and_on_ctrl_c(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "sim-fleet.yaml").read_text())
    cfg["power"]["mode"] = "enforce"
    # the fleet's eight GPUs, one model replica: the agent holds every device; each replica would only
    # add a process to start, twice
    small = next(m for m in cfg["models"] if m["id"] == "llama-3.1-8b")
    small.update(devices=["sim-h100-0"], replicas=1)
    cfg["models"] = [small]
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(cfg))
    state = tmp_path / "state"
    saved = state / "power" / "saved_settings.json"
    device_state = state / "simulated-gpus" / "sim-h100-3.json"

    proc, url = _serve(config, state)
    r = httpx.put(url + "/v1/devices/sim-h100-3/power-limit", json={"watts": 300, "reason": "before the crash"})
    assert r.status_code == 200 and r.json()["applied"], r.text
    assert _device(url, "sim-h100-3")["power_limit_watts"] == 300
    # the original is on disk before the change took effect
    originals = json.loads(saved.read_text())["devices"]
    (entry,) = [v for k, v in originals.items() if k.endswith("sim-h100-3")]
    assert entry["power_limit_watts"] == 700
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert saved.exists(), "a crash leaves the record of what to restore"
    assert json.loads(device_state.read_text())["power_limit_watts"] == 300, "a crash leaves the device changed"

    proc, url = _serve(config, state)
    policy = httpx.get(url + "/v1/power/policy").json()
    assert "sim-h100-3" in " ".join(policy["status"]["restored_on_start"])
    audit = httpx.get(url + "/v1/power/audit", params={"device": "sim-h100-3"}).json()["data"]
    restores = {a["setting"]: a for a in audit if a["action"] == "restore" and "unclean exit" in a["reason"]}
    limit = restores["power_limit_watts"]
    # the restart found the device at 300 W (what the crash left) and put it back to 700 W
    assert limit["old_value"] == 300 and limit["new_value"] == 700, limit
    assert limit["outcome"] == "applied" and limit["actor"]
    assert _device(url, "sim-h100-3")["power_limit_watts"] == 700
    assert json.loads(device_state.read_text())["power_limit_watts"] == 700
    assert not saved.exists()

    r = httpx.put(url + "/v1/devices/sim-h100-5/locked-clocks", json={"min_mhz": 800, "max_mhz": 1000})
    assert r.status_code == 200 and r.json()["applied"], r.text
    assert saved.exists()
    assert json.loads((state / "simulated-gpus" / "sim-h100-5.json").read_text())["locked_clocks_mhz"] == [800, 1000]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert not saved.exists(), "Ctrl-C restored every device and cleared the record"
    assert json.loads((state / "simulated-gpus" / "sim-h100-5.json").read_text())["locked_clocks_mhz"] is None

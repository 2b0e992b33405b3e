"""`wattlane agent --address` runs a host's node agent in a cluster; another driver finds it; Ctrl-C ends it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ray_cluster import ray_env, start_head, stop_cluster
from tests.support.server import free_port

pytestmark = pytest.mark.slow

#: a separate driver (as a gateway elsewhere would be) that looks the agent up by its name
FIND_AGENT = """
import json, socket, sys
import ray
from scheduler.cluster import runtime
ray.init(address=sys.argv[1], namespace=runtime.NAMESPACE, log_to_driver=False)
host = next(n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"])
try:
    agent = ray.get_actor(runtime.agent_name(host), namespace=runtime.NAMESPACE)
except ValueError:
    print(json.dumps({"found": False}))
else:
    print(json.dumps({"found": True, **ray.get(agent.ready.remote(), timeout=60)}))
"""

#: what `wattlane serve --address` does with node agents (scheduler/cluster/lifecycle.py), without Serve
GATEWAY_START_STOP = """
import json, sys, tempfile
from pathlib import Path
import ray
from scheduler.cluster import runtime
from scheduler.cluster.agents import start_node_agents, stop_node_agents
from scheduler.config import load_config
ray.init(address=sys.argv[1], namespace=runtime.NAMESPACE, log_to_driver=False)
agents, started = start_node_agents(load_config(None), Path(tempfile.mkdtemp()))
stop_node_agents(started)
print(json.dumps({"agents": len(agents), "started": len(started)}))
"""


def _run_driver(script: str, address: str, env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", script, address], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _find_agent(address: str, env: dict[str, str]) -> dict:
    return _run_driver(FIND_AGENT, address, env)


def test_agent_joins_a_cluster_is_found_by_name_and_stops_on_ctrl_c(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    temp = Path("/tmp") / f"wl-agent-{os.getpid()}"
    env = ray_env(home)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    config = Path(__file__).resolve().parents[2] / "scheduler" / "default_configs" / "local.yaml"
    start_head(temp, gcs_port, env, num_cpus=1)
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "agent", "--address", address, "--config", str(config),
             "--state-dir", str(tmp_path / "state")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + 180
        lines = []
        while True:  # its banner says the agent answered `ready`
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if "node agent running" in line:
                break
            assert time.time() < deadline, "".join(lines)

        found = _find_agent(address, env)
        assert found["found"] is True
        assert "cpu0" in found["devices"]  # the config's CPU device, metered by the agent on this node
        assert found["node"] in "".join(lines)
        # a gateway joining the cluster uses this node's agent and, when it stops, leaves it running
        assert _run_driver(GATEWAY_START_STOP, address, env) == {"agents": 1, "started": 0}
        assert _find_agent(address, env)["found"] is True

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, "".join(lines) + out
        assert "device settings restored" in out
        # a detached actor would outlive its driver: stopping ended it, and the cluster is still up
        assert _find_agent(address, env) == {"found": False}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_cluster(str(temp))

"""A test's own Ray cluster, started with `ray start` as an operator does, and ended without `ray stop`.

start_head/stop_cluster: one head node. LocalRayCluster: a head and worker nodes, each its own raylet
with its own resources (a worker node named `x` carries the custom resource wattlane_node_x, which
makes it Wattlane node `x`), a node killed on its own (its raylet, as when a machine dies), Serve's
CLI against the cluster's dashboard; the whole cluster is ended by its temp dir (`ray stop` would end
every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.support.server import free_port

RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
#: Ray start-up on 2 busy cores can take a minute or more
START_TIMEOUT_SECONDS = 240


def ray_env(home: Path) -> dict[str, str]:
    """The environment of a process in the test's cluster: no Wattlane or Ray settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WATTLANE_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def start_head(temp_dir: Path, gcs_port: int, env: dict[str, str], num_cpus: int = 2) -> None:
    subprocess.run([RAY, "start", "--head", f"--port={gcs_port}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)


def stop_cluster(temp_dir: str) -> None:
    """End only this test's cluster (`ray stop` would end every Ray instance on the machine)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # Wattlane's processes exit within a second of SIGTERM (a node agent restores its devices first); Ray's
    # raylets and GCS wait on each other for 20 s or more, which a cluster the test is done with need not
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        p.kill()


class LocalRayCluster:
    def __init__(self, root: Path, *, fast_node_death: bool = False):
        # Ray's socket paths must stay short: the temp dir goes under /tmp, named after this process
        self.temp_dir = Path("/tmp") / f"wl-rc-{os.getpid()}-{free_port()}"
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = ray_env(home)
        # workers import this checkout (ray start's processes pass their environment on)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])
        # as README's cluster section says: Serve's HTTP proxy applies Wattlane's X-Request-Id check (one header)
        env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "scheduler.api.request_ids.serve_proxy_middlewares"
        if fast_node_death:
            # Ray's own knobs: the GCS declares a node dead after 3 missed 1 s health checks (default 5 x 3 s)
            env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                       RAY_health_check_initial_delay_ms="1000")
        self.env = env
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, dict[str, float]] = {}

    def _ray(self, *args: str, timeout: float = START_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def start_head(self, num_cpus: float = 2, resources: dict[str, float] | None = None) -> None:
        self._ray("start", "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                  f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
                  f"--resources={json.dumps(resources or {})}")
        self.nodes["head"] = resources or {}

    def add_node(self, name: str, num_cpus: float = 1) -> None:
        """A worker node that is Wattlane node `name` (resource wattlane_node_<name>)."""
        resources = {f"wattlane_node_{name}": 1}
        self._ray("start", f"--address={self.address}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                  f"--resources={json.dumps(resources)}", "--disable-usage-stats")
        self.nodes[name] = resources

    def kill_node(self, name: str) -> int:
        """SIGKILL the raylet of node `name` (its workers exit with it), as when its machine dies."""
        marker = f"wattlane_node_{name},"
        killed = 0
        for p in psutil.process_iter(["cmdline", "name"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if "raylet" in (p.info["name"] or "") and marker in cmd and str(self.temp_dir) in cmd:
                    p.kill()
                    killed += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        assert killed, f"no raylet found for node {name}"
        self.nodes.pop(name, None)
        return killed

    def serve(self, *args: str, timeout: float = START_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
        proc = subprocess.run([SERVE, *args, "--address", self.dashboard_url], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"serve {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def wait_app_running(self, app: str = "wattlane", timeout_s: float = START_TIMEOUT_SECONDS) -> None:
        """Poll the dashboard's Serve API (what `serve status` reads, without a Python process per poll)."""
        import httpx

        deadline = time.time() + timeout_s
        last = ""
        while time.time() < deadline:
            try:
                r = httpx.get(self.dashboard_url + "/api/serve/applications/", timeout=30)
                last = r.text
                if r.status_code == 200:
                    status = ((r.json() or {}).get("applications") or {}).get(app) or {}
                    if status.get("status") == "RUNNING":
                        return
                    assert status.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), last[-5000:]
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"application {app} not running after {timeout_s:.0f} s:\n{last[-5000:]}")

    def driver(self, code: str, timeout: float = 120) -> object:
        """Run `code` in a fresh driver connected to this cluster (namespace wattlane); it sets `result`,
        returned here through JSON. A subprocess, so this test process never joins the cluster."""
        script = ("import json, ray\n"
                  f"ray.init(address={self.address!r}, namespace='wattlane', log_to_driver=False)\n"
                  "from scheduler.cluster import runtime\n"
                  + code + "\nprint('RESULT=' + json.dumps(result))\n")
        proc = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")][-1]
        return json.loads(line[len("RESULT="):])

    def stop(self) -> None:
        """End only this cluster's processes (found by its temp dir)."""
        stop_cluster(str(self.temp_dir))

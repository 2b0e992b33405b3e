"""Start and stop a whole Wattlane deployment (Ray, node agents, Serve app) in the right order.

Used by `wattlane serve` and by the integration tests, so both exercise the same start-up and the
same shutdown: Serve first (no new work), then the node agents (restore device settings, stop the
meters), then Ray itself when we started it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scheduler.cluster import runtime
from scheduler.cluster.agents import check_endpoint_gpus, start_node_agents, stop_node_agents
from scheduler.cluster.serve_app import APP_NAME, build_app
from scheduler.config import WattlaneConfig, check_devices_present

log = logging.getLogger(__name__)


class Deployment:
    def __init__(self, config: WattlaneConfig, state_dir: Path, address: str | None = None,
                 owns_ray: bool | None = None):
        self.config = config
        self.state_dir = state_dir
        self.address = address
        self.owns_ray = (address is None) if owns_ray is None else owns_ray
        self.agents: list[Any] = []  # every node's agent, ours or another host's `wattlane agent`
        self._own_agents: list[Any] = []  # the ones this deployment started, and so stops
        self._serve_started = False

    def start(self, host: str, port: int) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            runtime.start_ray(self.state_dir, self.address, self.config.ray.num_cpus, self.config.ray.include_dashboard)
        self.agents, self._own_agents = start_node_agents(self.config, self.state_dir)
        # a joined cluster's GPUs are known only now; on a local Ray `wattlane serve` checked them already
        found = ray.get([a.ready.remote() for a in self.agents])
        check_devices_present(self.config, {d for f in found for d in f["devices"]}, "the Ray cluster's nodes")
        check_endpoint_gpus(self.config, self.agents, found)
        from scheduler.api.request_ids import serve_proxy_env

        # Serve's proxies inherit the controller's environment: it makes them load our X-Request-Id check
        serve.start(http_options={"host": host, "port": port}, detached=False,
                    controller_options={"runtime_env": {"env_vars": serve_proxy_env()}})
        self._serve_started = True
        serve.run(build_app(self.config, self.state_dir), name=APP_NAME, route_prefix="/", blocking=False)
        self.wait_ready()
        # from here the service answers: the idle energy of loading models is start-up energy, not requests'
        ray.get([a.mark_ready.remote() for a in self.agents])

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import time

        from ray import serve

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                details = "; ".join(f"{name}: {d.message}" for name, d in status.deployments.items() if d.message)
                raise RuntimeError(f"deployment failed: {details or status.message}")
            time.sleep(0.5)
        raise RuntimeError(f"models not ready after {timeout_s:.0f} s")

    def alive(self) -> bool:
        import ray

        return ray.is_initialized()

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._serve_started:
            from ray import serve

            try:
                serve.shutdown()
            except Exception as exc:
                log.warning("serve shutdown: %s", exc)
            self._serve_started = False
        stop_node_agents(self._own_agents)  # an agent a GPU host runs itself stays up for the next gateway
        self.agents, self._own_agents = [], []
        if self.owns_ray:
            ray.shutdown()

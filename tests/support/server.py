"""A Wattlane deployment for tests: the embedded default's real models on one shared Ray session.

The integration tests share one server (starting Ray and loading models costs ~30 s on 2 cores);
it runs with three API keys so that auth and roles are exercised on the same instance.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scheduler.config import ApiKeyConfig, WattlaneConfig, load_config

KEYS = {"client": "test-client-key", "reader": "test-reader-key", "operator": "test-operator-key",
        "client-hq": "test-client-hq-key"}
#: per-key request defaults (the "client-hq" key always asks for the highest quality)
KEY_DEFAULTS = {"client-hq": {"min_quality": 1.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(port: int) -> WattlaneConfig:
    from scheduler.api.auth import hash_key

    cfg = load_config(None)
    cfg.server.port = port
    cfg.server.host = "127.0.0.1"
    # batch requests that the small model answers without confidence escalate to the larger one
    cfg.routing.cascade = True
    cfg.routing.cascade_min_mean_logprob = -0.3
    cfg.server.api_keys = [
        ApiKeyConfig(id=f"{name}-key", key_sha256=hash_key(key), role=name.split("-")[0],
                     defaults=KEY_DEFAULTS.get(name, {}))
        for name, key in KEYS.items()
    ]
    return cfg


@dataclass
class RunningServer:
    url: str
    state_dir: Path
    config: WattlaneConfig
    deployment: Any

    def headers(self, role: str = "client") -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[role]}"}

    def client(self, role: str = "client", timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(role), timeout=timeout)

    def agent(self):
        from scheduler.cluster import runtime

        return runtime.get_node_agent()


def start_server(state_dir: Path) -> RunningServer:
    from scheduler.cluster.lifecycle import Deployment

    os.environ["WATTLANE_STATE_DIR"] = str(state_dir)
    port = free_port()
    cfg = server_config(port)
    dep = Deployment(cfg, state_dir)
    dep.start(host="127.0.0.1", port=port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        dep.stop()
        raise RuntimeError("server did not become ready")
    return RunningServer(url=url, state_dir=state_dir, config=cfg, deployment=dep)

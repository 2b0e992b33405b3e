"""A Wattlane deployment for tests: the embedded default's real models on one shared Ray session.

The integration tests share one server (starting Ray and loading models costs ~30 s on 2 cores);
it runs with three API keys so that auth and roles are exercised on the same instance.
"""

from __future__ import annotations

import os
import random
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


#: where free_port looks: above Ray's worker ports (10002-19999 by default), below the kernel's ephemeral range
PORT_RANGE_START = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports bound to 0 (Linux; the usual default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range.

    A server started in a subprocess binds the port later; meanwhile Ray's processes bind port 0 as they
    start, and the kernel may give one of them the very port picked here if it came from that range (seen:
    Serve's proxy failed with "Failed to bind to address '127.0.0.1:45411'"). Outside the range only another
    explicit choice can take it."""
    low, _ = ephemeral_port_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(PORT_RANGE_START, max(PORT_RANGE_START + 1, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {PORT_RANGE_START} and {low}")


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

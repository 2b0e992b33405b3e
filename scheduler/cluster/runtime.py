"""Ray process plumbing: start or join a cluster with everything under the state directory, find the node agent.

A local Ray instance is started with usage stats off, its temp dir and its auth token under the
Wattlane state directory (Ray would otherwise write ~/.ray/auth_token and /tmp/ray), no
dashboard unless asked for, and token authentication on.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

NAMESPACE = "wattlane"
AGENT_NAME_PREFIX = "wattlane-node-agent:"

log = logging.getLogger(__name__)


def node_name() -> str:
    return socket.gethostname()


def configure_process_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def prepare_environment(state_dir: Path, local: bool) -> None:
    """Environment variables that must be set before ray is imported/initialised."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ["WATTLANE_STATE_DIR"] = str(state_dir)
    if local:
        token_path = state_dir / "ray-auth-token"
        if not token_path.exists():
            token_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)


def ray_temp_dir(state_dir: Path) -> Path:
    # Ray puts Unix sockets under the temp dir; their paths must stay under ~100 characters,
    # so a deep state directory gets a short per-user directory under /tmp instead
    candidate = state_dir / "ray"
    if len(str(candidate)) > 60:
        candidate = Path("/tmp") / f"wattlane-ray-{os.getuid()}"
    return candidate


def start_ray(state_dir: Path, address: str | None, num_cpus: int | None, include_dashboard: bool) -> dict[str, Any]:
    """Start a local Ray instance (address None) or connect to one ('auto', 'ray://...')."""
    local = address is None
    prepare_environment(state_dir, local)
    import ray

    kwargs: dict[str, Any] = dict(namespace=NAMESPACE, log_to_driver=True, ignore_reinit_error=True)
    if local:
        temp = ray_temp_dir(state_dir)
        temp.mkdir(parents=True, exist_ok=True)
        kwargs.update(
            _temp_dir=str(temp),
            include_dashboard=include_dashboard,
            num_cpus=num_cpus,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "WATTLANE_STATE_DIR": str(state_dir)}},
        )
    else:
        kwargs.update(address=address, runtime_env={"env_vars": {"WATTLANE_STATE_DIR": str(state_dir)}})
    info = ray.init(**kwargs)
    return {"address": getattr(info, "address_info", {}).get("address") if hasattr(info, "address_info") else None}


def agent_name(node: str) -> str:
    return AGENT_NAME_PREFIX + node


def get_node_agent(node: str | None = None):
    """The node agent actor of this (or the given) node, or None where none runs."""
    import ray

    try:
        return ray.get_actor(agent_name(node or node_name()), namespace=NAMESPACE)
    except ValueError:
        return None

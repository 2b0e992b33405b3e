"""Ray process plumbing: start or join a cluster with everything under the state directory, find the node agent.

A local Ray instance is started with usage stats off, its temp dir and its auth token under the
Wattlane state directory (Ray would otherwise write ~/.ray/auth_token and /tmp/ray), no
dashboard unless asked for, and token authentication on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import sys
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
        if "ray" in sys.modules:
            # Ray reads RAY_AUTH_MODE into its C++ config when first imported; a process that
            # imported it earlier (a test session) must refresh it, as ray's own token setup does
            from ray._raylet import Config

            Config.initialize("")


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's temp root: <state>/ray, or a short directory named after the state dir when that is too deep.

    Ray puts Unix sockets at <root>/session_<timestamp>_<pid>/sockets/plasma_store (about 65
    characters below the root) and a socket path may not exceed 107 bytes, so the root must stay
    under ~40 characters. The short root is linked from <state>/ray so it is still found there.
    """
    candidate = state_dir / "ray"
    if len(str(candidate)) <= 40:
        return candidate
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    short = Path("/tmp") / f"wattlane-{os.getuid()}-{digest}"
    link = state_dir / "ray"
    if not link.exists() and not link.is_symlink():
        state_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(short, target_is_directory=True)
    return short


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

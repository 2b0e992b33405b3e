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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.config import WattlaneConfig

NAMESPACE = "wattlane"
AGENT_NAME_PREFIX = "wattlane-node-agent:"
#: a Ray node started with the custom resource "wattlane_node_<name>" (ray start --resources) is Wattlane
#: node <name>: its agent owns the simulated GPUs whose config names that node, and several such Ray
#: nodes may share one host. A node without it is named after its host.
NODE_RESOURCE_PREFIX = "wattlane_node_"
#: the resource Ray gives the head node alone
HEAD_RESOURCE = "node:__internal_head__"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterNode:
    """One alive Ray node as Wattlane sees it."""

    node_id: str
    name: str
    is_head: bool
    #: whether the name comes from a wattlane_node_<name> resource (else it is the hostname)
    named: bool


def node_from_ray(info: dict[str, Any]) -> ClusterNode:
    """A ray.nodes() entry as a ClusterNode."""
    resources = info.get("Resources") or {}
    declared = sorted(k[len(NODE_RESOURCE_PREFIX):] for k in resources
                      if k.startswith(NODE_RESOURCE_PREFIX) and len(k) > len(NODE_RESOURCE_PREFIX))
    host = info.get("NodeManagerHostname") or info.get("NodeName") or socket.gethostname()
    return ClusterNode(node_id=info["NodeID"], name=declared[0] if declared else host,
                       is_head=HEAD_RESOURCE in resources or bool(info.get("is_head_node")), named=bool(declared))


def cluster_nodes() -> list[ClusterNode]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [node_from_ray(n) for n in ray.nodes() if n.get("Alive")]


def cluster_id() -> str:
    """Names this run of the Ray cluster: its head node's id, new each time the head starts."""
    import ray

    heads = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in (n.get("Resources") or {}))
    if not heads:
        raise RuntimeError("the Ray cluster has no alive head node")
    return heads[0]


_this_node: ClusterNode | None = None


def this_node() -> ClusterNode | None:
    """The Ray node this process runs on (None outside Ray); a process never changes node, so it is kept."""
    global _this_node
    if _this_node is not None:
        return _this_node
    import ray

    if not ray.is_initialized():
        return None
    node_id = ray.get_runtime_context().get_node_id()
    for info in ray.nodes():
        if info.get("NodeID") == node_id:
            _this_node = node_from_ray(info)
            return _this_node
    return None


def node_name() -> str:
    """This process's Wattlane node name: its Ray node's wattlane_node_<name> resource, else the hostname."""
    node = this_node()
    return node.name if node is not None else socket.gethostname()


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


#: how long a head's address gets to accept a connection before joining it is given up
REACH_TIMEOUT_SECONDS = 5.0


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_SECONDS) -> None:
    """ConnectionError naming the address unless its host:port (or ray://host:port) accepts a TCP connection.

    Ray's own join waits minutes on an address where nothing listens (a typo, a head not started), printing
    its retries; this answers in seconds. 'auto' is left to Ray, which fails fast when it finds no cluster.
    """
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"'{address}' is not 'auto', 'host:port' or 'ray://host:port'")
    host = host.strip("[]")  # an IPv6 literal: [::1]:6379
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = "it did not answer within %g s" % timeout_s if isinstance(exc, TimeoutError) else exc.strerror or exc
        raise ConnectionError(f"nothing accepts connections at {host}:{port} ({reason}); is the Ray head running "
                              "there (`ray start --head` prints its address)?") from None


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
        check_reachable(address)
        kwargs.update(address=address, runtime_env={"env_vars": {"WATTLANE_STATE_DIR": str(state_dir)}})
    info = ray.init(**kwargs)
    return {"address": getattr(info, "address_info", {}).get("address") if hasattr(info, "address_info") else None}


def agent_name(node: str) -> str:
    return AGENT_NAME_PREFIX + node


def simulated_owners(config: WattlaneConfig, nodes: list[ClusterNode]) -> dict[str, str]:
    """Which node's agent creates (and meters, and runs the engines of) each simulated GPU.

    In a cluster whose nodes carry wattlane_node_<name> resources, a simulated GPU lives on the node its
    config names (devices.simulated[].node), and is absent while that node is. Otherwise (one node, or
    nodes named only by host) the head node's agent owns them all, as on a single machine.
    """
    sims = config.devices.simulated
    if not sims or not nodes:
        return {}
    if any(n.named for n in nodes):
        names = {n.name for n in nodes if n.named}
        return {s.id: s.node for s in sims if s.node in names}
    head = next((n for n in nodes if n.is_head), nodes[0])
    return {s.id: head.name for s in sims}


def get_node_agent(node: str | None = None):
    """The node agent actor of this (or the given) node, or None where none runs."""
    import ray

    try:
        return ray.get_actor(agent_name(node or node_name()), namespace=NAMESPACE)
    except ValueError:
        return None

"""Starts, finds and stops the node agents: one per Ray node, pinned to it and named for it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scheduler.cluster import runtime
from scheduler.config import WattlaneConfig

log = logging.getLogger(__name__)


def start_node_agent(config: WattlaneConfig, state_dir: Path, node_id: str, name: str,
                     owns_simulated: bool | list[str], detached: bool = False, own_state_dir: bool = False) -> Any:
    """One node agent on the Ray node `node_id`, named for Wattlane node `name` so the gateway and replicas find it.

    Get-or-create: two callers racing for one node (two Serve app builds, a gateway and a
    `wattlane agent`) end up with the same actor. `detached`: the agent outlives the caller (Serve's
    application build task, `wattlane agent` on a GPU host). An agent whose process dies is restarted
    by Ray on its node (max_restarts) and meters again from its devices' counters. Returns the handle
    at once; await `ready`.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from scheduler.cluster.node_agent import NodeAgent

    options: dict[str, Any] = dict(
        name=runtime.agent_name(name),
        namespace=runtime.NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=64,
        max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    )
    if detached:
        options["lifetime"] = "detached"
    return NodeAgent.options(**options).remote(config.model_dump(mode="json"), str(state_dir), name,
                                               owns_simulated, own_state_dir)


def start_node_agents(config: WattlaneConfig, state_dir: Path, detached: bool = False
                      ) -> tuple[list[Any], list[Any]]:
    """One node agent per alive Ray node, pinned to it, once they are ready: (all of them, those started here).

    A node whose agent already runs (started by `wattlane agent` on that host, by an earlier
    `serve deploy`, or by the gateway for a node that joined) keeps it; the caller stops only the
    agents it started. Simulated GPUs go to the agent of the node that owns them (runtime.simulated_owners).
    """
    import ray

    nodes = runtime.cluster_nodes()
    owners = runtime.simulated_owners(config, nodes)
    agents, started = [], []
    for node in nodes:
        existing = runtime.get_node_agent(node.name)
        if existing is not None:
            agents.append(existing)
            continue
        owned = sorted(d for d, owner in owners.items() if owner == node.name)
        agent = start_node_agent(config, state_dir, node.node_id, node.name, owned, detached=detached,
                                 own_state_dir=node.named)
        agents.append(agent)
        started.append(agent)
    ray.get([a.ready.remote() for a in agents])
    return agents, started


def stop_node_agents(agents: list[Any], timeout_s: float = 15.0) -> None:
    """Restore device settings and stop meters on every node, then end the actors."""
    import ray

    if not agents:
        return
    try:
        ray.get([a.shutdown.remote() for a in agents], timeout=timeout_s)
    except Exception as exc:  # an agent that cannot answer restores on its next start instead
        log.warning("node agent shutdown incomplete: %s", exc)
    for a in agents:
        try:
            ray.kill(a)
        except Exception:
            pass


def check_endpoint_gpus(config: WattlaneConfig, agents: list[Any], found: list[dict[str, Any]]) -> None:
    """At start: the NVML indices and GPU UUIDs of upstream endpoints exist on their nodes, each node's agent
    says (scheduler.devices.resolve.check_endpoint_devices); ConfigError otherwise."""
    import ray

    from scheduler.devices.resolve import check_endpoint_devices

    by_node = {f["node"]: a for a, f in zip(agents, found)}
    check_endpoint_devices(config, list(by_node),
                           lambda node, names, label: ray.get(by_node[node].resolve_devices.remote(names, label)))

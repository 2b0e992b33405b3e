"""Turns a WattlaneConfig into a running Ray Serve application (one builder, as Ray Serve LLM does).

Layout: one node agent actor per Ray node (devices, meters, attribution, governor), one Serve
deployment per configured model (ModelServer replicas), and the gateway deployment as ingress.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from scheduler.cluster import runtime
from scheduler.config import ModelConfig, WattlaneConfig

log = logging.getLogger(__name__)

APP_NAME = "wattlane"


def deployment_name(model_id: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_id)


def replica_num_cpus(model: ModelConfig) -> float:
    """Logical CPUs a replica reserves: its llama.cpp threads, or a sliver for simulated engines."""
    if model.engine == "llamacpp":
        return float(model.engine_options.get("n_threads") or 1)
    return 0.05


def build_app(config: WattlaneConfig, state_dir: Path):
    """The Serve application: gateway ingress bound to one deployment per model."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from scheduler.api.gateway import Gateway
    from scheduler.cluster.replica import ModelServer

    cfg = config.model_dump(mode="json")
    handles: dict[str, Any] = {}
    for m in config.models:
        dep = serve.deployment(
            ModelServer,
            name=deployment_name(m.id),
            num_replicas=m.replicas,
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
            ray_actor_options={"num_cpus": replica_num_cpus(m)},
            health_check_period_s=10,
            graceful_shutdown_timeout_s=5,
            # replica choice by predicted energy within the SLO, from the stats replicas publish
            request_router_config=RequestRouterConfig(
                request_router_class="scheduler.routing.serve_router:EnergyAwareRequestRouter",
                request_routing_stats_period_s=1.0,
            ),
        )
        handles[m.id] = dep.bind(m.model_dump(mode="json"), cfg, str(state_dir))
    gateway = serve.deployment(
        serve.ingress()(Gateway),
        name="gateway",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(cfg, str(state_dir), handles)


def start_node_agent(config: WattlaneConfig, state_dir: Path, node_id: str, hostname: str,
                     owns_simulated: bool, detached: bool = False) -> Any:
    """One node agent on the Ray node `node_id`, named for `hostname` so the gateway and replicas find it.

    `detached`: the agent outlives the driver that started it (`wattlane agent` on a GPU host), so
    a gateway driver elsewhere can come and go. Returns the handle at once; await `ready`.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from scheduler.cluster.node_agent import NodeAgent

    options: dict[str, Any] = dict(
        name=runtime.agent_name(hostname),
        namespace=runtime.NAMESPACE,
        num_cpus=0,
        max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    )
    if detached:
        options["lifetime"] = "detached"
    return NodeAgent.options(**options).remote(config.model_dump(mode="json"), str(state_dir), hostname,
                                               owns_simulated)


def start_node_agents(config: WattlaneConfig, state_dir: Path) -> tuple[list[Any], list[Any]]:
    """One node agent per alive Ray node, pinned to it, once they are ready: (all of them, those started here).

    A node whose agent already runs (started by `wattlane agent` on that host) keeps it; the
    caller stops only the agents it started.
    """
    import ray

    agents, started = [], []
    head = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        hostname = node.get("NodeManagerHostname") or node.get("NodeName")
        existing = runtime.get_node_agent(hostname)
        if existing is not None:
            agents.append(existing)
            continue
        agent = start_node_agent(config, state_dir, node["NodeID"], hostname, owns_simulated=node["NodeID"] == head)
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

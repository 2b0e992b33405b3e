"""Turns a WattlaneConfig into a running Ray Serve application (one builder, as Ray Serve LLM does).

Layout: one node agent actor per Ray node (devices, meters, attribution, governor), one Serve
deployment per configured model (ModelServer replicas), and the gateway deployment as ingress.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from scheduler.cluster import runtime
from scheduler.cluster.agents import check_endpoint_gpus, start_node_agents
from scheduler.config import ModelConfig, WattlaneConfig

APP_NAME = "wattlane"


def deployment_name(model_id: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", model_id)


def replica_num_cpus(model: ModelConfig) -> float:
    """Logical CPUs a replica reserves: its llama.cpp threads, or a sliver for simulated engines."""
    if model.engine == "llamacpp":
        return float(model.engine_options.get("n_threads") or 1)
    return 0.05


def replica_count_options(model: ModelConfig) -> dict[str, Any]:
    """A fixed replica count, or Serve's autoscaling between autoscaling.min_replicas and replicas."""
    a = model.autoscaling
    if a is None:
        return {"num_replicas": model.replicas}
    return {"autoscaling_config": {
        "min_replicas": a.min_replicas,
        "initial_replicas": a.min_replicas,
        "max_replicas": model.replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_seconds,
        "downscale_delay_s": a.downscale_delay_seconds,
        "look_back_period_s": a.look_back_seconds,
    }}


def gateway_actor_options(config: WattlaneConfig, state_dir: Path) -> dict[str, Any]:
    """Ray options of the gateway replicas: all on the head node; with several, shared metric files.

    Replicas are separate processes sharing the state directory's ledger and teams database, all on the
    head node: each ledger row is written once (by the replica that served the request), and SQLite's
    locking (WAL, busy_timeout) keeps several writer processes on one host safe; not across hosts. Their
    Prometheus series go to one folder there (energy/metrics.py), so a scrape of any replica is complete;
    the variable reaches the gateway replicas' processes only, never Ray's own nor the model replicas'."""
    from scheduler.energy.metrics import MULTIPROC_ENV, multiprocess_dir

    options: dict[str, Any] = {"num_cpus": 0, "resources": {runtime.HEAD_RESOURCE: 0.001}}
    if config.server.gateway_replicas > 1:
        path = multiprocess_dir(Path(state_dir), runtime.cluster_id())
        options["runtime_env"] = {"env_vars": {MULTIPROC_ENV: str(path)}}
    return options


#: how often a stopping replica checks whether its requests are done. Serve's default (2 s) is also the least an
#: idle replica waits: every stop, scale-in and Ctrl-C paid it twice (gateway, then models). A drain still waits
#: for every request under way, up to graceful_shutdown_timeout_s; only the polling is finer.
DRAIN_POLL_SECONDS = 0.2


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
            **replica_count_options(m),
            max_ongoing_requests=m.max_ongoing_requests,
            max_queued_requests=m.max_queued_requests,
            ray_actor_options={"num_cpus": replica_num_cpus(m)},
            # a replica whose node agent went with its node fails this probe (check_health) and is replaced
            health_check_period_s=3,
            graceful_shutdown_timeout_s=5,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_SECONDS,
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
        num_replicas=config.server.gateway_replicas,
        max_ongoing_requests=1000,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_SECONDS,
        ray_actor_options=gateway_actor_options(config, state_dir),
    )
    return gateway.bind(cfg, str(state_dir), handles)


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for `serve deploy` (the import_path `wattlane deploy-config` writes).

    args: {"config": <a Wattlane config as a mapping>, "state_dir": <path on every node>}. Serve runs it in
    the cluster: it validates the config, makes sure every node has its agent, checks the configured
    devices exist there, and returns the same application `wattlane serve` runs.
    """
    from scheduler.config import ConfigError, check_devices_present, validate_config_mapping

    if not isinstance(args, dict) or "config" not in args:
        raise ValueError("the Wattlane application needs args.config (write the file with `wattlane deploy-config`)")
    config = validate_config_mapping(args["config"], source=str(args.get("source") or "serve config args.config"))
    state_dir = Path(args.get("state_dir") or config.server.state_dir or "/tmp/wattlane")
    state_dir.mkdir(parents=True, exist_ok=True)
    import ray

    agents, _ = start_node_agents(config, state_dir, detached=True)
    found = ray.get([a.ready.remote() for a in agents])
    try:
        check_devices_present(config, {d for f in found for d in f["devices"]}, "the Ray cluster's nodes")
        check_endpoint_gpus(config, agents, found)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return build_app(config, state_dir)

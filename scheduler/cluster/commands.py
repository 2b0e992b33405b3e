"""`wattlane serve` (start or join Ray, deploy the gateway and models), `wattlane deploy-config` (the same
deployment as a Ray Serve config file for `serve deploy`), `wattlane agent`, `wattlane check-config`."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from scheduler.config import (
    NVML_DEVICE_ID,
    PORT_RANGE,
    ConfigError,
    WattlaneConfig,
    check_devices_present,
    check_upstream_keys,
    devices_referenced,
    load_config,
)
from scheduler.cli_text import escape, print_error
from scheduler.state_dir import resolve_state_dir
from scheduler.weights import resolve_weights

err = Console(stderr=True)
out = Console()


def fail_config(exc: ConfigError) -> None:
    print_error(err, exc, "configuration error")
    raise typer.Exit(2)


def load_or_exit(config: Optional[Path]) -> WattlaneConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        fail_config(exc)
        raise  # unreachable


def set_port(cfg: WattlaneConfig, port: int | None) -> None:
    """--port over server.port, held to server.port's own rule: a bad one is a configuration error naming --port,
    not the ValidationError pydantic raises from the assignment."""
    if port is None:
        return
    try:
        cfg.server.port = port
    except ValidationError:
        fail_config(ConfigError(f"port {port} is not a TCP port", file="--port",
                                fix=f"give a port from {PORT_RANGE[0]} to {PORT_RANGE[1]}, or omit --port for server.port"))


def bind_host(cfg: WattlaneConfig, host: str | None) -> str:
    """An explicit host wins; otherwise loopback unless API keys protect the server."""
    if host:
        return host
    if cfg.server.host:
        return cfg.server.host
    return "0.0.0.0" if cfg.server.api_keys else "127.0.0.1"


def check_port_free(cfg: WattlaneConfig, host: str, port: int) -> None:
    """Raise ConfigError when host:port cannot be bound, before anything is started.

    SO_REUSEADDR as the HTTP server sets it: a port left in TIME_WAIT is free, a listening one is not.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
            raise ConfigError(
                f"port {port} on {host} {why}", file=cfg.source_path or "config", key="server.port",
                fix="stop the process listening there, or choose another port with --port or server.port",
            ) from None


def check_host_devices(cfg: WattlaneConfig) -> None:
    """Before starting a local Ray: every NVIDIA GPU the config names must exist on this host."""
    wanted = [d for d in devices_referenced(cfg) if NVML_DEVICE_ID.match(d)]
    if not wanted:
        return
    from scheduler.devices.nvml import discover_nvml_gpus

    gpus = discover_nvml_gpus("localhost")
    present = {g.device_id for g in gpus}
    for g in gpus:
        g.close()
    check_devices_present(cfg, present | {d for d in devices_referenced(cfg) if not NVML_DEVICE_ID.match(d)}, "this host")


def serve_cmd(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the embedded local.yaml)")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address (default 127.0.0.1 without API keys)")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default from config, 8000)")] = None,
    state_dir: Annotated[Optional[str], typer.Option("--state-dir", help="where Wattlane writes everything (env WATTLANE_STATE_DIR)")] = None,
    address: Annotated[Optional[str], typer.Option(help="join a Ray cluster: 'auto' or 'ray://host:port' (default: start a local one)")] = None,
) -> None:
    """Start the gateway and the configured models on Ray Serve; Ctrl-C stops everything."""
    cfg = load_or_exit(config)
    set_port(cfg, port)
    listen_host = bind_host(cfg, host)
    if listen_host not in ("127.0.0.1", "localhost", "::1") and not cfg.server.api_keys:
        err.print("[yellow]warning:[/] binding to a non-loopback address without API keys: anyone who can reach "
                  f"{escape(listen_host)}:{cfg.server.port} can use and reconfigure this server")
    ray_address = address or cfg.ray.address
    try:
        check_port_free(cfg, listen_host, cfg.server.port)
        check_upstream_keys(cfg)
        if ray_address is None:  # joining a cluster: its GPUs are checked once its node agents answer
            check_host_devices(cfg)
    except ConfigError as exc:
        fail_config(exc)
    sdir = resolve_state_dir(cfg, state_dir)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        os.environ["WATTLANE_STATE_DIR"] = str(sdir)
        for i, m in enumerate(cfg.models):
            if m.weights is not None:  # assemble packaged weights here, once, with a clear error
                resolve_weights(m, cfg, key=f"models[{i}] (id {m.id}).weights", cache_dir=sdir / "models")
    except ConfigError as exc:
        fail_config(exc)
    except OSError as exc:
        print_error(err, f"cannot use state directory {sdir}: {exc}")
        raise typer.Exit(2)

    stop = threading.Event()

    def _on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    from scheduler.cluster.lifecycle import Deployment

    dep = Deployment(cfg, sdir, address=ray_address)
    try:
        with out.status("starting Ray and loading models…", spinner="dots"):
            dep.start(host=listen_host, port=cfg.server.port)
        shown = "127.0.0.1" if listen_host == "0.0.0.0" else listen_host
        out.print(f"[bold green]Wattlane is serving[/] on http://{escape(shown)}:{cfg.server.port}  "
                  f"(models: {escape(', '.join(m.id for m in cfg.models))}; state: {escape(str(sdir))})")
        out.print(f"  try: curl http://{escape(shown)}:{cfg.server.port}/v1/models   ·   Ctrl-C to stop")
        sys.stdout.flush()
        while not stop.is_set():
            stop.wait(0.5)
            if not dep.alive():
                err.print("[bold red]error:[/] the Ray cluster went away; stopping")
                break
    except ConfigError as exc:
        dep.stop()
        fail_config(exc)
    except Exception as exc:
        print_error(err, f"could not start: {exc}")
        dep.stop()
        raise typer.Exit(1)
    out.print("stopping…")
    dep.stop()
    out.print("stopped; device settings restored")


SERVE_CONFIG_HEADER = """\
# Ray Serve config for Wattlane, written by `wattlane deploy-config --config {source}`.
# Deploy it to a running Ray cluster (Wattlane installed on every node, same version):
#   serve deploy {out} --address http://<head node>:8265
# The application builder starts one Wattlane node agent per Ray node, then the gateway and the models.
# Ray nodes started with the resource wattlane_node_<name> (ray start --resources) are Wattlane node
# <name>; the state directory must be writable on every node (a volume). Serve's HTTP proxy checks
# X-Request-Id itself when the head node runs with
#   RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=scheduler.api.request_ids.serve_proxy_middlewares
# (without it the gateway still does; the proxy's own log then shows its own ids).
"""


def serve_config(cfg: WattlaneConfig, state_dir: str, host: str, port: int, proxy_location: str) -> dict:
    """The Ray Serve config (ServeDeploySchema) that deploys this Wattlane config with `serve deploy`."""
    from scheduler.cluster.serve_app import APP_NAME

    env = {"WATTLANE_STATE_DIR": state_dir, "RAY_USAGE_STATS_ENABLED": "0"}
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "scheduler.cluster.serve_app:app_builder",
            "runtime_env": {"env_vars": env},
            "args": {"source": cfg.source_path, "state_dir": state_dir, "config": cfg.model_dump(mode="json")},
        }],
    }


def deploy_config(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the embedded local.yaml)")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="write here (default: standard output)")] = None,
    state_dir: Annotated[Optional[str], typer.Option("--state-dir", help="state directory as the cluster's nodes see it (default: server.state_dir, else /var/lib/wattlane)")] = None,
    host: Annotated[Optional[str], typer.Option(help="address Serve's HTTP proxy binds (default from config, else 0.0.0.0)")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default from config, 8000)")] = None,
    proxy_location: Annotated[str, typer.Option("--proxy-location", help="HeadOnly or EveryNode (Serve's HTTP proxies)")] = "HeadOnly",
) -> None:
    """Write a Ray Serve config file that `serve deploy` accepts: Wattlane on a Ray cluster you run."""
    cfg = load_or_exit(config)
    set_port(cfg, port)
    if proxy_location not in ("HeadOnly", "EveryNode"):
        fail_config(ConfigError(f"unknown proxy location '{proxy_location}'", file="--proxy-location",
                                fix="HeadOnly (one HTTP entry point on the head) or EveryNode"))
    sdir = state_dir or os.environ.get("WATTLANE_STATE_DIR") or cfg.server.state_dir or "/var/lib/wattlane"
    if not os.path.isabs(os.path.expanduser(sdir)):
        fail_config(ConfigError(f"state directory '{sdir}' is relative", file="--state-dir",
                                fix="give an absolute path that exists on every node (a shared or per-node volume)"))
    listen_host = host or cfg.server.host or "0.0.0.0"
    if listen_host not in ("127.0.0.1", "localhost", "::1") and not cfg.server.api_keys:
        err.print("[yellow]warning:[/] the gateway will listen on a non-loopback address without API keys")
    data = serve_config(cfg, os.path.expanduser(sdir), listen_host, cfg.server.port, proxy_location)
    import yaml

    text = SERVE_CONFIG_HEADER.format(source=config or "<embedded local.yaml>", out=out_path or "serve.yaml")
    text += yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if out_path is None:
        sys.stdout.write(text)
        return
    try:
        out_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        print_error(err, f"cannot write {out_path}: {exc}")
        raise typer.Exit(2)
    err.print(escape(f"wrote {out_path}; deploy with: serve deploy {out_path} --address http://<head>:8265"))


def _this_ray_node() -> tuple[str, str, bool]:
    """(Ray node id, Wattlane node name, whether the name is declared) of the node this driver runs on.

    The name is the node's wattlane_node_<name> resource, else its hostname (runtime.node_from_ray)."""
    import ray

    from scheduler.cluster import runtime

    node = runtime.this_node()
    if node is None:
        return ray.get_runtime_context().get_node_id(), socket.gethostname(), False
    return node.node_id, node.name, node.named


def agent_cmd(
    address: Annotated[str, typer.Option(help="the Ray cluster this host is a node of: 'auto' or the head's 'host:port'")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the embedded local.yaml)")] = None,
    state_dir: Annotated[Optional[str], typer.Option("--state-dir", help="where the agent keeps device settings to restore (env WATTLANE_STATE_DIR)")] = None,
) -> None:
    """Run this host's node agent (devices, meter, governor) in a Ray cluster; Ctrl-C stops it, restoring devices.

    For a GPU host whose gateway runs elsewhere: make the host a node of the cluster
    (`ray start --address=<head>`), then run this. The agent is a named, detached actor pinned to
    this node, so a `wattlane serve --address` anywhere in the cluster finds it and uses it, and
    stopping that gateway leaves it running.
    """
    cfg = load_or_exit(config)
    sdir = resolve_state_dir(cfg, state_dir)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print_error(err, f"cannot use state directory {sdir}: {exc}")
        raise typer.Exit(2)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    import ray

    from scheduler.cluster import runtime
    from scheduler.cluster.agents import start_node_agent, stop_node_agents

    try:
        runtime.start_ray(sdir, address, num_cpus=None, include_dashboard=False)
    except Exception as exc:
        print_error(err, f"cannot join the Ray cluster at {address}: {exc}\n"
                         "  fix: make this host a node of that cluster first (`ray start --address=<head address>`), "
                         "then run this command on it")
        raise typer.Exit(2)
    agent = None
    try:
        node_id, hostname, named = _this_ray_node()
        if runtime.get_node_agent(hostname) is not None:
            print_error(err, f"a node agent already runs on {hostname} "
                             f"({runtime.NAMESPACE}/{runtime.agent_name(hostname)}): stop it (Ctrl-C in its `wattlane agent`, "
                             "or stop the `wattlane serve` on this host) before starting another")
            raise typer.Exit(1)
        # a named node's simulated GPUs live on it (runtime.simulated_owners); a host named by its hostname has none
        owned = sorted(d for d, owner in runtime.simulated_owners(cfg, runtime.cluster_nodes()).items()
                       if owner == hostname) if named else False
        agent = start_node_agent(cfg, sdir, node_id, hostname, owns_simulated=owned, detached=True,
                                 own_state_dir=named)
        found = ray.get(agent.ready.remote(), timeout=300)
        devices = ", ".join(found["devices"]) or "none"
        actor = f"{runtime.NAMESPACE}/{runtime.agent_name(hostname)}"
        out.print(f"[bold green]Wattlane node agent running[/] on {escape(found['node'])} as {escape(actor)} "
                  f"(devices: {escape(devices)}; state: {escape(str(sdir))})  ·  Ctrl-C to stop", soft_wrap=True)
        sys.stdout.flush()
        while not stop.wait(1.0):
            try:  # a dead agent or a cluster gone away ends this command instead of leaving it idle
                ray.get(agent.ready.remote(), timeout=30)
            except Exception as exc:
                print_error(err, f"the node agent stopped answering ({exc}); stopping")
                break
    except typer.Exit:
        raise
    except Exception as exc:
        print_error(err, f"could not start the node agent: {exc}")
        if agent is not None:
            stop_node_agents([agent])
        ray.shutdown()
        raise typer.Exit(1)
    out.print("stopping…")
    stop_node_agents([agent])
    ray.shutdown()  # disconnects; the cluster is not ours to stop
    out.print("stopped; device settings restored")


def check_config(config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None) -> None:
    """Validate a config file and exit 0, or print the problem and exit 2.

    Everything the file decides is checked here, on any machine. NVIDIA GPUs (gpuN) are checked
    for their form only: whether gpuN exists is a fact of the host that serves, which
    `wattlane serve` checks before it starts Ray (exit 2, same message shape).
    """
    cfg = load_or_exit(config)
    out.print(escape(f"ok: {cfg.source_path} ({len(cfg.models)} models)"))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("agent")(agent_cmd)
    app.command("check-config")(check_config)
    app.command("deploy-config")(deploy_config)

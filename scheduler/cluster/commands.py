"""`wattlane serve` (start or join Ray, deploy the gateway and the models) and `wattlane keys hash`."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from scheduler.config import ConfigError, WattlaneConfig, load_config, resolve_state_dir, resolve_weights

err = Console(stderr=True)
out = Console()


def fail_config(exc: ConfigError) -> None:
    err.print(f"[bold red]configuration error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def load_or_exit(config: Optional[Path]) -> WattlaneConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        fail_config(exc)
        raise  # unreachable


def bind_host(cfg: WattlaneConfig, host: str | None) -> str:
    """An explicit host wins; otherwise loopback unless API keys protect the server."""
    if host:
        return host
    if cfg.server.host:
        return cfg.server.host
    return "0.0.0.0" if cfg.server.api_keys else "127.0.0.1"


def serve_cmd(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the embedded local.yaml)")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address (default 127.0.0.1 without API keys)")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default from config, 8000)")] = None,
    state_dir: Annotated[Optional[str], typer.Option("--state-dir", help="where Wattlane writes everything (env WATTLANE_STATE_DIR)")] = None,
    address: Annotated[Optional[str], typer.Option(help="join a Ray cluster: 'auto' or 'ray://host:port' (default: start a local one)")] = None,
) -> None:
    """Start the gateway and the configured models on Ray Serve; Ctrl-C stops everything."""
    cfg = load_or_exit(config)
    if port is not None:
        cfg.server.port = port
    listen_host = bind_host(cfg, host)
    if listen_host not in ("127.0.0.1", "localhost", "::1") and not cfg.server.api_keys:
        err.print("[yellow]warning:[/] binding to a non-loopback address without API keys: anyone who can reach "
                  f"{listen_host}:{cfg.server.port} can use and reconfigure this server")
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
        err.print(f"[bold red]error:[/] cannot use state directory {sdir}: {exc}")
        raise typer.Exit(2)

    stop = threading.Event()

    def _on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    from scheduler.cluster.lifecycle import Deployment

    dep = Deployment(cfg, sdir, address=address or cfg.ray.address)
    try:
        with out.status("starting Ray and loading models…", spinner="dots"):
            dep.start(host=listen_host, port=cfg.server.port)
        shown = "127.0.0.1" if listen_host == "0.0.0.0" else listen_host
        out.print(f"[bold green]Wattlane is serving[/] on http://{shown}:{cfg.server.port}  "
                  f"(models: {', '.join(m.id for m in cfg.models)}; state: {sdir})")
        out.print(f"  try: curl http://{shown}:{cfg.server.port}/v1/models   ·   Ctrl-C to stop")
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
        err.print(f"[bold red]error:[/] could not start: {exc}")
        dep.stop()
        raise typer.Exit(1)
    out.print("stopping…")
    dep.stop()
    out.print("stopped; device settings restored")


def keys_hash(key: Annotated[str, typer.Argument(help="the API key to hash for server.api_keys[].key_sha256")]) -> None:
    """Print the sha256 of an API key, for the config (keys are never stored in clear)."""
    from scheduler.api.auth import hash_key

    out.print(hash_key(key))


def check_config(config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None) -> None:
    """Validate a config file and exit 0, or print the problem and exit 2."""
    cfg = load_or_exit(config)
    out.print(f"ok: {cfg.source_path} ({len(cfg.models)} models)")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("check-config")(check_config)
    keys = typer.Typer(help="API key helpers", no_args_is_help=True)
    keys.command("hash")(keys_hash)
    app.add_typer(keys, name="keys")

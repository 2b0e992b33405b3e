"""`wattlane keys create|list|revoke|rotate|hash`: run-time API keys, on the state directory's teams database.

The commands open the same SQLite file the gateway replicas read (state directory: --state-dir, then
WATTLANE_STATE_DIR, then the config's server.state_dir, then the per-user default), so they work
whether or not the server is running, and need no operator key: write access to the state directory
is the authority. A running server sees every change within half a second. Remote operators use the
same operations over HTTP (POST/GET /v1/keys, DELETE /v1/keys/{id}, POST /v1/keys/{id}/rotate).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from scheduler.cli_text import escape, print_error

err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the embedded local.yaml)")]
StateOpt = Annotated[Optional[str], typer.Option("--state-dir", help="state directory (env WATTLANE_STATE_DIR)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _registry(config: Optional[Path], state_dir: Optional[str], *, existing: bool = False,
              read_only: bool = False) -> tuple[Any, Any]:
    """The config and the key registry on the state directory's teams database.

    existing (revoke, rotate, list): a state directory that does not exist is an error, not made (a typo in
    --state-dir must not leave folders and a database behind, nor answer "no keys"). read_only (list): the
    registry is None where the state directory has no teams database yet, which is not created either."""
    from scheduler.cluster.commands import load_or_exit
    from scheduler.state_dir import resolve_state_dir
    from scheduler.teams.keys import KeyRegistry
    from scheduler.teams.store import NoTeamsStoreError, NotATeamsStoreError, TeamsStore

    cfg = load_or_exit(config)
    where = resolve_state_dir(cfg, state_dir)
    if (existing or read_only) and not where.is_dir():
        print_error(err, f"there is no Wattlane state at {where} (no such folder); pass the --state-dir "
                         "that `wattlane serve` used")
        raise typer.Exit(2)
    try:
        store = TeamsStore(where, create=not read_only)
    except NoTeamsStoreError:
        return cfg, None
    except NotATeamsStoreError as exc:
        print_error(err, exc)
        raise typer.Exit(2) from None
    except OSError as exc:
        print_error(err, f"cannot use the state directory: {exc}")
        raise typer.Exit(2) from None
    return cfg, KeyRegistry(store, {k.id for k in cfg.server.api_keys})


def _fail(exc: Exception) -> None:
    print_error(err, exc)
    raise typer.Exit(1)


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    """name=value options; values are JSON where they parse (numbers, objects), else strings."""
    outd: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail(ValueError(f"{what} '{item}' is not name=value"))
        try:
            outd[name] = json.loads(value)
        except json.JSONDecodeError:
            outd[name] = value
    return outd


def _budget(text: str) -> dict[str, Any]:
    """'energy_joules=3.6e6/day' or 'gco2e=500/month' -> a BudgetConfig entry."""
    quantity, sep, rest = text.partition("=")
    amount, _, period = rest.partition("/")
    try:
        value = float(amount)
    except ValueError:
        value = None
    if not sep or value is None or quantity not in ("energy_joules", "gco2e"):
        _fail(ValueError(f"budget '{text}' is not energy_joules=AMOUNT/PERIOD or gco2e=AMOUNT/PERIOD "
                         "(PERIOD day or month)"))
    return {quantity: value, "period": period or "day"}


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):  # a store an older version wrote may hold inf or 1e300
        return f"{t!r} (unix s, not a date)"


def _show_secret(record: Any, secret: str, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps({**record.public(), "key": secret}))
        return
    out.print(f"{verb} key [bold]{escape(record.key_id)}[/] (role {escape(record.role)}, team {escape(record.team or '-')}, "
              f"expires {_when(record.expires_unix_s)})")
    out.print("the key, shown once (only its sha256 is stored):")
    print(secret)


def keys_create(
    key_id: Annotated[Optional[str], typer.Option("--id", help="the key's id (default key-<8 hex>)")] = None,
    role: Annotated[str, typer.Option(help="client, reader or operator")] = "client",
    team: Annotated[Optional[str], typer.Option(help="one of the config's teams")] = None,
    expires_in_days: Annotated[Optional[float], typer.Option("--expires-in-days", help="refused after this many days")] = None,
    default: Annotated[list[str], typer.Option("--default", help="request default name=value (min_quality, priority, "
                                                "max_energy_joules, slo as JSON); repeatable")] = [],
    rpm: Annotated[Optional[int], typer.Option("--rpm", help="requests_per_minute")] = None,
    tpm: Annotated[Optional[int], typer.Option("--tpm", help="tokens_per_minute")] = None,
    concurrent: Annotated[Optional[int], typer.Option("--concurrent", help="concurrent_requests")] = None,
    budget: Annotated[list[str], typer.Option("--budget", help="energy_joules=AMOUNT/day|month or gco2e=AMOUNT/day|month; "
                                               "repeatable")] = [],
    config: ConfigOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once."""
    from scheduler.teams.keys import KeyError_, expiry_in_days, validate_key_fields

    try:  # before the state directory is opened: a refused value creates nothing
        expires = expiry_in_days(expires_in_days, name="--expires-in-days") if expires_in_days is not None else None
    except KeyError_ as exc:
        _fail(exc)
    cfg, registry = _registry(config, state_dir)
    defaults = _pairs(default, "--default")
    limits = {k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm),
                                ("concurrent_requests", concurrent)) if v is not None}
    budgets = [_budget(b) for b in budget]
    try:
        limits, budgets = validate_key_fields(cfg, team, defaults, limits, budgets)
        record, secret = registry.create(role=role, team=team, key_id=key_id, defaults=defaults, limits=limits,
                                         budgets=budgets, expires_unix_s=expires)
    except KeyError_ as exc:
        _fail(exc)
    _show_secret(record, secret, as_json, "created")


def keys_list(config: ConfigOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """List the config's keys and the run-time ones (never a key or its hash)."""
    cfg, registry = _registry(config, state_dir, read_only=True)
    now_s = time.time()
    rows = [{"id": k.id, "role": k.role, "team": k.team, "status": "active", "source": "config",
             "limits": k.limits.model_dump(exclude_none=True), "budgets": [b.model_dump(exclude_none=True) for b in k.budgets],
             "expires_unix_s": None} for k in cfg.server.api_keys]
    rows += [r.public(now_s) for r in registry.list()] if registry is not None else []
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("id", "role", "team", "status", "source", "limits", "budgets", "expires")
    for r in rows:
        lim = ", ".join(f"{k}={v}" for k, v in r["limits"].items()) or "-"
        bud = ", ".join(f"{next(f'{k}={v:g}' for k, v in b.items() if k != 'period' and v is not None)}/{b['period']}"
                        for b in r["budgets"]) or "-"
        cells = (r["id"], r["role"], r["team"] or "-", r["status"], r["source"], lim, bud, _when(r["expires_unix_s"]))
        table.add_row(*map(escape, cells))  # ids and teams are the operator's text, not markup
    out.print(table)


def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")],
                config: ConfigOpt = None, state_dir: StateOpt = None) -> None:
    """Revoke a run-time key: every gateway replica refuses it within a second."""
    from scheduler.teams.keys import KeyError_

    _, registry = _registry(config, state_dir, existing=True)
    try:
        record = registry.revoke(key_id)
    except KeyError_ as exc:
        _fail(exc)
    out.print(f"revoked key [bold]{escape(record.key_id)}[/] at {_when(record.revoked_unix_s)}")


def keys_rotate(key_id: Annotated[str, typer.Argument(help="the key's id")],
                config: ConfigOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Give a run-time key a new secret (role, team, limits and spend kept) and print it once."""
    from scheduler.teams.keys import KeyError_

    _, registry = _registry(config, state_dir, existing=True)
    try:
        record, secret = registry.rotate(key_id)
    except KeyError_ as exc:
        _fail(exc)
    _show_secret(record, secret, as_json, "rotated")


def keys_hash(key: Annotated[str, typer.Argument(help="the API key to hash for server.api_keys[].key_sha256")]) -> None:
    """Print the sha256 of an API key, for the config (keys are never stored in clear)."""
    from scheduler.teams.keys import hash_key

    out.print(hash_key(key))


def register(app: typer.Typer) -> None:
    keys = typer.Typer(help="API keys: create, list, revoke and rotate at run time; hash one for the config",
                       no_args_is_help=True)
    keys.command("create")(keys_create)
    keys.command("list")(keys_list)
    keys.command("revoke")(keys_revoke)
    keys.command("rotate")(keys_rotate)
    keys.command("hash")(keys_hash)
    app.add_typer(keys, name="keys")

"""`wattlane power show|set|reset|policy|audit`: the operator power API of a running gateway, from the shell."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from scheduler.power.policies import POLICY_NAMES

power_app = typer.Typer(help="Show and change GPU power limits, locked clocks and power policies.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOpt = Annotated[str, typer.Option("--url", envvar="WATTLANE_URL", help="gateway base URL")]
KeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="WATTLANE_API_KEY", help="operator API key", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the raw JSON")]


class CliError(Exception):
    pass


#: tests replace this to route requests through httpx.MockTransport
def make_client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)


def _call(url: str, api_key: str | None, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
    try:
        with make_client(url, api_key) as client:
            resp = client.request(method, path, json=body, params={k: v for k, v in (params or {}).items() if v is not None})
    except httpx.ConnectError as exc:
        raise CliError(f"cannot connect to {url} ({exc}); is `wattlane serve` running there? (set --url or WATTLANE_URL)") from None
    except httpx.TimeoutException:
        raise CliError(f"{url} did not answer within 30 s") from None
    except httpx.HTTPError as exc:
        raise CliError(f"request to {url}{path} failed: {exc}") from None
    if resp.status_code >= 400:
        message = resp.text.strip() or resp.reason_phrase
        try:
            e = resp.json().get("error", {})
            message = e.get("message") or message
            if e.get("param"):
                message += f" (param: {e['param']})"
        except (ValueError, AttributeError):
            pass
        hint = ""
        if resp.status_code == 401:
            hint = " (pass an operator key with --api-key or WATTLANE_API_KEY)"
        elif resp.status_code == 403:
            hint = " (this needs an operator key)" if "permission" not in message.lower() else ""
        raise CliError(f"HTTP {resp.status_code}: {message}{hint}")
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        raise CliError(f"{url}{path} answered with something that is not JSON: {resp.text[:200]!r}") from None


def _run(fn):
    try:
        return fn()
    except CliError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _fmt(v: Any, unit: str = "", digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x, "", digits) for x in v) + (f" {unit}" if unit else "")
    if isinstance(v, float):
        return f"{v:.{digits}f}{(' ' + unit) if unit else ''}"
    return f"{v}{(' ' + unit) if unit else ''}"


def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@power_app.command("show")
def show(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Devices with their power, limits and clocks, and the power policy in force."""

    def go():
        devices = _call(url, api_key, "GET", "/v1/devices")
        policy = _call(url, api_key, "GET", "/v1/power/policy")
        if as_json:
            out.print_json(json.dumps({"devices": devices, "policy": policy}))
            return
        t = Table(title="devices")
        for col in ("device", "node", "kind", "power", "limit", "limit range (default)", "SM clock", "locked clocks", "util", "running"):
            t.add_column(col)
        for d in (devices or {}).get("data", []):
            rng = "-" if d.get("min_power_limit_watts") is None else (
                f"{d['min_power_limit_watts']:.0f}-{d['max_power_limit_watts']:.0f} W ({d['default_power_limit_watts']:.0f})")
            t.add_row(
                str(d.get("device_id")), str(d.get("node")), str(d.get("kind")),
                _fmt(d.get("power_watts"), "W", 1), _fmt(d.get("power_limit_watts"), "W"), rng,
                _fmt(d.get("sm_clock_mhz"), "MHz"), _fmt(d.get("locked_clocks_mhz"), "MHz"),
                _fmt(d.get("utilization_percent"), "%"), _fmt(d.get("running_requests")),
            )
        out.print(t)
        _print_policy(policy)

    _run(go)


def _print_policy(policy: dict | None) -> None:
    if not policy:
        return
    act = policy.get("actuator") or {}
    out.print(f"power governor mode: [bold]{policy.get('mode')}[/] (requested {act.get('requested_mode', '-')}), "
              f"every {policy.get('interval_seconds')} s")
    if act.get("message"):
        out.print(f"[yellow]{act['message']}[/]")
    t = Table(title="power policy")
    for col in ("group", "devices", "policy", "options", "state"):
        t.add_column(col, overflow="fold")
    for g in policy.get("groups", []):
        t.add_row(g["name"], ", ".join(g["devices"]), g["policy"], json.dumps(g.get("options") or {}),
                  json.dumps(g.get("state") or {}, default=str)[:200])
    out.print(t)


def _parse_clocks(text: str) -> tuple[float, float]:
    parts = text.replace(",", ":").replace("-", ":").split(":")
    try:
        if len(parts) == 1:
            v = float(parts[0])
            return v, v
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise CliError(f"--clocks takes MHZ or MIN:MAX in MHz (e.g. 1410 or 900:1410), not {text!r}")


@power_app.command("set")
def set_cmd(
    device: Annotated[str, typer.Argument(help="device id, e.g. gpu0")],
    watts: Annotated[Optional[float], typer.Option("--watts", "-w", help="power limit in watts")] = None,
    clocks: Annotated[Optional[str], typer.Option("--clocks", help="lock SM clocks: MHZ or MIN:MAX")] = None,
    reason: Annotated[Optional[str], typer.Option(help="why (goes to the audit log)")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Set a device's power limit and/or lock its SM clocks (refused, not clamped, if out of range)."""

    def go():
        if watts is None and clocks is None:
            raise CliError("give --watts and/or --clocks")
        if watts is not None:
            r = _call(url, api_key, "PUT", f"/v1/devices/{device}/power-limit", {"watts": watts, "reason": reason})
            _report(r, f"{device}: power limit", "W")
        if clocks is not None:
            lo, hi = _parse_clocks(clocks)
            r = _call(url, api_key, "PUT", f"/v1/devices/{device}/locked-clocks", {"min_mhz": lo, "max_mhz": hi, "reason": reason})
            _report(r, f"{device}: locked clocks", "MHz")

    _run(go)


def _report(r: Any, what: str, unit: str) -> None:
    if isinstance(r, dict) and "outcome" in r:
        color = "green" if r["outcome"] == "applied" else "yellow"
        out.print(f"{what} {_fmt(r.get('old_value'), unit)} -> {_fmt(r.get('new_value'), unit)}: [{color}]{r['outcome']}[/]")
        if r["outcome"] == "recommended":
            out.print("[yellow]the governor is recommend-only: nothing was changed on the device (see `wattlane power show`)[/]")
    else:
        out.print(f"{what}: done")


@power_app.command("reset")
def reset_cmd(
    device: Annotated[str, typer.Argument(help="device id")],
    power_limit: Annotated[bool, typer.Option("--power-limit", help="only the power limit")] = False,
    clocks: Annotated[bool, typer.Option("--clocks", help="only the clock lock")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Reset the power limit to its default and unlock the clocks (both unless one is named)."""

    def go():
        both = not power_limit and not clocks
        if power_limit or both:
            _report(_call(url, api_key, "DELETE", f"/v1/devices/{device}/power-limit"), f"{device}: power limit", "W")
        if clocks or both:
            try:
                r = _call(url, api_key, "DELETE", f"/v1/devices/{device}/locked-clocks")
            except CliError as exc:
                if both and "no lockable clocks" in str(exc):
                    return  # a device without clock control: resetting "both" means the limit only
                raise
            _report(r, f"{device}: locked clocks", "MHz")

    _run(go)


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise CliError(f"--option takes KEY=VALUE (VALUE as JSON where it is not a plain word), not {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


@power_app.command("policy")
def policy_cmd(
    group: Annotated[Optional[str], typer.Argument(help="group to change (omit to show the policy)")] = None,
    policy: Annotated[Optional[str], typer.Argument(help=" | ".join(POLICY_NAMES))] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="KEY=VALUE policy option (repeat)")] = None,
    options_json: Annotated[Optional[str], typer.Option("--options", help="all options as a JSON object")] = None,
    devices: Annotated[Optional[str], typer.Option(help="comma-separated device ids (creates the group)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="enforce | recommend")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the power policy, or set a group's policy: `wattlane power policy rack budget -o budget_watts=1200`."""

    def go():
        body: dict[str, Any] = {}
        if group is not None:
            if policy is None:
                raise CliError("name the policy too: wattlane power policy GROUP POLICY [-o KEY=VALUE ...]")
            opts: dict[str, Any] = {}
            if options_json:
                try:
                    opts = json.loads(options_json)
                except ValueError as exc:
                    raise CliError(f"--options is not valid JSON: {exc}") from None
                if not isinstance(opts, dict):
                    raise CliError("--options must be a JSON object")
            for o in option or []:
                k, v = _parse_option(o)
                opts[k] = v
            g: dict[str, Any] = {"name": group, "policy": policy, "options": opts}
            if devices:
                g["devices"] = [d.strip() for d in devices.split(",") if d.strip()]
            body["groups"] = [g]
        if mode is not None:
            body["mode"] = mode
        result = _call(url, api_key, "PUT", "/v1/power/policy", body) if body else _call(url, api_key, "GET", "/v1/power/policy")
        if as_json:
            out.print_json(json.dumps(result))
        else:
            _print_policy(result)

    _run(go)


@power_app.command("audit")
def audit_cmd(
    device: Annotated[Optional[str], typer.Option(help="only this device (or group:<name>)")] = None,
    since: Annotated[Optional[float], typer.Option(help="unix seconds")] = None,
    limit: Annotated[int, typer.Option(help="rows, newest first")] = 50,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who changed what, when and why (every change and recommendation, by people and policies)."""

    def go():
        rows = _call(url, api_key, "GET", "/v1/power/audit", params={"device": device, "since": since, "limit": limit})
        data = (rows or {}).get("data", [])
        if as_json:
            out.print_json(json.dumps(data))
            return
        t = Table(title="power audit")
        for col in ("time (UTC)", "who", "device", "action", "old", "new", "outcome", "reason"):
            t.add_column(col, overflow="fold")
        for r in data:
            outcome = r["outcome"] + (f": {r['error']}" if r.get("error") else "")
            t.add_row(_ts(r["time_s"]), r["actor"], r["device_id"], r["action"], json.dumps(r["old_value"]),
                      json.dumps(r["new_value"]), outcome, r.get("reason") or "")
        out.print(t)

    _run(go)


def register(app: typer.Typer) -> None:
    app.add_typer(power_app, name="power")

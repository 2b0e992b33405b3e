"""`wattlane power show|set|reset|policy|audit`: the operator power API of a running gateway, from the shell."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Annotated, Any, Optional
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

from scheduler.cli_text import escape, print_error
from scheduler.power.policies import POLICY_NAMES

power_app = typer.Typer(help="Show and change GPU power limits, locked clocks and power policies.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOpt = Annotated[str, typer.Option("--url", envvar="WATTLANE_URL", help="gateway base URL")]
KeyOpt = Annotated[Optional[str], typer.Option("--api-key", envvar="WATTLANE_API_KEY", help="operator API key", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the raw JSON")]


class CliError(Exception):
    """A request that failed or was refused: exit 1."""

    exit_code = 1


class UsageError(CliError):
    """A mistake in the command line itself, found before any request: exit 2, like the other commands' usage errors."""

    exit_code = 2


def _segment(name: str) -> str:
    """A name from the command line as one URL path segment.

    Percent-encoded whole, so `/`, `?` or `#` in it cannot address another route; `.` and `..` are
    encoded too, or the URL would resolve them (`power set ..` would be a PUT to /v1/power-limit).
    """
    if not name:
        raise UsageError("the device id is empty; give one as `wattlane power show` lists it, e.g. gpu0")
    seg = quote(name, safe="")
    return seg.replace(".", "%2E") if seg in (".", "..") else seg


def _check_api_key(api_key: str | None) -> None:
    # httpx encodes headers as ASCII and raises UnicodeEncodeError from inside the client otherwise
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        bad = next(c for c in api_key if not (c.isascii() and c.isprintable()))
        raise UsageError(f"--api-key (or WATTLANE_API_KEY) holds {bad!r}, which cannot go in an HTTP header; "
                         "Wattlane keys are printable ASCII (a key made by `wattlane keys create` starts with wl-): "
                         "copy the key again")


#: tests replace this to route requests through httpx.MockTransport
def make_client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)


def _call(url: str, api_key: str | None, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
    _check_api_key(api_key)
    try:
        with make_client(url, api_key) as client:
            resp = client.request(method, path, json=body, params={k: v for k, v in (params or {}).items() if v is not None})
    except httpx.ConnectError as exc:
        raise CliError(f"cannot connect to {url} ({exc}); is `wattlane serve` running there? (set --url or WATTLANE_URL)") from None
    except httpx.TimeoutException:
        raise CliError(f"{url} did not answer within 30 s") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise UsageError(f"--url {url!r} is not a gateway URL ({exc}); give one like {DEFAULT_URL} "
                         "(--url or WATTLANE_URL)") from None
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
        print_error(err, exc)
        raise typer.Exit(exc.exit_code) from None


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
            t.add_row(*_cells(
                d.get("device_id"), d.get("node"), d.get("kind"),
                _fmt(d.get("power_watts"), "W", 1), _fmt(d.get("power_limit_watts"), "W"), rng,
                _fmt(d.get("sm_clock_mhz"), "MHz"), _fmt(d.get("locked_clocks_mhz"), "MHz"),
                _fmt(d.get("utilization_percent"), "%"), _fmt(d.get("running_requests")),
            ))
        out.print(t)
        _print_policy(policy)

    _run(go)


def _cells(*values: Any) -> list[str]:
    """Table cells that show names, reasons and server messages as they are, never as markup."""
    return [escape(str(v)) for v in values]


def _print_policy(policy: dict | None) -> None:
    if not policy:
        return
    act = policy.get("actuator") or {}
    out.print(f"power governor mode: [bold]{escape(str(policy.get('mode')))}[/] "
              f"(requested {escape(str(act.get('requested_mode', '-')))}), every {policy.get('interval_seconds')} s")
    if act.get("message"):
        out.print(f"[yellow]{escape(str(act['message']))}[/]")
    t = Table(title="power policy")
    for col in ("group", "devices", "policy", "options", "state"):
        t.add_column(col, overflow="fold")
    for g in policy.get("groups", []):
        t.add_row(*_cells(g["name"], ", ".join(g["devices"]), g["policy"], json.dumps(g.get("options") or {}),
                          json.dumps(g.get("state") or {}, default=str)[:200]))
    out.print(t)


def _parse_clocks(text: str) -> tuple[float, float]:
    parts = text.replace(",", ":").replace("-", ":").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    # nan and inf parse as floats but are no clock, and json.dumps cannot send them
    if len(values) in (1, 2) and all(math.isfinite(v) for v in values):
        return values[0], values[-1]
    raise UsageError(f"--clocks takes MHZ or MIN:MAX in MHz (e.g. 1410 or 900:1410), not {text!r}")


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
            raise UsageError("give --watts and/or --clocks")
        if watts is not None and not math.isfinite(watts):
            raise UsageError(f"--watts takes a power limit in watts (e.g. 300), not {watts}")
        seg = _segment(device)
        lo, hi = _parse_clocks(clocks) if clocks is not None else (None, None)  # refused before any change is made
        if watts is not None:
            r = _call(url, api_key, "PUT", f"/v1/devices/{seg}/power-limit", {"watts": watts, "reason": reason})
            _report(r, f"{device}: power limit", "W")
        if clocks is not None:
            r = _call(url, api_key, "PUT", f"/v1/devices/{seg}/locked-clocks", {"min_mhz": lo, "max_mhz": hi, "reason": reason})
            _report(r, f"{device}: locked clocks", "MHz")

    _run(go)


def _report(r: Any, what: str, unit: str) -> None:
    if isinstance(r, dict) and "outcome" in r:
        color = "green" if r["outcome"] == "applied" else "yellow"
        out.print(f"{escape(what)} {_fmt(r.get('old_value'), unit)} -> {_fmt(r.get('new_value'), unit)}: "
                  f"[{color}]{escape(str(r['outcome']))}[/]")
        if r["outcome"] == "recommended":
            out.print("[yellow]the governor is recommend-only: nothing was changed on the device (see `wattlane power show`)[/]")
    else:
        out.print(f"{escape(what)}: done")


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
        seg = _segment(device)
        if power_limit or both:
            _report(_call(url, api_key, "DELETE", f"/v1/devices/{seg}/power-limit"), f"{device}: power limit", "W")
        if clocks or both:
            try:
                r = _call(url, api_key, "DELETE", f"/v1/devices/{seg}/locked-clocks")
            except CliError as exc:
                if both and "no lockable clocks" in str(exc):
                    return  # a device without clock control: resetting "both" means the limit only
                raise
            _report(r, f"{device}: locked clocks", "MHz")

    _run(go)


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UsageError(f"--option takes KEY=VALUE (VALUE as JSON where it is not a plain word), not {text!r}")
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
                raise UsageError("name the policy too: wattlane power policy GROUP POLICY [-o KEY=VALUE ...]")
            opts: dict[str, Any] = {}
            if options_json:
                try:
                    opts = json.loads(options_json)
                except ValueError as exc:
                    raise UsageError(f"--options is not valid JSON: {exc}") from None
                if not isinstance(opts, dict):
                    raise UsageError("--options must be a JSON object")
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
            t.add_row(*_cells(_ts(r["time_s"]), r["actor"], r["device_id"], r["action"], json.dumps(r["old_value"]),
                              json.dumps(r["new_value"]), outcome, r.get("reason") or ""))
        out.print(t)

    _run(go)


def register(app: typer.Typer) -> None:
    app.add_typer(power_app, name="power")

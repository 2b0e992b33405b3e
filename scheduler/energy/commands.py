"""`wattlane report`: an energy, savings and carbon report of a time window, read from the ledger file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from scheduler.cli_text import escape, print_error

err = Console(stderr=True)


Opt = typer.Option


def report(
    out: Annotated[Path, Opt("--out", "-o", help="file to write (markdown also writes <stem>-charts/*.png)")],
    since: Annotated[Optional[str], Opt(help="start, unix seconds or ISO 8601 (UTC if naive); default: all")] = None,
    until: Annotated[Optional[str], Opt(help="end (exclusive), same forms; default: after the last row")] = None,
    group_by: Annotated[str, Opt("--group-by", help="team | key | model | device")] = "team",
    fmt: Annotated[str, Opt("--format", help="md | html (one self-contained file) | csv")] = "md",
    charts: Annotated[bool, Opt("--charts/--no-charts", help="PNG charts in md and html (needs matplotlib)")] = True,
    config: Annotated[Optional[Path], Opt("--config", "-c", help="YAML config (for its state directory)")] = None,
    state_dir: Annotated[Optional[str], Opt("--state-dir", help="whose ledger to read (WATTLANE_STATE_DIR)")] = None,
    ledger_path: Annotated[Optional[Path], Opt("--ledger", help="a ledger file to read instead")] = None,
) -> None:
    """Totals, per-team/key/model breakdowns, tokens per joule, savings against the baseline, carbon by source."""
    from scheduler.energy.report import GROUP_BY, build_report, parse_time, write_report

    if group_by not in GROUP_BY:
        _fail(f"--group-by must be one of {', '.join(GROUP_BY)}, not {group_by!r}")
    if fmt not in ("md", "html", "csv"):
        _fail(f"--format must be md, html or csv, not {fmt!r}")
    window = {}
    for name, value in (("since", since), ("until", until)):
        try:
            window[name] = parse_time(value)
        except ValueError as exc:
            _fail(f"--{name} {exc}")
    if window["since"] is not None and window["until"] is not None and window["since"] >= window["until"]:
        _fail("--since must be before --until")
    if out.is_dir():  # checked before the ledger is read: the report is written to this path as a file
        _fail(f"--out {out} is a folder; name the file to write, e.g. {out / f'report.{fmt}'}")
    if charts and fmt != "csv":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("charts need matplotlib: pip install 'wattlane[report]', or pass --no-charts")
    path = ledger_path or _ledger_in_state_dir(config, state_dir)
    if not path.is_file():
        _fail(f"no ledger at {path}; pass --ledger, --state-dir or the --config that `wattlane serve` used")
    from scheduler.energy.ledger import Ledger, NotALedgerError

    try:
        ledger = Ledger.for_reading(path)
    except NotALedgerError as exc:
        _fail(f"{exc}; pass the ledger.sqlite3 of a state directory")
    with ledger:
        rep = build_report(ledger, group_by, **window)  # type: ignore[arg-type]
    try:
        written = write_report(rep, fmt, out, with_charts=charts)  # type: ignore[arg-type]
    except OSError as exc:  # a folder where the charts go, no permission, a full disk
        _fail(f"cannot write the report to --out {out}: {exc}")
    t = rep.totals
    err.print(f"{t['requests']} requests, {t['joules']:.6g} J, {t['gco2e']:.6g} g CO2e, "
              f"saved {t['saved_joules']:.6g} J (estimate) -> {escape(', '.join(str(p) for p in written))}")


def _ledger_in_state_dir(config: Path | None, state_dir: str | None) -> Path:
    from scheduler.config import load_config
    from scheduler.config_error import ConfigError
    from scheduler.energy.ledger import LEDGER_FILENAME
    from scheduler.state_dir import resolve_state_dir

    try:
        cfg = load_config(config, check_files=False)
    except ConfigError as exc:
        print_error(err, exc)
        raise typer.Exit(2) from None
    return resolve_state_dir(cfg, state_dir) / LEDGER_FILENAME


def _fail(message: str) -> None:
    print_error(err, message)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("report")(report)

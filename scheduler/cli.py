"""The `wattlane` command: serve, simulate, route-eval, power and the other operator tools."""

from __future__ import annotations

import importlib

import typer


def _version(value: bool) -> None:
    if value:
        from scheduler import __version__

        typer.echo(f"wattlane {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="wattlane",
    help="Wattlane: energy-aware inference scheduler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: modules that add their commands with register(app); each area owns its own commands
_COMMAND_MODULES = [
    "scheduler.cluster.commands",
    "scheduler.power.commands",
    "scheduler.sim.commands",
    "scheduler.routing.commands",
    "scheduler.teams.commands",
    "scheduler.energy.commands",
    "scheduler.sim.bench",
]


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")) -> None:
    """Wattlane: energy-aware inference scheduler."""


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)


def main() -> None:
    _register_all()
    app()


if __name__ == "__main__":
    main()

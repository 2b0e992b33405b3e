"""The `wattlane` command: serve, simulate, route-eval, power and the other operator tools."""

from __future__ import annotations

import importlib

import typer

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
]


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)


def main() -> None:
    _register_all()
    app()


if __name__ == "__main__":
    main()

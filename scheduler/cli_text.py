"""How the CLI prints text it did not write (error messages, paths, names, ids): verbatim, never as Rich markup.

Rich reads `[...]` in a printed string as a style tag: `devices: [cpu0]` or `wattlane[otel]` lose the
bracketed part, and `[/x]` raises MarkupError, so a typo in a name would crash the command that reports it.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.text import Text

__all__ = ["escape", "print_error"]


def print_error(console: Console, message: object, label: str = "error") -> None:
    """Print `label: message`, the label in bold red and the message exactly as given."""
    console.print(Text.assemble((f"{label}:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)

"""The configuration error every module raises: a problem phrased for the person who wrote the file.

A leaf module (it imports nothing from the package) so that config.py, the engines, the simulator
and the carbon providers can all raise it without importing each other.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, phrased for the person who wrote the file."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, fix: str | None = None):
        self.message, self.file, self.key, self.fix = message, file, key, fix
        parts = []
        if file:
            parts.append(f"{file}")
        if key:
            parts.append(f"key '{key}'")
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)

"""Where Wattlane keeps its state (ledger, audit log, saved device settings, assembled weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.config import WattlaneConfig


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/wattlane, else ~/.local/state/wattlane (per user, never the repo)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "wattlane"


def resolve_state_dir(config: WattlaneConfig, override: str | None = None) -> Path:
    """--state-dir beats WATTLANE_STATE_DIR beats server.state_dir beats the per-user default."""
    chosen = override or os.environ.get("WATTLANE_STATE_DIR") or config.server.state_dir
    if chosen:
        p = Path(os.path.expanduser(chosen))
        if not p.is_absolute():
            p = (config.config_dir() / p) if (config.server.state_dir == chosen) else p.resolve()
        return p.resolve()
    return default_state_dir()

"""Where the shared data lives: $WATTLANE_SHARED_DIR, else the `shared/` folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    env = os.environ.get("WATTLANE_SHARED_DIR")
    if env:
        return Path(env).expanduser()
    for candidate in (REPO_DIR.parent / "shared", REPO_DIR / "shared"):
        if candidate.is_dir():
            return candidate
    return REPO_DIR.parent / "shared"


def reference_csv() -> Path:
    return shared_dir() / "reference" / "mlenergy_v3_lm_arena_chat.csv"


def conversation_trace() -> Path:
    return shared_dir() / "traces" / "azure-llm-2023" / "conv.csv"

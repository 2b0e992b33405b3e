"""Builds the configured Engine for one model replica by looking its name up in ENGINE_BUILDERS."""

from __future__ import annotations

import importlib
from pathlib import Path

from scheduler.config import ModelConfig, WattlaneConfig
from scheduler.engines.base import ENGINE_BUILDERS, Engine


def build_engine(model: ModelConfig, config: WattlaneConfig, state_dir: Path, devices: dict | None = None,
                 replica_index: int = 0) -> Engine:
    spec = ENGINE_BUILDERS.get(model.engine)
    if spec is None:
        raise AssertionError(f"engine {model.engine!r} passed config validation but has no builder")
    module, _, function = spec.partition(":")
    builder = getattr(importlib.import_module(module), function)
    return builder(model, config, state_dir, devices, replica_index)

"""Builds the configured Engine for one model replica (the only place that maps engine names to classes)."""

from __future__ import annotations

from pathlib import Path

from scheduler.config import ConfigError, ModelConfig, WattlaneConfig, resolve_weights
from scheduler.engines.base import Engine, ModelKind


def build_engine(model: ModelConfig, config: WattlaneConfig, state_dir: Path, devices: dict | None = None,
                 replica_index: int = 0) -> Engine:
    kind = ModelKind(model.kind)
    if model.engine == "llamacpp":
        from scheduler.engines.llamacpp import LlamaCppEngine

        weights = resolve_weights(model, config, cache_dir=state_dir / "models")
        opts = dict(model.engine_options)
        unknown = set(opts) - {"n_threads", "n_batch"}
        if unknown:
            raise ConfigError(
                f"unknown llamacpp engine option(s): {', '.join(sorted(unknown))}",
                file=config.source_path, key=f"models (id {model.id}).engine_options", fix="allowed: n_threads, n_batch",
            )
        return LlamaCppEngine(
            model_id=model.id,
            kind=kind,
            weights_path=weights,
            context_length=model.context_length,
            n_threads=opts.get("n_threads"),
            n_batch=int(opts.get("n_batch", 256)),
        )
    if model.engine == "simulated":
        from scheduler.engines.simulated import build_simulated_engine

        return build_simulated_engine(model, config, devices or {}, replica_index=replica_index)
    raise AssertionError(f"engine {model.engine!r} passed config validation but has no builder")

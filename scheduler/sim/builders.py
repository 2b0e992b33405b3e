"""Builds a simulated model replica's batching core from its config: the simulator's model-layer builders.

Shared by the live simulated engine (scheduler/engines/simulated.py), the fleet replay
(scheduler/sim/fleet.py) and config validation, so it imports the configuration schema for
annotations only and raises the leaf ConfigError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.config_error import ConfigError
from scheduler.sim.core import BatchCore, CoreListener
from scheduler.sim.profiles import ProfileError, model_profile

if TYPE_CHECKING:
    from scheduler.config import WattlaneConfig


def replica_device_groups(model, config: WattlaneConfig, devices: dict, *, key: str) -> list[list]:
    """Split a model's device list into its replicas' GPU groups (num_gpus of the profile each)."""
    prof = model_profile_for(model, config, devices, key=key)
    tp = prof.num_gpus
    ids = list(model.devices)
    if len(ids) != model.replicas * tp:
        raise ConfigError(
            f"{model.replicas} replica(s) of {prof.key} need {model.replicas * tp} devices, {len(ids)} listed",
            file=config.source_path, key=f"{key}.devices", fix=f"list {tp} device id(s) per replica, or change replicas",
        )
    missing = [d for d in ids if d not in devices]
    if missing:
        raise ConfigError(f"unknown device(s) {', '.join(missing)}", file=config.source_path, key=f"{key}.devices", fix="list them under devices.simulated")
    return [[devices[d] for d in ids[r * tp:(r + 1) * tp]] for r in range(model.replicas)]


ENGINE_OPTIONS = {"profile", "max_num_seqs", "max_batched_tokens", "kv_capacity_tokens", "max_segment_seconds"}


def model_profile_for(model, config: WattlaneConfig, devices: dict, *, key: str):
    opts = model.engine_options
    unknown = set(opts) - ENGINE_OPTIONS
    if unknown:
        raise ConfigError(f"unknown simulated engine option(s): {', '.join(sorted(unknown))}", file=config.source_path,
                          key=f"{key}.engine_options", fix=f"allowed: {', '.join(sorted(ENGINE_OPTIONS))}")
    if "profile" not in opts:
        raise ConfigError("engine 'simulated' needs engine_options.profile", file=config.source_path, key=f"{key}.engine_options",
                          fix="name a model profile, e.g. profile: llama-3.1-8b")
    first = devices.get(model.devices[0]) if model.devices else None
    try:
        return model_profile(str(opts["profile"]), first.profile.key if first is not None else None)
    except ProfileError as exc:
        raise ConfigError(str(exc), file=config.source_path, key=f"{key}.engine_options.profile", fix="use a profile from scheduler/sim/data/models.json") from None


def build_core(model, config: WattlaneConfig, gpus: list, *, key: str, listener: CoreListener | None = None) -> BatchCore:
    prof = model_profile_for(model, config, {g.device_id: g for g in gpus}, key=key)
    opts = model.engine_options
    return BatchCore(
        prof, gpus,
        max_num_seqs=int(opts.get("max_num_seqs", 256)),
        max_batched_tokens=int(opts.get("max_batched_tokens", 8192)),
        kv_capacity_tokens=opts.get("kv_capacity_tokens"),
        max_segment_seconds=float(opts.get("max_segment_seconds", 0.25)),
        listener=listener,
    )

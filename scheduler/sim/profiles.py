"""GPU and model profiles for the simulator: typed records loaded from scheduler/sim/data/*.json.

gpus.json holds published facts about each card (power-limit range, clocks, idle power, bandwidth,
peak throughput). models.json is written by `python -m scheduler.sim.fit` from the ML.ENERGY table;
nothing in it is typed by hand. A profile that is missing or does not parse raises ProfileError
with the file, the key and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
GPUS_PATH = DATA_DIR / "gpus.json"
MODELS_PATH = DATA_DIR / "models.json"


class ProfileError(ValueError):
    """A GPU or model profile that is unknown or does not parse."""


@dataclass(frozen=True)
class GpuProfile:
    key: str
    name: str
    power_limit_min_watts: float
    power_limit_max_watts: float
    power_limit_default_watts: float
    power_limit_settable: bool
    sm_clock_min_mhz: float
    sm_clock_max_mhz: float
    sm_clock_step_mhz: float
    memory_clock_mhz: float
    idle_no_model_watts: float
    idle_loaded_watts: float
    idle_loaded_min_clock_watts: float
    memory_bandwidth_bytes_per_second: float
    peak_flops_per_second: float
    memory_bytes: float
    #: supply voltage at the lowest clock as a fraction of the voltage at the highest clock
    voltage_floor_fraction: float
    #: below about sqrt(knee) x max clock the SMs can no longer keep HBM busy (see physics.bandwidth_factor)
    memory_clock_knee: float
    #: share of the dynamic SM power drawn while warps wait on memory (memory-bound kernels)
    memory_bound_sm_activity: float = 0.3
    #: where voltage_floor_fraction, memory_clock_knee, memory_bound_sm_activity and the idle terms
    #: come from: "assumed" (modelling constants) or "fitted: <run file> on <device>" (scheduler.sim.fit --gpu-run)
    constants_provenance: str = "assumed"

    @cached_property
    def min_clock_fraction(self) -> float:
        return self.sm_clock_min_mhz / self.sm_clock_max_mhz

    @cached_property
    def clock_power_watts(self) -> float:
        """Clock-tree / leakage-with-clock power at max clock that idles away as the clock drops.

        Solved from two facts: idle-with-model power at max clock and at min clock
        (P_idle(s) = static + g(s) x clock_power with g(1) = 1).
        """
        from scheduler.sim.physics import voltage_scaled_activity

        g_min = voltage_scaled_activity(self.min_clock_fraction, self.voltage_floor_fraction)
        return (self.idle_loaded_watts - self.idle_loaded_min_clock_watts) / (1.0 - g_min)

    @cached_property
    def static_watts(self) -> float:
        return self.idle_loaded_watts - self.clock_power_watts


@dataclass(frozen=True)
class ModelFit:
    """Parameters fitted to measurements (see scheduler/sim/fit.py for their meaning)."""

    memory_efficiency: float  # achieved fraction of peak HBM bandwidth on weight/KV reads
    compute_efficiency: float  # achieved fraction of peak tensor throughput (MFU)
    fixed_seconds: float  # per-iteration overhead: scheduling, kernel launches, TP all-reduce latency
    per_token_seconds: float  # clock-independent per-token overhead (sampling, detokenising)
    dynamic_watts: float  # per GPU: switching power at full compute activity and max clock/voltage
    memory_watts: float  # per GPU: HBM power while streaming at full bandwidth
    prompt_tokens_mean: float  # mean prompt length of the measured workload (lognormal prompts)


@dataclass(frozen=True)
class ModelProfile:
    key: str  # e.g. llama-3.1-8b@h100-sxm
    model: str  # the Hugging Face id it was measured with
    gpu: str
    num_gpus: int
    params_b: float
    n_layers: int
    d_model: int
    kv_bytes_per_token: int
    weights_bytes: float
    fit: ModelFit
    #: "fitted" (to the table) or "transferred" (another GPU's fit, scaled; see model_profile())
    provenance: str = "fitted"

    @cached_property
    def flops_per_token(self) -> float:
        return 2.0 * self.params_b * 1e9

    @cached_property
    def attention_flops_per_token_context(self) -> float:
        """Extra FLOPs for one token attending to one earlier token (QK^T and AV over all layers)."""
        return 4.0 * self.n_layers * self.d_model


def _check_keys(cls: type, raw: dict[str, Any], where: str, skip: set[str]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)} - skip
    missing = sorted(n for n in names if n not in raw and not _has_default(cls, n))
    if missing:
        raise ProfileError(f"{where}: missing {', '.join(missing)}; regenerate with `python -m scheduler.sim.fit`")
    return {k: raw[k] for k in names if k in raw}


def _has_default(cls: type, name: str) -> bool:
    from dataclasses import MISSING

    f = next(f for f in fields(cls) if f.name == name)
    return f.default is not MISSING


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{path}: not found; run `python -m scheduler.sim.fit` to create it") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: does not parse ({exc}); restore it from git or rerun the fit") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: the top level must be an object keyed by profile name")
    return data


@lru_cache(maxsize=8)
def gpu_profiles(path: Path = GPUS_PATH) -> dict[str, GpuProfile]:
    out: dict[str, GpuProfile] = {}
    for key, raw in _read_json(path).items():
        if key.startswith("_"):
            continue
        kwargs = _check_keys(GpuProfile, raw, f"{path.name}[{key}]", {"key"})
        try:
            out[key] = GpuProfile(key=key, **{k: (v if isinstance(v, bool | str) else float(v)) for k, v in kwargs.items()})
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{path.name}[{key}]: {exc}") from None
    return out


#: constants every gpu_profile() lookup overrides while gpu_constant_overrides() is active
_CONSTANT_OVERRIDES: dict[str, float] = {}
#: the constants a sensitivity band may move (see gpu_constant_overrides)
BAND_CONSTANTS = ("voltage_floor_fraction", "memory_clock_knee", "memory_bound_sm_activity")


@contextmanager
def gpu_constant_overrides(**values: float) -> Iterator[None]:
    """Every GPU profile looked up inside the block uses these modelling constants instead of its own.

    For sensitivity bands: rerun a simulation at the low and the high end of the plausible values.
    Devices built before the block keep the profile they were built with.
    """
    unknown = set(values) - set(BAND_CONSTANTS)
    if unknown:
        raise ProfileError(f"not a GPU modelling constant: {', '.join(sorted(unknown))}; known: {', '.join(BAND_CONSTANTS)}")
    saved = dict(_CONSTANT_OVERRIDES)
    _CONSTANT_OVERRIDES.update({k: float(v) for k, v in values.items()})
    try:
        yield
    finally:
        _CONSTANT_OVERRIDES.clear()
        _CONSTANT_OVERRIDES.update(saved)


def gpu_profile(key: str) -> GpuProfile:
    profiles = gpu_profiles()
    if key not in profiles:
        raise ProfileError(f"unknown GPU profile '{key}'; known: {', '.join(sorted(profiles))}")
    if _CONSTANT_OVERRIDES:
        overrides = ", ".join(f"{k}={v:g}" for k, v in sorted(_CONSTANT_OVERRIDES.items()))
        return replace(profiles[key], **_CONSTANT_OVERRIDES, constants_provenance=f"sensitivity override ({overrides})")
    return profiles[key]


@lru_cache(maxsize=8)
def model_profiles(path: Path = MODELS_PATH) -> dict[str, ModelProfile]:
    out: dict[str, ModelProfile] = {}
    for key, raw in _read_json(path).items():
        if key.startswith("_"):
            continue
        where = f"{path.name}[{key}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("fit"), dict):
            raise ProfileError(f"{where}: needs an object with a 'fit' object; rerun `python -m scheduler.sim.fit`")
        fit_kwargs = _check_keys(ModelFit, raw["fit"], where + ".fit", set())
        kwargs = _check_keys(ModelProfile, raw, where, {"key", "fit"})
        try:
            fit = ModelFit(**{k: float(v) for k, v in fit_kwargs.items()})
            out[key] = ModelProfile(
                key=key, fit=fit,
                model=str(kwargs["model"]), gpu=str(kwargs["gpu"]), num_gpus=int(kwargs["num_gpus"]),
                params_b=float(kwargs["params_b"]), n_layers=int(kwargs["n_layers"]), d_model=int(kwargs["d_model"]),
                kv_bytes_per_token=int(kwargs["kv_bytes_per_token"]), weights_bytes=float(kwargs["weights_bytes"]),
                provenance=str(kwargs.get("provenance", "fitted")),
            )
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: {exc}") from None
    return out


def model_profile(name: str, gpu: str | None = None) -> ModelProfile:
    """Look up 'llama-3.1-8b@h100-sxm', or 'llama-3.1-8b' on `gpu`.

    A model fitted on one GPU but asked for on another is transferred: the efficiencies and the
    workload are kept, the power coefficients are scaled by the ratio of the cards' default power
    limits. Such a profile says provenance "transferred".
    """
    profiles = model_profiles()
    base, _, at = name.partition("@")
    gpu = at or gpu
    if gpu and f"{base}@{gpu}" in profiles:
        return profiles[f"{base}@{gpu}"]
    candidates = [p for k, p in profiles.items() if k.split("@")[0] == base]
    if not candidates:
        known = sorted({k.split("@")[0] for k in profiles})
        raise ProfileError(f"unknown model profile '{name}'; known: {', '.join(known)}")
    src = candidates[0]
    if gpu is None:
        return src
    target, origin = gpu_profile(gpu), gpu_profile(src.gpu)
    scale = target.power_limit_default_watts / origin.power_limit_default_watts
    f = src.fit
    return replace(
        src, key=f"{base}@{gpu}", gpu=gpu, provenance="transferred",
        fit=replace(f, dynamic_watts=f.dynamic_watts * scale, memory_watts=f.memory_watts * scale),
    )

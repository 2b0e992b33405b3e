"""The simulator's physics: time and energy of one engine iteration on one GPU, and how power caps bind.

One iteration reads the weights and the KV cache (memory-bound part) and does 2 x params FLOPs per
token plus attention (compute-bound part). With s = SM clock / max clock:

    T(s) = t_fixed + t_tok x seqs + t_mem / beta(s) + t_comp / s
    E(s) = P_static x T + g(s) x (P_clock x T + P_dyn x (t_comp / s + kappa x t_mem / beta(s))) + P_mem x t_mem
    g(s) = s x v(s)^2,  v(s) = v0 + (1 - v0) x s^2      (dynamic power ~ f V^2, V rising with f)
    beta(s) = (1 + k) s^2 / (s^2 + k)                    (HBM stays saturated until the clock is very low)

t_mem = bytes / (bandwidth x memory_efficiency) and t_comp = flops / (peak x compute_efficiency) are
the times at max clock; v0 (voltage_floor_fraction), k (memory_clock_knee) and kappa
(memory_bound_sm_activity) come from the GPU profile. Power is E / T. When it exceeds the power limit the clock drops until it
fits (what the driver's sw_power_cap does): decode (mostly t_mem) hardly slows, prefill (t_comp)
slows about 1/s. Energy per token is U-shaped in the clock: at low clocks static power integrates
over a longer T, at high clocks V^2 grows faster than T shrinks.

Every function works on floats and on numpy arrays alike (the fit evaluates thousands of
iterations at once); the scalar clock search is a separate small loop because it runs per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: profiles uses this module's voltage curve
    from scheduler.sim.profiles import GpuProfile, ModelFit, ModelProfile

#: default share of the dynamic SM power spent while warps wait on memory (memory-bound kernels);
#: each GPU profile carries its own (GpuProfile.memory_bound_sm_activity, fitted by `fit --gpu-run`)
SM_ACTIVITY_WHILE_MEMORY_BOUND = 0.3
_BISECTION_STEPS = 22


def voltage_scaled_activity(s, voltage_floor_fraction: float):
    """g(s) = s v(s)^2: dynamic power at clock fraction s relative to max clock."""
    v = voltage_floor_fraction + (1.0 - voltage_floor_fraction) * s * s
    return s * v * v


def bandwidth_factor(s, knee: float):
    """Achieved fraction of full HBM bandwidth at clock fraction s (1 at s = 1)."""
    s2 = s * s
    return (1.0 + knee) * s2 / (s2 + knee)


@dataclass(frozen=True)
class IterationWork:
    """What one iteration asks of each GPU of a replica (tensor parallel work is split evenly)."""

    flops: float
    bytes: float
    sequences: int
    decode_tokens: int = 0
    prefill_tokens: int = 0


@dataclass(frozen=True)
class OperatingPoint:
    clock_mhz: float
    seconds: float
    joules: float
    capped: bool

    @property
    def power_watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0


def iteration_work(
    model: ModelProfile,
    *,
    decode_tokens: int,
    decode_context_tokens: float,
    prefill_tokens: int = 0,
    prefill_attention_pairs: float = 0.0,
    prefill_sequences: int = 0,
) -> IterationWork:
    """Work per GPU of one iteration.

    decode_context_tokens: the sum over decoding sequences of their context length (KV read).
    prefill_attention_pairs: sum over prefill chunks of chunk x (earlier tokens + chunk / 2).
    """
    flops = model.flops_per_token * (decode_tokens + prefill_tokens) + model.attention_flops_per_token_context * (
        decode_context_tokens + prefill_attention_pairs
    )
    nbytes = model.weights_bytes + model.kv_bytes_per_token * (decode_context_tokens + prefill_tokens)
    g = model.num_gpus
    return IterationWork(
        flops=flops / g, bytes=nbytes / g, sequences=decode_tokens + prefill_sequences,
        decode_tokens=decode_tokens, prefill_tokens=prefill_tokens,
    )


def _parts(gpu: GpuProfile, fit: ModelFit, flops, nbytes, sequences):
    t_over = fit.fixed_seconds + fit.per_token_seconds * sequences
    t_mem = nbytes / (gpu.memory_bandwidth_bytes_per_second * fit.memory_efficiency)
    t_comp = flops / (gpu.peak_flops_per_second * fit.compute_efficiency)
    return t_over, t_mem, t_comp


def work_parts(gpu: GpuProfile, fit: ModelFit, work: IterationWork):
    """(fixed, memory, compute) seconds of one iteration at the maximum clock: the inputs of cost_at."""
    return _parts(gpu, fit, work.flops, work.bytes, work.sequences)


def cost_at(s, gpu: GpuProfile, fit: ModelFit, t_over, t_mem, t_comp):
    """(seconds, joules) of one iteration on one GPU at clock fraction s."""
    beta = bandwidth_factor(s, gpu.memory_clock_knee)
    t_m = t_mem / beta
    t_c = t_comp / s
    seconds = t_over + t_m + t_c
    g = voltage_scaled_activity(s, gpu.voltage_floor_fraction)
    joules = (
        gpu.static_watts * seconds
        + g * (gpu.clock_power_watts * seconds + fit.dynamic_watts * (t_c + gpu.memory_bound_sm_activity * t_m))
        + fit.memory_watts * t_mem
    )
    return seconds, joules


def operating_point(
    gpu: GpuProfile,
    fit: ModelFit,
    work: IterationWork,
    power_limit_watts: float,
    max_clock_mhz: float | None = None,
) -> OperatingPoint:
    """Clock, time and energy of one iteration: the highest allowed clock whose power fits the limit."""
    t_over, t_mem, t_comp = _parts(gpu, fit, work.flops, work.bytes, work.sequences)
    s_min = gpu.min_clock_fraction
    s_top = (max_clock_mhz or gpu.sm_clock_max_mhz) / gpu.sm_clock_max_mhz
    seconds, joules = cost_at(s_top, gpu, fit, t_over, t_mem, t_comp)
    if joules <= power_limit_watts * seconds:
        return OperatingPoint(s_top * gpu.sm_clock_max_mhz, seconds, joules, False)
    lo, hi = s_min, s_top
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        sec, j = cost_at(mid, gpu, fit, t_over, t_mem, t_comp)
        if j <= power_limit_watts * sec:
            lo = mid
        else:
            hi = mid
    seconds, joules = cost_at(lo, gpu, fit, t_over, t_mem, t_comp)
    return OperatingPoint(lo * gpu.sm_clock_max_mhz, seconds, joules, True)


def operating_points_array(
    gpu: GpuProfile,
    fit: ModelFit,
    flops: np.ndarray,
    nbytes: np.ndarray,
    sequences: np.ndarray,
    power_limit_watts: float,
    max_clock_mhz: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised operating_point: (clock fraction, seconds, joules) arrays."""
    t_over, t_mem, t_comp = _parts(gpu, fit, flops, nbytes, sequences)
    s_top = (max_clock_mhz or gpu.sm_clock_max_mhz) / gpu.sm_clock_max_mhz
    sec, j = cost_at(s_top, gpu, fit, t_over, t_mem, t_comp)
    over = j > power_limit_watts * sec
    s = np.full(np.shape(flops), s_top, dtype=float)
    if np.any(over):
        lo = np.full(int(over.sum()), gpu.min_clock_fraction)
        hi = np.full_like(lo, s_top)
        to, tm, tc = t_over[over] if np.ndim(t_over) else t_over, t_mem[over], t_comp[over]
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            a, b = cost_at(mid, gpu, fit, to, tm, tc)
            ok = b <= power_limit_watts * a
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        s[over] = lo
    sec, j = cost_at(s, gpu, fit, t_over, t_mem, t_comp)
    return s, sec, j


def idle_power_watts(gpu: GpuProfile, *, model_loaded: bool, max_clock_mhz: float | None = None) -> float:
    """Power with nothing running. A loaded model keeps the clock up (execution idle)."""
    if not model_loaded:
        return gpu.idle_no_model_watts
    s = (max_clock_mhz or gpu.sm_clock_max_mhz) / gpu.sm_clock_max_mhz
    return gpu.static_watts + voltage_scaled_activity(s, gpu.voltage_floor_fraction) * gpu.clock_power_watts

"""Physics of the simulated GPU: U-shaped energy in clock, power caps that bind like real ones."""

import numpy as np
import pytest

from scheduler.sim.physics import idle_power_watts, iteration_work, operating_point
from scheduler.sim.profiles import gpu_profile, model_profile

H100 = gpu_profile("h100-sxm")
M8 = model_profile("llama-3.1-8b@h100-sxm")


def _decode(batch=32, ctx=600):
    return iteration_work(M8, decode_tokens=batch, decode_context_tokens=batch * ctx)


def _prefill(tokens=4096):
    return iteration_work(M8, decode_tokens=0, decode_context_tokens=0, prefill_tokens=tokens,
                          prefill_attention_pairs=tokens * tokens / 2, prefill_sequences=1)


def test_energy_per_token_is_u_shaped_in_clock():
    clocks = np.arange(H100.sm_clock_min_mhz, H100.sm_clock_max_mhz + 1, 30)
    energy = [operating_point(H100, M8.fit, _decode(), 700, c).joules for c in clocks]
    best = int(np.argmin(energy))
    assert 0 < best < len(clocks) - 1, "minimum must be inside the clock range"
    assert energy[0] > 1.2 * energy[best] and energy[-1] > 1.1 * energy[best]


def test_power_cap_binds_by_lowering_the_clock():
    # small-batch decode runs under the default limit at full clock ...
    light = operating_point(H100, M8.fit, _decode(8), 700)
    assert not light.capped and light.clock_mhz == H100.sm_clock_max_mhz
    # ... a big prefill reaches the 700 W limit (as on real H100s) and a lower cap binds harder
    free = operating_point(H100, M8.fit, _prefill(), 700)
    capped = operating_point(H100, M8.fit, _prefill(), 300)
    assert capped.capped and free.power_watts <= 700 + 1e-6
    assert capped.power_watts <= 300 + 1e-6
    assert capped.clock_mhz < free.clock_mhz


def test_cap_slows_prefill_a_lot_and_decode_little():
    d_free, d_cap = (operating_point(H100, M8.fit, _decode(8), w) for w in (700, 300))
    p_free, p_cap = (operating_point(H100, M8.fit, _prefill(), w) for w in (700, 300))
    decode_slowdown = d_cap.seconds / d_free.seconds
    prefill_slowdown = p_cap.seconds / p_free.seconds
    assert decode_slowdown < 1.15
    assert prefill_slowdown > 1.5
    assert prefill_slowdown > 2 * (decode_slowdown - 1) + 1


def test_idle_power_is_the_floor_of_busy_power_and_falls_with_a_clock_lock():
    clocks = np.linspace(H100.sm_clock_min_mhz, H100.sm_clock_max_mhz, 25)
    idle = [idle_power_watts(H100, model_loaded=True, max_clock_mhz=c) for c in clocks]
    # a lower clock lock lowers execution-idle power, strictly
    assert all(b > a for a, b in zip(idle, idle[1:]))
    # at every clock any iteration, however small, draws more than idling there, and idle stays far below the limit
    for c, p_idle in zip(clocks, idle):
        tiny = operating_point(H100, M8.fit, _decode(1, ctx=16), 700, c)
        assert not tiny.capped and tiny.power_watts > p_idle
    assert idle[-1] < 0.5 * H100.power_limit_default_watts


def test_70b_costs_more_per_token_than_8b_at_same_batch():
    m70 = model_profile("llama-3.1-70b@h100-sxm")
    w8 = _decode(64)
    w70 = iteration_work(m70, decode_tokens=64, decode_context_tokens=64 * 600)
    e8 = operating_point(H100, M8.fit, w8, 700).joules / 64
    e70 = operating_point(H100, m70.fit, w70, 700).joules * 4 / 64
    assert 4 < e70 / e8 < 15


def test_memory_bound_activity_is_a_profile_constant_that_moves_decode_power():
    """kappa is read from the GPU profile (so a GPU run can fit it), not from a module constant."""
    from dataclasses import replace

    from scheduler.sim.physics import cost_at

    model = model_profile("llama-3.1-8b@h100-sxm")
    low, high = replace(H100, memory_bound_sm_activity=0.1), replace(H100, memory_bound_sm_activity=0.6)
    t_over, t_mem, t_comp = 0.001, 0.005, 0.0005  # decode: mostly memory time
    _, j_low = cost_at(1.0, low, model.fit, t_over, t_mem, t_comp)
    _, j_high = cost_at(1.0, high, model.fit, t_over, t_mem, t_comp)
    assert j_high - j_low == pytest.approx(model.fit.dynamic_watts * 0.5 * t_mem, rel=1e-9)


def test_constant_overrides_apply_inside_the_block_only_and_reject_unknown_names():
    from scheduler.sim.profiles import ProfileError, gpu_constant_overrides

    with gpu_constant_overrides(voltage_floor_fraction=0.75, memory_clock_knee=0.1):
        p = gpu_profile("h100-sxm")
        assert (p.voltage_floor_fraction, p.memory_clock_knee) == (0.75, 0.1)
        assert p.constants_provenance.startswith("sensitivity override")
    p = gpu_profile("h100-sxm")
    assert (p.voltage_floor_fraction, p.memory_clock_knee, p.constants_provenance) == (0.6, 0.05, "assumed")
    with pytest.raises(ProfileError, match="not a GPU modelling constant"):
        with gpu_constant_overrides(idle_no_model_watts=1.0):
            pass

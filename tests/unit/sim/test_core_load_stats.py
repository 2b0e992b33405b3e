"""The simulated replica publishes the load figures placement needs: arrival rates, queued prefill tokens, decode slope."""

import math

import pytest

from scheduler.devices.simulated import SimulatedGpu
from scheduler.sim.core import ARRIVAL_RATE_WINDOW_SECONDS, BatchCore, RecentLatencies, SimRequest, replica_stats
from scheduler.sim.profiles import model_profile


def _core():
    g = SimulatedGpu("g0", "h100-sxm", clock=lambda: 0.0)
    return BatchCore(model_profile("llama-3.1-8b@h100-sxm"), [g])


def test_arrival_rate_is_exponentially_weighted_and_decays():
    core = _core()
    assert core.arrival_rates(0.0) == (0.0, 0.0)
    for i in range(10):
        core.submit(SimRequest(f"r{i}", 1000, 10, float(i)), float(i))
    rate, prompt_rate = core.arrival_rates(9.0)
    tau = ARRIVAL_RATE_WINDOW_SECONDS
    expected = sum(math.exp(-(9.0 - i) / tau) for i in range(10)) / tau
    assert rate == pytest.approx(expected) and prompt_rate == pytest.approx(1000 * expected)
    later, _ = core.arrival_rates(9.0 + tau)
    assert later == pytest.approx(expected / math.e)


def test_stats_publish_queue_and_decode_slope():
    core = _core()
    for i in range(3):
        core.submit(SimRequest(f"r{i}", 3000, 50, 0.0), 0.0)
    s = replica_stats(core, "m", "m#0", RecentLatencies(), now=0.0)
    # everything submitted is still to prefill (queued or in the first chunked iteration)
    assert s["queued_prefill_tokens"] == 9000
    assert s["arrival_rate_per_second"] > 0 and s["arrival_prompt_tokens_per_second"] == pytest.approx(3000 * s["arrival_rate_per_second"])
    assert s["decode_seconds_per_token_per_sequence"] > 0
    # without a time the rate is not published (unknown, not zero)
    assert "arrival_rate_per_second" not in replica_stats(core, "m", "m#0", RecentLatencies())

"""The prompt-heavy workload generator: its statistics match what it says it was fitted to, and it is deterministic."""

import numpy as np
import pytest

from scheduler.sim import workloads as w


@pytest.fixture(scope="module")
def hour():
    return w.prompt_heavy_trace(60.0, seed=0)


def test_lengths_match_the_coding_trace_statistics(hour):
    p, o = hour.prompt_tokens, hour.output_tokens
    assert np.median(p) == pytest.approx(w.CODE_PROMPT_MEDIAN_TOKENS, rel=0.08)
    assert p.mean() == pytest.approx(w.CODE_PROMPT_MEAN_TOKENS, rel=0.1)  # the 8K cap trims the tail a little
    assert np.median(o) == pytest.approx(w.CODE_OUTPUT_MEDIAN_TOKENS, abs=2)
    assert o.mean() == pytest.approx(w.CODE_OUTPUT_MEAN_TOKENS, rel=0.15)
    assert p.max() <= w.PROMPT_CAP_TOKENS and p.min() >= 1 and o.min() >= 1
    # prompt-heavy: prompts dwarf outputs
    assert np.median(p / o) > 50


def test_rate_and_burstiness(hour):
    a = hour.arrival_s
    assert np.all(np.diff(a) >= 0) and a[0] == 0.0
    rate = len(a) / 3600.0
    assert rate == pytest.approx(w.CODE_RATE_PER_SECOND, rel=0.15)
    # a long run settles at the mean rate
    long = w.mmpp_arrivals(np.random.default_rng(3), 20 * 3600.0, 2.0)
    assert len(long) / (20 * 3600.0) == pytest.approx(2.0, rel=0.05)
    # burstier than Poisson: requests per 10 s window vary more than their mean (index of dispersion > 1)
    counts = np.bincount((long // 10).astype(int))
    assert counts.var() / counts.mean() > 2.0
    poisson = np.sort(np.random.default_rng(4).uniform(0, 20 * 3600.0, len(long)))
    pc = np.bincount((poisson // 10).astype(int))
    assert pc.var() / pc.mean() == pytest.approx(1.0, abs=0.1)


def test_deterministic_per_seed_and_scaled_by_rate():
    a, b = w.prompt_heavy_trace(5.0, seed=7), w.prompt_heavy_trace(5.0, seed=7)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    c = w.prompt_heavy_trace(5.0, seed=8)
    assert not np.array_equal(a.prompt_tokens[:50], c.prompt_tokens[:50])
    slow = w.prompt_heavy_trace(30.0, seed=1, rate_scale=0.5)
    fast = w.prompt_heavy_trace(30.0, seed=1, rate_scale=2.0)
    assert len(fast) / len(slow) == pytest.approx(4.0, rel=0.3)
    assert "Azure LLM 2023 coding" in a.source


def test_bad_parameters():
    with pytest.raises(ValueError):
        w.prompt_heavy_trace(0.0)
    with pytest.raises(ValueError):
        w.lognormal_sigma(10.0, 5.0)

"""Synthetic request traces for the simulator: a prompt-heavy (code-completion-like) workload with bursty arrivals.

The packaged conversation trace (scheduler/data/azure-llm-2023-conv.csv.gz) is a recorded hour of
real traffic. Prompt-heavy traffic (code completion, retrieval-augmented answers: long prompts,
outputs of a few tokens) has no packaged trace, so prompt_heavy_trace() generates one, seeded and
deterministic, with these statistics:

- Prompt and output lengths: lognormal, fitted by median and mean to the Azure LLM inference trace
  2023, coding service (Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_code.csv; Patel et al.,
  "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024, which reports
  median prompt 1,500 and median output 13 tokens for coding). From the released CSV (8,819
  requests over about 57 minutes, 2.57 requests/s): prompt median 1,469 / mean 2,048 / p99 7,436,
  output median 13 / mean 28 / p99 249. A lognormal with sigma = sqrt(2 ln(mean / median)) matches
  median and mean; its p99 comes out at about 7,900 prompt tokens (clipped at PROMPT_CAP_TOKENS)
  and about 230 output tokens, close to the recorded p99s.
- Mean rate: 2.57 requests/s at rate_scale 1 (the coding trace's recorded rate).
- Burstiness: a two-state Markov-modulated Poisson process (calm / burst). These parameters are
  modelling assumptions, not fitted to the coding trace (its burst statistics were not available
  here): bursts at BURST_RATE_FACTOR x the calm rate, BURST_TIME_SHARE of the time, mean burst
  length BURST_MEAN_SECONDS; the mean rate is held at `rate`. Inter-arrival times then have a
  coefficient of variation of about 1.1-1.2 (Poisson: 1; the recorded conversation trace: 1.09), and
  request counts per 10 s vary several times more than a Poisson stream's (index of dispersion > 2).
"""

from __future__ import annotations

import math

import numpy as np

from scheduler.sim.trace import Trace

#: Azure LLM inference trace 2023, coding service (see the module docstring)
CODE_PROMPT_MEDIAN_TOKENS = 1469.0
CODE_PROMPT_MEAN_TOKENS = 2048.0
CODE_OUTPUT_MEDIAN_TOKENS = 13.0
CODE_OUTPUT_MEAN_TOKENS = 28.0
CODE_RATE_PER_SECOND = 2.57
#: the coding trace's context appears capped near 8K tokens (the served model's context)
PROMPT_CAP_TOKENS = 8192
OUTPUT_CAP_TOKENS = 1024
#: burst model (assumptions, see the module docstring)
BURST_RATE_FACTOR = 4.0
BURST_TIME_SHARE = 0.1
BURST_MEAN_SECONDS = 20.0

SOURCE = "synthetic prompt-heavy (lognormal lengths fitted to Azure LLM 2023 coding trace; bursty MMPP arrivals)"


def lognormal_sigma(median: float, mean: float) -> float:
    """sigma of the lognormal with this median and mean (mean = median x exp(sigma^2 / 2))."""
    if mean <= median or median <= 0:
        raise ValueError(f"a lognormal needs 0 < median < mean, got median {median}, mean {mean}")
    return math.sqrt(2.0 * math.log(mean / median))


def mmpp_arrivals(rng: np.random.Generator, duration_seconds: float, rate: float, *, burst_factor: float = BURST_RATE_FACTOR,
                  burst_share: float = BURST_TIME_SHARE, burst_mean_seconds: float = BURST_MEAN_SECONDS) -> np.ndarray:
    """Arrival times of a two-state MMPP over [0, duration) whose long-run mean rate is `rate`."""
    if rate <= 0 or duration_seconds <= 0:
        raise ValueError("rate and duration must be positive")
    if not 0.0 <= burst_share < 1.0 or burst_factor < 1.0:
        raise ValueError("burst_share must be in [0, 1) and burst_factor >= 1")
    calm_rate = rate / (1.0 - burst_share + burst_share * burst_factor)
    burst_rate = calm_rate * burst_factor
    calm_mean_seconds = burst_mean_seconds * (1.0 - burst_share) / burst_share if burst_share > 0 else math.inf
    times: list[np.ndarray] = []
    t, burst = 0.0, False
    while t < duration_seconds:
        mean_len = burst_mean_seconds if burst else calm_mean_seconds
        length = duration_seconds - t if math.isinf(mean_len) else rng.exponential(mean_len)
        end = min(t + length, duration_seconds)
        r = burst_rate if burst else calm_rate
        n = rng.poisson(r * (end - t))
        times.append(np.sort(rng.uniform(t, end, size=n)))
        t, burst = end, not burst
    out = np.concatenate(times) if times else np.zeros(0)
    return out - out[0] if len(out) else out


def prompt_heavy_trace(minutes: float = 60.0, *, rate_scale: float = 1.0, seed: int = 0,
                       rate_per_second: float = CODE_RATE_PER_SECOND) -> Trace:
    """A prompt-heavy trace of `minutes` at rate_per_second x rate_scale (see the module docstring); deterministic per seed."""
    if minutes <= 0 or rate_scale <= 0:
        raise ValueError("minutes and rate_scale must be positive")
    rng = np.random.default_rng([seed, 0xC0DE])
    arrivals = mmpp_arrivals(rng, minutes * 60.0, rate_per_second * rate_scale)
    n = len(arrivals)
    ps = lognormal_sigma(CODE_PROMPT_MEDIAN_TOKENS, CODE_PROMPT_MEAN_TOKENS)
    os_ = lognormal_sigma(CODE_OUTPUT_MEDIAN_TOKENS, CODE_OUTPUT_MEAN_TOKENS)
    prompts = np.clip(np.rint(rng.lognormal(math.log(CODE_PROMPT_MEDIAN_TOKENS), ps, n)), 1, PROMPT_CAP_TOKENS).astype(np.int64)
    outputs = np.clip(np.rint(rng.lognormal(math.log(CODE_OUTPUT_MEDIAN_TOKENS), os_, n)), 1, OUTPUT_CAP_TOKENS).astype(np.int64)
    return Trace(arrivals, prompts, outputs, None, f"{SOURCE}; seed {seed}, {rate_per_second * rate_scale:.3g} requests/s")

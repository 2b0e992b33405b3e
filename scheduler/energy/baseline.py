"""The savings baseline: what one request would have cost on the largest model that could serve it.

Wattlane saves energy by sending a request to the smallest adequate model. To say how much, every
ledger row carries, beside its joules, an estimate of what the same request would have cost in a
deployment without that choice: every request on the largest model. The definition
(docs/energy.md, "Savings"):

- **Baseline model**: the largest configured model (routing's size order: size_rank, then params_b)
  that serves the request's kind (chat models also serve completions) and whose context holds the
  request's prompt + completion tokens. The largest model is the routing's quality reference, so it
  is adequate by definition.
- **Baseline joules** = the request's own joules x E(baseline) / E(served), where
  E(m) = prompt_tokens x J per prefill token of m + completion_tokens x J per decode token of m.
  Scaling the request's own figure keeps its measurement boundary (scope, idle share, PUE-free
  joules) and its method's biases on both sides; only the ratio is estimated. The per-token figures
  of both models come from one source, named in `baseline_method`:
  - `largest-model/replica-stats`: the mean of what each model's live replicas publish
    (ReplicaStats joules_per_prefill_token, joules_per_decode_token: llama.cpp's moving average of
    its measured attributed joules, the simulator's GPU and model profile);
  - `largest-model/observed`: when either model publishes no figures, each model's joules per work
    token (prompt tokens x energy.prefill_token_weight + completion tokens) as this gateway has
    accounted them, a moving average over its recent requests (at least OBSERVED_MIN_REQUESTS each);
  - `largest-model/size-prior`: routing.placement.prior_joules_per_token(params_b), the power law
    through ML.ENERGY H100 measurements, when neither of the above covers both models. It is the
    roughest: it knows nothing of the hardware. On the simulated fleet it puts Llama-3.1-70B at 6.7x
    the 8B per token, where the replicas' figures gave 8.8x and a measured 70B request 8.9x the 8B one
    (docs/energy.md, Savings).
  - `largest-model/served`: the request ran on the baseline model: the baseline is its own joules.
  - `largest-model/cascade-repeat`: a cascade's second attempt; the baseline deployment would not
    have run the request again, so its baseline is 0 J and all of its joules count as a loss.
  - `largest-model/retried-attempt`: the work of an attempt that failed or timed out before the request was
    retried elsewhere (its "<id>-failed-attempt" row); the request's own row carries its baseline, so this
    one's is 0 J, as for a cascade's repeat.
- **Power**: both models' figures are those at the power settings in force, so the estimate credits
  the model choice only; what the power governor saves against default power limits is not counted
  (a conservative figure).

Every baseline is an estimate, whatever the method of the request's own joules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.config import ModelConfig
from scheduler.routing.placement import prior_joules_per_token
from scheduler.routing.select import serves_kind, size_order

METHOD_PREFIX = "largest-model"
REPLICA_STATS = f"{METHOD_PREFIX}/replica-stats"
OBSERVED = f"{METHOD_PREFIX}/observed"
SIZE_PRIOR = f"{METHOD_PREFIX}/size-prior"
#: requests of a model the observed average needs before it stands for that model
OBSERVED_MIN_REQUESTS = 3
#: weight of the newest request in the observed moving average (about the last 20 requests count)
OBSERVED_EWMA_WEIGHT = 0.05
SERVED = f"{METHOD_PREFIX}/served"
CASCADE_REPEAT = f"{METHOD_PREFIX}/cascade-repeat"
RETRIED_ATTEMPT = f"{METHOD_PREFIX}/retried-attempt"

#: live ReplicaStats per model id (the gateway's replicas_by_model), or None when not known yet
ReplicaSource = Callable[[], "Mapping[str, Sequence[Mapping[str, Any]]] | None"]


@dataclass(frozen=True)
class BaselineEstimate:
    model: str
    joules: float
    method: str


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f >= 0 else None


def _replica_figures(stats: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """Mean (prefill, decode) joules per token over a model's replicas that publish both."""
    pairs = [(p, d) for s in stats
             if (p := _finite(s.get("joules_per_prefill_token"))) is not None
             and (d := _finite(s.get("joules_per_decode_token"))) is not None]
    if not pairs:
        return None
    return sum(p for p, _ in pairs) / len(pairs), sum(d for _, d in pairs) / len(pairs)


class SavingsBaseline:
    """Estimates each request's baseline joules from the configured models and their live figures."""

    def __init__(self, models: Sequence[ModelConfig], replicas: ReplicaSource | None = None, *,
                 prefill_token_weight: float = 0.25):
        #: largest first, so the first that fits is the baseline model
        self._largest_first = list(reversed(size_order(models)))
        self._by_id = {m.id: m for m in models}
        self._replicas = replicas
        self.prefill_token_weight = prefill_token_weight
        #: model id -> (moving average of joules per work token, requests seen)
        self._observed: dict[str, tuple[float, int]] = {}

    def observe(self, model: str, prompt_tokens: int, completion_tokens: int, joules: float | None) -> None:
        """Fold one accounted request into its model's observed joules per work token."""
        work = prompt_tokens * self.prefill_token_weight + completion_tokens
        if joules is None or not math.isfinite(joules) or joules <= 0 or work <= 0:
            return
        sample = joules / work
        mean, n = self._observed.get(model, (sample, 0))
        # a plain mean until the average has enough requests, then an exponential moving average
        w = max(1.0 / (n + 1), OBSERVED_EWMA_WEIGHT)
        self._observed[model] = (mean + w * (sample - mean), n + 1)

    def _observed_figures(self, model_id: str) -> tuple[float, float] | None:
        mean, n = self._observed.get(model_id, (0.0, 0))
        if n < OBSERVED_MIN_REQUESTS:
            return None
        return mean * self.prefill_token_weight, mean

    def baseline_model(self, request_kind: str, total_tokens: int) -> ModelConfig | None:
        for m in self._largest_first:
            if serves_kind(m.kind, request_kind) and total_tokens <= m.context_length:
                return m
        return None

    def estimate(self, *, served_model: str, request_kind: str, prompt_tokens: int, completion_tokens: int,
                 joules: float | None, cascade_repeat: bool = False,
                 retried_attempt: bool = False) -> BaselineEstimate | None:
        """The request's baseline, or None when it has no joules or no model could have served it.

        cascade_repeat and retried_attempt: extra work for a request whose own row carries its baseline."""
        if joules is None or not math.isfinite(joules):
            return None
        base = self.baseline_model(request_kind, prompt_tokens + completion_tokens)
        if base is None:
            return None
        if cascade_repeat:
            return BaselineEstimate(base.id, 0.0, CASCADE_REPEAT)
        if retried_attempt:
            return BaselineEstimate(base.id, 0.0, RETRIED_ATTEMPT)
        if base.id == served_model:
            return BaselineEstimate(base.id, joules, SERVED)
        served = self._by_id.get(served_model)
        if served is None:
            return None
        figures = self._figures(served, base)
        if figures is None:
            return None
        (sp, sd), (bp, bd), method = figures
        served_e = prompt_tokens * sp + completion_tokens * sd
        base_e = prompt_tokens * bp + completion_tokens * bd
        if served_e <= 0:
            return None
        return BaselineEstimate(base.id, joules * base_e / served_e, method)

    def _figures(self, served: ModelConfig, base: ModelConfig
                 ) -> tuple[tuple[float, float], tuple[float, float], str] | None:
        live = self._replicas() if self._replicas is not None else None
        if live is not None:
            s, b = _replica_figures(live.get(served.id, ())), _replica_figures(live.get(base.id, ()))
            if s is not None and b is not None:
                return s, b, REPLICA_STATS
        s, b = self._observed_figures(served.id), self._observed_figures(base.id)
        if s is not None and b is not None:
            return s, b, OBSERVED
        return prior_joules_per_token(served.params_b), prior_joules_per_token(base.params_b), SIZE_PRIOR

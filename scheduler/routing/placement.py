"""Placement: pick the replica of one model where this request costs the least energy within its SLO.

Pure and fast (no I/O, no locks): the gateway, the Ray Serve request router and the fleet simulator
all call place() / rank_replicas() with the ReplicaStats each replica publishes.

Prediction for one more request on a replica, from its live stats. Latency is predicted at the
batch the request will actually see, not at the batch of this instant:
- TTFT = (prefill tokens already queued + this prompt) / prefill_tokens_per_second; when the queue
  is not published in tokens, each waiting request is assumed to be as long as this one.
- TPOT = the decode step at the request's mean batch, stretched by the prefills that interleave
  with its decode: step / (1 - prefill share). The mean batch is running + waiting + this one +
  half the requests expected to arrive during its decode (arrival_rate_per_second x its decode
  time; departures are ignored, which errs on the slow side); the step grows with the batch by
  decode_seconds_per_token_per_sequence. The prefill share is arrival_prompt_tokens_per_second /
  prefill_tokens_per_second; a replica that publishes no arrival rate has its queued prompts stand
  in for it (their prefill time against this request's decode time). Prompts queued ahead of this
  one prefill before its first token (FIFO), so with a published rate they count in TTFT only.
- Feasible when predicted x (1 + slo_margin) is within the SLO, for TTFT and TPOT alike: the
  margin covers bursts the averages above smooth over (DEFAULT_SLO_MARGIN, chosen on the
  simulated fleet, docs/results/routing-fleet.md; RoutingConfig.placement_slo_margin sets it).
- energy = prompt x joules_per_prefill_token + output x joules_per_decode_token (the dynamic,
  above-idle figures at the batch the request would join) + an idle share: idle_power_watts x the
  request's predicted latency / (running + 1), the part of the idle draw it would be charged.
Missing figures are unknown, not zero: a replica with an unknown TTFT or TPOT is treated as
meeting that SLO, but ranks after replicas whose figures are known at equal energy. Among feasible
replicas the lowest predicted energy wins (then TTFT, then index: deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from scheduler.engines.base import ReplicaStats

#: GPU energy per output token against parameters (billions), a power-law through ML.ENERGY v3
#: H100 measurements at max_num_seqs 64: Llama-3.1-8B 0.1186 J, Llama-3.1-70B (4 GPUs) 0.797 J.
#: Used only when a model has no live replica figures; labelled "prior" in decisions.
_PRIOR_J_PER_TOKEN_AT_1B = 0.1186 / 8**0.878
_PRIOR_EXPONENT = 0.878
#: prefill is compute-bound and batched: roughly a tenth of a decode token's energy per token
_PRIOR_PREFILL_FRACTION = 0.1
#: default safety margin on predicted TTFT and TPOT (feasible when predicted x (1 + margin) <= SLO)
DEFAULT_SLO_MARGIN = 0.5
#: a replica whose prefill share of time reaches this is saturated: its decodes would barely advance
_MAX_PREFILL_SHARE = 0.95


@dataclass(frozen=True)
class PlacementRequest:
    """What placement needs to know about a request (the simulator builds these directly)."""

    prompt_tokens: int
    output_tokens: int
    ttft_slo_seconds: float | None = None
    tpot_slo_seconds: float | None = None
    #: feasible when predicted latency x (1 + slo_margin) is within the SLO
    slo_margin: float = DEFAULT_SLO_MARGIN


@dataclass
class ReplicaPrediction:
    index: int
    energy_joules: float | None
    ttft_seconds: float | None
    tpot_seconds: float | None
    feasible: bool
    reason: str
    #: "replica-stats" when the energy came from the replica's figures, else "prior"/"unknown"
    energy_source: str
    #: the part of the TTFT spent waiting for prompts queued ahead (None: unknown); admission uses it
    queue_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "energy_joules": self.energy_joules,
            "ttft_seconds": self.ttft_seconds,
            "tpot_seconds": self.tpot_seconds,
            "feasible": self.feasible,
            "reason": self.reason,
            "energy_source": self.energy_source,
            "queue_seconds": self.queue_seconds,
        }


def prior_joules_per_token(params_b: float) -> tuple[float, float]:
    """(prefill, decode) joules per token of a model of this size with no live figures (H100 prior)."""
    decode = _PRIOR_J_PER_TOKEN_AT_1B * max(params_b, 1e-3) ** _PRIOR_EXPONENT
    return decode * _PRIOR_PREFILL_FRACTION, decode


def _as_request(request: PlacementRequest | Mapping[str, Any] | Any) -> PlacementRequest:
    if isinstance(request, PlacementRequest):
        return request
    hint = getattr(request, "prompt_tokens_hint", None)
    params = getattr(request, "params", None)
    if hint is not None and params is not None:
        # an engine GenerationRequest (the simulator's placement hook): token counts, no SLO of its own
        out = params.force_output_tokens or params.max_tokens or 0
        return PlacementRequest(prompt_tokens=int(hint), output_tokens=int(out))
    get = request.get if isinstance(request, Mapping) else (lambda k, d=None: getattr(request, k, d))
    margin = get("slo_margin", None)
    return PlacementRequest(
        prompt_tokens=int(get("prompt_tokens", 0) or 0),
        output_tokens=int(get("output_tokens", None) or get("max_tokens", 0) or 0),
        ttft_slo_seconds=get("ttft_slo_seconds", None),
        tpot_slo_seconds=get("tpot_slo_seconds", None),
        slo_margin=DEFAULT_SLO_MARGIN if margin is None else float(margin),
    )


def _num(stats: Mapping[str, Any], key: str) -> float | None:
    v = stats.get(key)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def predict(
    request: PlacementRequest, stats: ReplicaStats | Mapping[str, Any], index: int = 0, *, prior_params_b: float | None = None
) -> ReplicaPrediction:
    """Predicted energy, TTFT and TPOT of this request on one replica, and whether it meets the SLO."""
    p_tokens, o_tokens = max(request.prompt_tokens, 0), max(request.output_tokens, 0)
    running = _num(stats, "running") or 0.0
    waiting = _num(stats, "waiting") or 0.0

    prefill_tps = _num(stats, "prefill_tokens_per_second")
    ttft = queue_s = None
    queued = 0.0
    if prefill_tps and prefill_tps > 0:
        q = _num(stats, "queued_prefill_tokens")
        queued = waiting * p_tokens if q is None else max(q, 0.0)
        ttft = (queued + p_tokens) / prefill_tps
        queue_s = queued / prefill_tps
    step_now = _num(stats, "decode_seconds_per_token")  # the step at running + 1
    tpot = None
    prefill_share = 0.0
    if step_now is not None:
        slope = max(_num(stats, "decode_seconds_per_token_per_sequence") or 0.0, 0.0)
        decode_steps = max(o_tokens - 1, 1)
        if prefill_tps and prefill_tps > 0:
            prompt_rate = _num(stats, "arrival_prompt_tokens_per_second")
            if prompt_rate is not None:
                prefill_share = max(prompt_rate, 0.0) / prefill_tps
            elif queued > 0:
                # no published rate: the queue is the visible prefill load, spread over this request's decode
                queued_s = queued / prefill_tps
                prefill_share = queued_s / (queued_s + decode_steps * step_now)
        prefill_share = min(prefill_share, _MAX_PREFILL_SHARE)
        stretch = 1.0 / (1.0 - prefill_share)
        extra_batch = waiting  # the queue joins the batch before or with this request
        rate = _num(stats, "arrival_rate_per_second")
        if rate:
            decode_s = decode_steps * (step_now + slope * extra_batch) * stretch
            extra_batch += 0.5 * max(rate, 0.0) * decode_s
        tpot = (step_now + slope * extra_batch) * stretch

    jp, jd = _num(stats, "joules_per_prefill_token"), _num(stats, "joules_per_decode_token")
    source = "replica-stats"
    if jd is None:
        power, idle = _num(stats, "power_watts"), _num(stats, "idle_power_watts") or 0.0
        if power is not None and step_now is not None:
            # the batch's dynamic power shared by the running requests, one token each per step
            jd = max(power - idle, 0.0) * step_now / (running + 1.0)
        elif prior_params_b is not None:
            jp_prior, jd = prior_joules_per_token(prior_params_b)
            jp = jp if jp is not None else jp_prior
            source = "prior"
    if jp is None and jd is not None:
        jp = jd * _PRIOR_PREFILL_FRACTION
    energy = None
    if jd is not None:
        energy = p_tokens * (jp or 0.0) + o_tokens * jd
        idle_w = _num(stats, "idle_power_watts")
        if idle_w and ttft is not None and tpot is not None:
            latency = ttft + tpot * max(o_tokens - 1, 0)
            energy += idle_w * latency / (running + 1.0)
    else:
        source = "unknown"

    reasons = []
    feasible = True
    if stats.get("ejected"):
        feasible = False
        reasons.append("endpoint ejected after failures (re-admitted when its health check passes)")
    kv_free = _num(stats, "kv_cache_free_fraction")
    if kv_free is not None and kv_free <= 0.0:
        feasible = False
        reasons.append("KV cache full")
    headroom = 1.0 + max(request.slo_margin, 0.0)
    margin_note = f" with {request.slo_margin:.0%} margin" if request.slo_margin > 0 else ""
    if request.ttft_slo_seconds is not None and ttft is not None and ttft * headroom > request.ttft_slo_seconds:
        feasible = False
        reasons.append(f"predicted TTFT {ttft * 1000:.0f} ms > SLO {request.ttft_slo_seconds * 1000:.0f} ms{margin_note}")
    if request.tpot_slo_seconds is not None and tpot is not None and tpot * headroom > request.tpot_slo_seconds:
        feasible = False
        share = f", prefill share {prefill_share:.0%}" if prefill_share > 0 else ""
        reasons.append(f"predicted TPOT {tpot * 1000:.1f} ms{share} > SLO {request.tpot_slo_seconds * 1000:.1f} ms{margin_note}")
    if feasible:
        reasons.append("meets SLO" + ("" if ttft is not None and tpot is not None else " (latency partly unknown)"))
    return ReplicaPrediction(index, energy, ttft, tpot, feasible, "; ".join(reasons), source, queue_s)


def _sort_key(p: ReplicaPrediction) -> tuple:
    unknown_latency = p.ttft_seconds is None or p.tpot_seconds is None
    return (
        p.energy_joules if p.energy_joules is not None else math.inf,
        unknown_latency,
        p.ttft_seconds if p.ttft_seconds is not None else math.inf,
        p.index,
    )


def rank_replicas(
    request: PlacementRequest | Mapping[str, Any], replicas: Sequence[ReplicaStats | Mapping[str, Any]], *, prior_params_b: float | None = None
) -> list[ReplicaPrediction]:
    """Every replica's prediction: feasible ones first by energy (then TTFT), then infeasible by TTFT."""
    req = _as_request(request)
    preds = [predict(req, s, i, prior_params_b=prior_params_b) for i, s in enumerate(replicas)]
    feasible = sorted((p for p in preds if p.feasible), key=_sort_key)
    infeasible = sorted(
        (p for p in preds if not p.feasible),
        key=lambda p: (p.ttft_seconds if p.ttft_seconds is not None else math.inf, p.index),
    )
    return feasible + infeasible


def place(request: PlacementRequest | Mapping[str, Any], replicas: Sequence[ReplicaStats | Mapping[str, Any]]) -> int | None:
    """Index of the lowest-energy replica that meets the request's SLO, or None (spill to the next model)."""
    req = _as_request(request)
    best: ReplicaPrediction | None = None
    for i, s in enumerate(replicas):
        p = predict(req, s, i)
        if p.feasible and (best is None or _sort_key(p) < _sort_key(best)):
            best = p
    return None if best is None else best.index

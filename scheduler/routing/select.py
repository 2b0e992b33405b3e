"""Model selection: hard constraints, then predicted adequacy >= the quality target, smallest first,
then placement among that model's replicas (spilling to the next model when no replica meets the SLO).

route() returns a RouteDecision that lists every configured model with why it was kept or dropped,
its predicted quality, energy and latency; it is the body of POST /v1/route/explain and the source
of the response's routing.reason. It never runs a model and does no I/O.

Predicted quality of N models (documented in docs/routing.md). The predictor gives a = P(the
smallest model is adequate), trained as "would the small model match the large one". Models of
the request's kind are ordered by size (size_rank, then params_b); the largest has quality 1 (the
reference). Model i gets q_i = 1 - (1 - a) * d_i, where d_i is its distance from the top: with a
quality prior on every model, d_i = (Q_max - Q_i) / (Q_max - Q_min); otherwise by rank,
d_i = 1 - i / (N - 1). So with two models, q_small = a and q_large = 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from scheduler.config import ModelConfig
from scheduler.engines.base import ENGINE_JSON_MODE, ReplicaStats
from scheduler.routing.adequacy import AdequacyPredictor
from scheduler.routing.controls import RequestControls
from scheduler.routing.placement import PlacementRequest, ReplicaPrediction, prior_joules_per_token, rank_replicas
from scheduler.routing.quality_budget import QualityBudget

#: characters per token when a prompt's token count is not given (English text, BPE tokenizers)
CHARS_PER_TOKEN = 4.0
#: chat templates add role markers around every message
CHAT_TOKENS_PER_MESSAGE = 4


@dataclass
class RouteRequest:
    """The routing-relevant part of one inference request."""

    kind: str  # "chat" | "completion"
    model: str = "auto"
    #: text the adequacy predictor reads (the last user message for chat; see prompt_text_from_messages)
    prompt_text: str | None = None
    #: total prompt tokens if known; else estimated from all_text_chars
    prompt_tokens: int | None = None
    #: characters of the whole prompt (all messages), for the token estimate
    all_text_chars: int | None = None
    num_messages: int = 1
    max_tokens: int = 256
    #: expected output tokens for energy (default: max_tokens, an upper bound that suits budgets)
    output_tokens_estimate: int | None = None
    #: response_format asks for JSON: only a model that supports_json may take it
    needs_json: bool = False

    def estimated_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return int(self.prompt_tokens)
        chars = self.all_text_chars if self.all_text_chars is not None else len(self.prompt_text or "")
        extra = CHAT_TOKENS_PER_MESSAGE * self.num_messages if self.kind == "chat" else 0
        return int(math.ceil(chars / CHARS_PER_TOKEN)) + extra


@dataclass
class RouteRejection:
    """Why nothing can serve the request; the gateway maps status to the OpenAI error envelope."""

    status: int  # 400 bad request / over budget, 404 unknown model, 503 no capacity
    code: str  # "model_not_found" | "context_length_exceeded" | "unsupported_capability" | "energy_budget_exceeded" | "no_capacity"
    message: str
    param: str | None = None


@dataclass
class CandidateDecision:
    model_id: str
    size_position: int
    kept: bool
    reason: str
    predicted_quality: float | None = None
    predicted_energy_joules: float | None = None
    predicted_ttft_seconds: float | None = None
    predicted_tpot_seconds: float | None = None
    #: time the request would wait behind prompts queued on the chosen replica (placement's queue term)
    predicted_queue_seconds: float | None = None
    energy_source: str | None = None
    replica_index: int | None = None
    replica_id: str | None = None
    device: str | None = None
    node: str | None = None
    slo_met: bool | None = None
    replicas: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class RouteDecision:
    model_id: str | None
    replica_index: int | None
    reason: str
    candidates: list[CandidateDecision]
    #: P(smallest model adequate) from the predictor; None when it did not run
    adequacy: float | None
    quality_target: float
    prompt_tokens: int
    output_tokens: int
    slo_met: bool | None = None
    #: other kept (model_id, replica_index) in preference order: retry once on the next when a replica fails
    fallbacks: list[tuple[str, int | None]] = field(default_factory=list)
    error: RouteRejection | None = None
    decision_seconds: float = 0.0
    #: the quality budget's threshold applied (not a wall); the decision is in its window unless a dry run
    budgeted: bool = False

    @property
    def chosen(self) -> CandidateDecision | None:
        return next((c for c in self.candidates if c.model_id == self.model_id), None)

    @property
    def next_model(self) -> str | None:
        """The next larger kept model (the cascade's escalation target)."""
        return self.fallbacks[0][0] if self.fallbacks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "replica_index": self.replica_index,
            "reason": self.reason,
            "adequacy": self.adequacy,
            "quality_target": self.quality_target,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "slo_met": self.slo_met,
            "fallbacks": [{"model": m, "replica_index": r} for m, r in self.fallbacks],
            "error": None if self.error is None else dict(self.error.__dict__),
            "decision_seconds": self.decision_seconds,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def prompt_text_from_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str, int]:
    """(text for the predictor = the last user message, characters of all messages)."""
    def text_of(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # OpenAI content parts
            return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
        return ""
    total = sum(len(text_of(m.get("content"))) for m in messages)
    last_user = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return last_user, total


def serves_kind(model_kind: str, request_kind: str) -> bool:
    """A chat model also continues raw text (/v1/completions); a base model has no chat template."""
    return model_kind == request_kind or (model_kind == "chat" and request_kind == "completion")


def size_order(models: Sequence[ModelConfig]) -> list[ModelConfig]:
    return sorted(models, key=lambda m: (m.size_rank if m.size_rank is not None else 10**6, m.params_b, m.id))


def predicted_qualities(models: Sequence[ModelConfig], adequacy: float | None) -> list[float]:
    """q_i for models already in size order (see the module docstring); adequacy None -> 0.5."""
    a = 0.5 if adequacy is None else min(max(adequacy, 0.0), 1.0)
    n = len(models)
    if n <= 1:
        return [1.0] * n
    priors = [m.quality for m in models]
    if all(q is not None for q in priors) and max(priors) > min(priors):  # type: ignore[type-var]
        q_max, q_min = max(priors), min(priors)  # type: ignore[type-var]
        dist = [(q_max - q) / (q_max - q_min) for q in priors]  # type: ignore[operator]
    else:
        dist = [1.0 - i / (n - 1) for i in range(n)]
    return [1.0 - (1.0 - a) * d for d in dist]


def route(
    models: Sequence[ModelConfig],
    request: RouteRequest,
    controls: RequestControls,
    predictor: AdequacyPredictor | None,
    replicas_by_model: Mapping[str, Sequence[ReplicaStats | Mapping[str, Any]]] | None = None,
    quality_budget: QualityBudget | None = None,
    record_decision: bool = True,
) -> RouteDecision:
    """Choose a model and replica for the request (see the module docstring for the rules).

    replicas_by_model: live stats per model id; None means "explain without live figures" (energy
    from the size prior, no replica chosen). A model present with an empty list has no replica.
    quality_budget: hold min_quality as a window average instead of a per-request wall
    (scheduler.routing.quality_budget); None, the default, keeps the wall. With a budget, the
    threshold a model's predicted quality must reach moves with the window, and when no adequate
    model meets the SLO a smaller model that does may take the request (shedding) if its predicted
    quality reaches the budget's shed threshold. The decision is recorded in the budget.
    """
    started = time.perf_counter()
    prompt_tokens = request.estimated_prompt_tokens()
    output_tokens = request.output_tokens_estimate if request.output_tokens_estimate is not None else request.max_tokens
    target = controls.min_quality
    auto = request.model == "auto"

    def done(decision: RouteDecision) -> RouteDecision:
        decision.decision_seconds = time.perf_counter() - started
        return decision

    ordered = size_order(models)
    if not auto and all(m.id != request.model for m in ordered):
        known = ", ".join(m.id for m in ordered)
        return done(RouteDecision(None, None, "unknown model", [], None, target, prompt_tokens, output_tokens,
                                  error=RouteRejection(404, "model_not_found", f"The model '{request.model}' does not exist; use 'auto' or one of: {known}", "model")))

    same_kind = [m for m in ordered if serves_kind(m.kind, request.kind)]
    adequacy = None
    if auto and predictor is not None and len(same_kind) > 1 and request.prompt_text is not None:
        adequacy = predictor.adequacy(request.prompt_text)
    qualities = dict(zip((m.id for m in same_kind), predicted_qualities(same_kind, adequacy)))

    candidates: list[CandidateDecision] = []
    passing: list[CandidateDecision] = []  # passed constraints and quality, in size order
    constraint_codes: list[tuple[str, str]] = []
    for pos, m in enumerate(ordered):
        c = CandidateDecision(m.id, pos, False, "", predicted_quality=qualities.get(m.id))
        candidates.append(c)
        if not auto and m.id != request.model:
            c.reason = f"not requested (model '{request.model}')"
            continue
        if not serves_kind(m.kind, request.kind):
            endpoint = "/v1/completions" if m.kind == "completion" else "/v1/chat/completions"
            c.reason = f"'{m.id}' is a {m.kind} model and cannot serve a {request.kind} request (use {endpoint})"
            constraint_codes.append(("unsupported_capability", c.reason))
            continue
        if prompt_tokens + request.max_tokens > m.context_length:
            c.reason = f"context {m.context_length} < {prompt_tokens} prompt + {request.max_tokens} max_tokens"
            constraint_codes.append(("context_length_exceeded", c.reason))
            continue
        if request.needs_json and not m.supports_json:
            c.reason = (f"'{m.id}' has no JSON mode for response_format (its engine '{m.engine}' "
                        + ("cannot constrain its output)" if m.engine not in ENGINE_JSON_MODE else
                           "does, where its config sets supports_json: true)"))
            constraint_codes.append(("unsupported_capability", c.reason))
            continue
        c.kept = True
        c.reason = "passes hard constraints"
        passing.append(c)

    if not passing:
        code, why = constraint_codes[0] if constraint_codes else ("unsupported_capability", "no model")
        return done(RouteDecision(None, None, f"no model fits: {why}", candidates, adequacy, target, prompt_tokens, output_tokens,
                                  error=RouteRejection(400, code, f"No configured model can serve this request: {why}.",
                                                       "max_tokens" if code == "context_length_exceeded" else "model")))

    # quality: keep models whose predicted quality reaches the target; if none does, keep the best one
    budgeted = auto and quality_budget is not None and adequacy is not None
    weight = None
    if budgeted and quality_budget.weighted:  # type: ignore[union-attr]
        weight = _joules_saved(same_kind, prompt_tokens, output_tokens, quality_budget.prompt_token_weight)  # type: ignore[union-attr]
    wall = quality_budget.threshold(weight) if budgeted else target  # type: ignore[union-attr]
    what = (f"budget threshold {wall:.2f} (window mean target {quality_budget.target:.2f}"  # type: ignore[union-attr]
            + (f", by gain per joule: {weight:.0f} J saved on the smallest model)" if weight is not None else ")")
            if budgeted else f"target {target:.2f}")
    if auto:
        adequate = [c for c in passing if (c.predicted_quality or 0.0) >= wall - 1e-12]
        below_note = ""
        if not adequate:
            best = max(passing, key=lambda c: (c.predicted_quality or 0.0, c.size_position))
            adequate = [best]
            below_note = f" (no model reaches {what}; using the highest predicted quality)"
        for c in passing:
            if c not in adequate:
                c.kept = False
                c.reason = f"predicted quality {c.predicted_quality:.2f} < {what}"
            else:
                c.reason = f"predicted quality {c.predicted_quality:.2f} >= {what}" + below_note
    else:
        adequate = passing
        passing[0].reason = "requested explicitly"

    req = PlacementRequest(prompt_tokens, output_tokens, controls.ttft_slo_seconds, controls.tpot_slo_seconds,
                           controls.placement_slo_margin)
    by_id = {m.id: m for m in ordered}
    placed: list[tuple[CandidateDecision, ReplicaPrediction | None, bool]] = []  # (candidate, best replica, slo met)
    for c in adequate:
        m = by_id[c.model_id]
        if replicas_by_model is None:
            jp, jd = prior_joules_per_token(m.params_b)
            c.predicted_energy_joules = prompt_tokens * jp + output_tokens * jd
            c.energy_source = "prior"
            placed.append((c, None, True))
            continue
        stats = list(replicas_by_model.get(m.id, ()))
        if not stats:
            c.kept = False
            c.reason += "; no running replica"
            continue
        ranked = rank_replicas(req, stats, prior_params_b=m.params_b)
        best = _take_best_replica(c, ranked, stats)
        if not best.feasible:
            c.reason += f"; no replica meets the SLO ({best.reason})"
        placed.append((c, best, best.feasible))

    if not placed:
        return done(RouteDecision(None, None, "no running replica for any adequate model", candidates, adequacy, target,
                                  prompt_tokens, output_tokens,
                                  error=RouteRejection(503, "no_capacity", "No replica is running for the models that could serve this request.")))

    budget = controls.max_energy_joules
    if budget is not None:
        within = []
        for c, best, ok in placed:
            e = c.predicted_energy_joules
            if e is not None and e > budget:
                c.kept = False
                c.reason += f"; predicted {e:.1f} J > max_energy_joules {budget:g}"
            else:
                within.append((c, best, ok))
        if not within:
            cheapest = min(placed, key=lambda t: t[0].predicted_energy_joules or math.inf)[0]
            msg = (f"max_energy_joules={budget:g} is below the predicted energy of every adequate model; the cheapest is "
                   f"'{cheapest.model_id}' at about {cheapest.predicted_energy_joules:.1f} J for {prompt_tokens} prompt + "
                   f"{output_tokens} output tokens. Raise max_energy_joules, lower max_tokens or lower min_quality.")
            return done(RouteDecision(None, None, "energy budget too low", candidates, adequacy, target, prompt_tokens,
                                      output_tokens, error=RouteRejection(400, "energy_budget_exceeded", msg, "max_energy_joules")))
        placed = within

    meeting = [t for t in placed if t[2]]
    shed = None
    if budgeted and not meeting and replicas_by_model is not None:
        shed = _shed(ordered, passing, adequate, qualities, quality_budget, req, replicas_by_model, weight)  # type: ignore[arg-type]
        if shed is not None:
            placed.append(shed)
            meeting = [shed]
    if shed is not None:
        chosen, best, _ = shed
        slo_met = True
        how = (f"quality budget: no adequate model meets the SLO, shed to '{chosen.model_id}' "
               f"(predicted quality {chosen.predicted_quality:.2f} >= shed threshold {quality_budget.shed_threshold(weight):.2f})")  # type: ignore[union-attr]
        if record_decision:
            quality_budget.shed += 1  # type: ignore[union-attr]
    elif meeting and controls.model_choice == "lowest-energy" and len(meeting) > 1:
        # marginal energy: an already-busy larger replica can cost less per request than waking an idle GPU;
        # unknown energy ranks last, ties go to the smaller model (meeting is in size order, min is stable)
        chosen, best, _ = min(meeting, key=lambda t: t[0].predicted_energy_joules if t[0].predicted_energy_joules is not None else math.inf)
        slo_met = True
        how = "lowest predicted energy among adequate models meeting the SLO"
        meeting = [t for t in meeting if t[0] is chosen] + [t for t in meeting if t[0] is not chosen]
    elif meeting:
        chosen, best, _ = meeting[0]
        slo_met = True
        spilled = [c.model_id for c, _, ok in placed if not ok and c.size_position < chosen.size_position]
        how = f"smallest adequate model{'' if not spilled else ' after spilling from ' + ', '.join(spilled) + ' (SLO)'}"
    else:
        # nothing meets the SLO: best effort on the replica with the lowest predicted TTFT
        chosen, best, _ = min(placed, key=lambda t: (t[1].ttft_seconds if t[1] and t[1].ttft_seconds is not None else math.inf,
                                                     t[0].size_position))
        slo_met = False
        how = "no replica meets the SLO; best effort on the lowest predicted TTFT"
    chosen.reason += "; chosen"
    for c, _, _ in placed:
        if c is not chosen and c.kept:
            c.reason += "; fallback"
    fallbacks = [(c.model_id, c.replica_index) for c, _, _ in (meeting if slo_met else placed) if c is not chosen]

    if budgeted and record_decision:
        quality_budget.record(adequacy, chosen.predicted_quality, weight)  # type: ignore[union-attr]
    parts = []
    if auto and adequacy is not None:
        parts.append(f"P(small model adequate)={adequacy:.2f}, {what}")
    parts.append(how)
    if chosen.predicted_energy_joules is not None:
        parts.append(f"predicted {chosen.predicted_energy_joules:.1f} J ({chosen.energy_source})")
    if best is not None and best.ttft_seconds is not None:
        parts.append(f"TTFT {best.ttft_seconds * 1000:.0f} ms")
    if chosen.replica_id:
        parts.append(f"replica {chosen.replica_id}")
    # the threshold applied: min_quality, or the quality budget's threshold of the moment
    return done(RouteDecision(chosen.model_id, chosen.replica_index, "; ".join(parts), candidates, adequacy, wall,
                              prompt_tokens, output_tokens, slo_met=slo_met, fallbacks=fallbacks, budgeted=budgeted))


def _joules_saved(same_kind: Sequence[ModelConfig], prompt_tokens: int, output_tokens: int,
                  prompt_token_weight: float | None = None) -> float:
    """The quality budget's weight under rank gain-per-joule: the size prior's joules for this request on the
    largest model of its kind less those on the smallest (a prompt token at prompt_token_weight x an output
    token's when given). The prior, not placement's live prediction: a busy replica's marginal joules are
    small, so live weights make a loaded large model look cheap, draw more requests to it and feed back (on
    the simulated fleet that sent 99% of the traffic to the 70B model)."""
    per_token = []
    for m in (same_kind[0], same_kind[-1]):
        jp, jd = prior_joules_per_token(m.params_b)
        per_token.append((jd * prompt_token_weight if prompt_token_weight is not None else jp, jd))
    (jp_small, jd_small), (jp_large, jd_large) = per_token
    return max(0.0, prompt_tokens * (jp_large - jp_small) + output_tokens * (jd_large - jd_small))


def _take_best_replica(c: CandidateDecision, ranked: list[ReplicaPrediction],
                       stats: Sequence[Mapping[str, Any]]) -> ReplicaPrediction:
    """Fill a candidate's placement fields from its best-ranked replica (ranked[0]) and return that replica."""
    best = ranked[0]
    c.replicas = [p.to_dict() for p in ranked]
    c.predicted_energy_joules, c.energy_source = best.energy_joules, best.energy_source
    c.predicted_ttft_seconds, c.predicted_tpot_seconds = best.ttft_seconds, best.tpot_seconds
    c.predicted_queue_seconds = best.queue_seconds
    c.replica_index = best.index
    s = stats[best.index]
    c.replica_id = s.get("replica_id")
    ids = s.get("device_ids") or []
    c.device, c.node = (",".join(ids) if ids else None), s.get("node")
    c.slo_met = best.feasible
    return best


def _shed(ordered: Sequence[ModelConfig], passing: list[CandidateDecision], adequate: list[CandidateDecision],
          qualities: Mapping[str, float], budget: QualityBudget, req: PlacementRequest,
          replicas_by_model: Mapping[str, Sequence[ReplicaStats | Mapping[str, Any]]], weight: float | None = None,
          ) -> tuple[CandidateDecision, ReplicaPrediction, bool] | None:
    """Overload under a quality budget: the highest-quality model below the threshold whose best replica meets the SLO."""
    floor = budget.shed_threshold(weight)
    by_id = {m.id: m for m in ordered}
    below = sorted((c for c in passing if c not in adequate and qualities.get(c.model_id, 0.0) >= floor - 1e-12),
                   key=lambda c: (-(c.predicted_quality or 0.0), c.size_position))
    for c in below:
        stats = list(replicas_by_model.get(c.model_id, ()))
        if not stats:
            continue
        ranked = rank_replicas(req, stats, prior_params_b=by_id[c.model_id].params_b)
        best = ranked[0]
        if not best.feasible:
            continue
        c.kept = True
        _take_best_replica(c, ranked, stats)
        c.reason += f"; shed here under the quality budget (shed threshold {floor:.2f})"
        return c, best, True
    return None

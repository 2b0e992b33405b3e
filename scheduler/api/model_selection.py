"""Choose the model for a request: its controls, then routing.select.route over live replica stats.

This module only adapts the serving path's objects (Job, API-key defaults, ApiError) to the routing
library; the decision itself is routing.select.route, the same code the fleet simulator runs.
"Router" elsewhere means HTTP routes (api/routes/) or Serve's replica chooser (routing/serve_router.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.api.errors import ApiError
from scheduler.config import WattlaneConfig
from scheduler.engines.base import ModelKind
from scheduler.routing.adequacy import load_predictor
from scheduler.routing.admission import StartQueue, admit, wait_limit_seconds
from scheduler.routing.controls import RequestControlError, RequestControls, merge_request_controls
from scheduler.routing.quality_budget import QualityBudget
from scheduler.routing.select import RouteDecision, RouteRequest, prompt_text_from_messages, route

log = logging.getLogger(__name__)


@dataclass
class Routed:
    """What the inference path needs from a routing decision."""

    model: str
    reason: str
    controls: RequestControls
    decision: RouteDecision
    #: the placement hint for Serve's request router (same keys as routing.placement.PlacementRequest)
    placement: dict[str, Any] = field(default_factory=dict)

    @property
    def fallback_models(self) -> list[str]:
        seen, out = {self.model}, []
        for model_id, _ in self.decision.fallbacks:
            if model_id not in seen:
                seen.add(model_id)
                out.append(model_id)
        return out


class ModelSelection:
    def __init__(self, config: WattlaneConfig):
        self.config = config
        self.predictor = load_predictor(config.routing.predictor_path)
        #: requests handed to each model's replicas and not started yet (api.serving reports them)
        self.starts = StartQueue()
        qb = config.routing.quality_budget
        #: routing.quality_budget's window, over the requests this gateway replica routes (None: the wall)
        self.quality_budget = None if qb is None else QualityBudget(
            qb.target, window_requests=qb.window_requests, overload_allowance=qb.overload_allowance,
            initial_threshold=config.routing.default_min_quality, rank=qb.rank, prompt_token_weight=qb.prompt_token_weight)

    def controls(self, job: Any) -> RequestControls:
        try:
            return merge_request_controls(job.key_defaults, job.controls, self.config.routing)
        except RequestControlError as exc:
            raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from None

    def explain(self, job: Any, replicas_by_model: dict[str, list[dict[str, Any]]] | None
                ) -> tuple[RequestControls, RouteDecision]:
        """The controls and the decision for a request, refusals included, without acting on them (the quality
        budget's window does not count it)."""
        controls, decision, _ = self._decide(job, replicas_by_model, record_decision=False)
        return controls, decision

    def _decide(self, job: Any, replicas_by_model: dict[str, list[dict[str, Any]]] | None, record_decision: bool
                ) -> tuple[RequestControls, RouteDecision, QualityBudget | None]:
        """explain()'s work; also the quality budget the decision went through (None: a wall)."""
        controls = self.controls(job)
        request = route_request(job)
        floor = getattr(job.admission, "quality_floor", None) if getattr(job, "admission", None) else None
        budget = self._quality_budget(job)
        if floor is not None:  # a budget runs low: the smallest model whose predicted quality reaches the team's floor
            controls = replace(controls, min_quality=min(controls.min_quality, floor), model_choice="smallest")
            request.model = "auto"
            budget = None  # the team's floor is a wall
        decision = route(self.config.models, request, controls, self.predictor, replicas_by_model,
                         quality_budget=budget, record_decision=record_decision)
        if floor is not None and decision.error is None:
            decision.reason = f"{job.admission.downgrade_reason}; {decision.reason}"
        return controls, decision, budget if decision.budgeted else None

    def select(self, job: Any, replicas_by_model: dict[str, list[dict[str, Any]]] | None) -> Routed:
        """Choose the model; raise ApiError (400/404/429/503) when nothing can serve the request."""
        controls, decision, budget = self._decide(job, replicas_by_model, record_decision=True)
        if decision.error is not None:
            e = decision.error
            headers = {"Retry-After": "5"} if e.status in (429, 503) else None
            raise ApiError(e.status, e.message, param=e.param, code=e.code, headers=headers)
        assert decision.model_id is not None
        if self.config.routing.admission == "slo":
            routed_to = decision.model_id
            try:
                self._admit(decision, controls)
            except ApiError:
                if budget is not None:
                    budget.amend_last(None)  # refused: the window holds what is served
                raise
            served = decision.chosen.predicted_quality if decision.chosen is not None else None
            if budget is not None and decision.model_id != routed_to and served is not None:
                budget.amend_last(served)  # admitted on a fallback: the window holds the model that serves it
        placement = {
            "prompt_tokens": decision.prompt_tokens,
            "output_tokens": decision.output_tokens,
            "ttft_slo_seconds": controls.ttft_slo_seconds,
            "tpot_slo_seconds": controls.tpot_slo_seconds,
        }
        return Routed(model=decision.model_id, reason=decision.reason, controls=controls, decision=decision,
                      placement=placement)

    def _quality_budget(self, job: Any) -> QualityBudget | None:
        """The budget holds the deployment's target: a min_quality the request or its API key sets is the
        caller's own, and stays a wall."""
        if self.quality_budget is None or job.controls.get("min_quality") is not None \
                or job.key_defaults.get("min_quality") is not None:
            return None
        return self.quality_budget

    def _admit(self, decision: RouteDecision, controls: RequestControls) -> None:
        """Keep the first adequate model that can start the request in time; else 503 with Retry-After."""
        limit = wait_limit_seconds(controls.ttft_slo_seconds, controls.priority, self.config.routing.admission_batch_wait_factor)
        queue_s = {c.model_id: c.predicted_queue_seconds for c in decision.candidates}
        order = [decision.model_id] + [m for m, _ in decision.fallbacks if m != decision.model_id]
        verdict = admit([(m, queue_s.get(m)) for m in dict.fromkeys(order) if m], self.starts, limit)
        if verdict.model is None:
            log.debug("refused: %s", verdict.reason)  # a storm of refusals must not become a storm of log lines
            which = "batch limit (admission_batch_wait_factor x TTFT target)" if controls.priority == "batch" else "TTFT target"
            raise ApiError(503, f"Overloaded: {verdict.reason}, the request's {which}. Retry after "
                                f"{verdict.retry_after_seconds} s, or raise slo.ttft_ms.",
                           code="no_capacity", headers={"Retry-After": str(verdict.retry_after_seconds)})
        if verdict.model != decision.model_id:
            decision.reason += f"; admitted on {verdict.model} ({verdict.reason}): {decision.model_id} cannot start it in time"
            decision.model_id = verdict.model
            decision.fallbacks = [(m, r) for m, r in decision.fallbacks if m != verdict.model]


def route_request(job: Any) -> RouteRequest:
    """What routing needs to know of a request's GenerationRequest (chat messages or a completion prompt)."""
    request = job.request
    if request.kind == ModelKind.CHAT:
        text, chars = prompt_text_from_messages(request.messages or [])
        n_messages = len(request.messages or [])
    else:
        text = request.prompt or ""
        chars, n_messages = len(text), 1
    return RouteRequest(
        kind=request.kind.value, model=job.model, prompt_text=text, all_text_chars=chars, num_messages=n_messages,
        # token ids (a named model's): their count is the prompt's, and there is no text for the predictor
        prompt_tokens=len(request.prompt_token_ids) if request.prompt_token_ids is not None else None,
        max_tokens=256 if request.params.max_tokens is None else request.params.max_tokens,
        needs_json=request.params.response_format is not None,
    )

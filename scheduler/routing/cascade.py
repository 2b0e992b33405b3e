"""Cascade for priority "batch": answer with the small model first, escalate when it is unsure.

The gateway runs the small model, reads the mean token log-probability of its answer (the engine
reports it in EngineEvent.mean_logprob) and asks should_escalate(); on escalation it runs the next
candidate of the decision and charges the joules of both attempts to the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.config import RoutingConfig


@dataclass(frozen=True)
class EscalationDecision:
    escalate: bool
    reason: str


def cascade_applies(priority: str, routing_config: RoutingConfig, next_model: str | None) -> bool:
    """True when this request should be cascaded: batch priority, cascade enabled, a larger model exists."""
    return priority == "batch" and routing_config.cascade and next_model is not None


def should_escalate(mean_logprob: float | None, threshold: float, *, completion_tokens: int | None = None) -> EscalationDecision:
    """Escalate when the small model's mean token log-probability is below the threshold.

    Unknown confidence (engine gave no log-probabilities, or an empty answer) escalates: the cascade
    exists to protect quality, and an answer we cannot judge is not evidence of adequacy.
    """
    if completion_tokens == 0:
        return EscalationDecision(True, "small model produced no tokens")
    if mean_logprob is None or not math.isfinite(mean_logprob):
        return EscalationDecision(True, "small model reported no token log-probabilities")
    if mean_logprob < threshold:
        return EscalationDecision(True, f"mean token log-probability {mean_logprob:.2f} < threshold {threshold:.2f}")
    return EscalationDecision(False, f"mean token log-probability {mean_logprob:.2f} >= threshold {threshold:.2f}")

"""A Ray Serve RequestRouter that places each request on the replica with the lowest predicted energy
within its SLO, from the ReplicaStats every replica publishes through record_routing_stats.

Wire it per model deployment:

    from ray.serve.config import RequestRouterConfig
    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="scheduler.routing.serve_router:EnergyAwareRequestRouter",
        request_routing_stats_period_s=1.0))
    class ModelReplica:
        def record_routing_stats(self) -> dict:   # Serve calls this every period
            return dict(self.engine.stats())        # a ReplicaStats

and call it with the placement hint: handle.generate.remote(request, placement={"prompt_tokens": ...,
"output_tokens": ..., "ttft_slo_seconds": ..., "tpot_slo_seconds": ..., "slo_margin": ...}) (slo_margin optional). The ranking is the one of
scheduler.routing.placement.rank_replicas, one replica per rank, so Serve's own queue-length probe
still skips a full replica and falls through to the next best.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from scheduler.routing.placement import DEFAULT_SLO_MARGIN, PlacementRequest, rank_replicas


def placement_hint(pending_request: Optional[PendingRequest]) -> PlacementRequest:
    """The request's placement hint: kwargs['placement'], or a 'placement' key/attribute of the first argument."""
    hint: Any = None
    if pending_request is not None:
        hint = pending_request.kwargs.get("placement")
        if hint is None and pending_request.args:
            first = pending_request.args[0]
            hint = first.get("placement") if isinstance(first, Mapping) else getattr(first, "placement", None)
    if isinstance(hint, PlacementRequest):
        return hint
    if isinstance(hint, Mapping):
        return PlacementRequest(
            prompt_tokens=int(hint.get("prompt_tokens") or 0),
            output_tokens=int(hint.get("output_tokens") or 0),
            ttft_slo_seconds=hint.get("ttft_slo_seconds"),
            tpot_slo_seconds=hint.get("tpot_slo_seconds"),
            slo_margin=DEFAULT_SLO_MARGIN if hint.get("slo_margin") is None else float(hint["slo_margin"]),
        )
    # no hint: rank by the replicas' own figures for a token-less request (idle share, then TTFT)
    return PlacementRequest(prompt_tokens=0, output_tokens=0)


class EnergyAwareRequestRouter(FIFOMixin, RequestRouter):
    """Rank replicas by predicted energy among those meeting the SLO, then the rest by TTFT."""

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        return rank_running_replicas(candidate_replicas, pending_request)


def rank_running_replicas(
    candidate_replicas: List[Any], pending_request: Optional[PendingRequest] = None
) -> List[List[Any]]:
    """choose_replicas' body, free of router state so it is testable without Ray running."""
    if not candidate_replicas:
        return []
    candidate_replicas = _usable(candidate_replicas, pending_request)
    stats = [dict(getattr(r, "routing_stats", None) or {}) for r in candidate_replicas]
    if not any(stats):
        # no replica has published yet: one rank, Serve picks the shortest queue among them
        return [list(candidate_replicas)]
    ranked = rank_replicas(placement_hint(pending_request), stats)
    return [[candidate_replicas[p.index]] for p in ranked]


def _usable(candidate_replicas: List[Any], pending_request: Optional[PendingRequest]) -> List[Any]:
    """Leave out ejected upstream endpoints and the replicas a retry must avoid (placement hint
    'avoid_replicas'), unless nothing would be left: then the replica answers for itself, at once."""
    avoid: Any = ()
    if pending_request is not None:
        hint = pending_request.kwargs.get("placement")
        if isinstance(hint, Mapping):
            avoid = hint.get("avoid_replicas") or ()
    kept = [r for r in candidate_replicas
            if not (getattr(r, "routing_stats", None) or {}).get("ejected")
            and (getattr(r, "routing_stats", None) or {}).get("replica_id") not in avoid]
    if kept:
        return kept
    kept = [r for r in candidate_replicas if (getattr(r, "routing_stats", None) or {}).get("replica_id") not in avoid]
    return kept or list(candidate_replicas)

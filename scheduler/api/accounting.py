"""Account for one ended request: its carbon, its durable ledger row and its metrics, in one call.

The serving path calls Accounting.record once per request, however it ended (ok, error, cancelled),
and gets the result back with its carbon filled in; it never reaches into the gateway for these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from scheduler.cluster.messages import AbandonedWork, EnergyReport
from scheduler.energy.baseline import SavingsBaseline
from scheduler.energy.ledger import Ledger, LedgerRow
from scheduler.energy.metrics import WattlaneMetrics

if TYPE_CHECKING:
    from scheduler.api.serving import InferenceResult, Job
    from scheduler.telemetry.otel import RequestTracer

log = logging.getLogger(__name__)

#: how long to wait for a node agent to settle an abandoned request
ABANDONED_WAIT_SECONDS = 10.0

#: (node, request_id, timeout_seconds) -> the work an abandoned request left with its node agent (node
#: None: with whichever agent has it)
AbandonedLookup = Callable[["str | None", str, float], Awaitable["AbandonedWork | None"]]


class Accounting:
    def __init__(self, carbon: Any, ledger: Ledger, metrics: WattlaneMetrics, abandoned: AbandonedLookup | None = None,
                 *, baseline: SavingsBaseline | None = None, tracer: "RequestTracer | None" = None):
        self.carbon = carbon
        self.ledger = ledger
        self.metrics = metrics
        self._abandoned = abandoned
        #: estimates each row's baseline_joules (None: rows carry no savings figure)
        self.baseline = baseline
        #: OpenTelemetry spans (scheduler/telemetry/otel.py); None when telemetry is off
        self.tracer = tracer

    async def record(self, job: "Job", result: "InferenceResult", status: str,
                     energy: EnergyReport | None) -> "InferenceResult":
        """Carbon for the request's joules, then its ledger row (durable when this returns), then metrics."""
        now_s = time.time()
        if energy is not None and result.carbon is None:
            # in memory for every provider but a live one between refreshes: no thread hop then
            footprint = self.carbon.footprint_cached(energy.joules, now_s)
            if footprint is None:
                footprint = await asyncio.to_thread(self.carbon.footprint, energy.joules, now_s)
            result = replace(result, carbon=footprint)
        e, c = result.energy, result.carbon
        joules = e.joules if e else None
        gco2e = c.gco2e if c else None
        base = None
        if self.baseline is not None:
            base = self.baseline.estimate(
                served_model=result.model, request_kind=job.request.kind.value, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, joules=joules,
                cascade_repeat=job.cascade_of is not None, retried_attempt=job.attempt_of is not None)
            self.baseline.observe(result.model, result.prompt_tokens, result.completion_tokens, joules)
        row = LedgerRow(
            request_id=result.request_id,
            time_unix_s=now_s,
            model=result.model,
            device=str(result.routing.get("device") or ""),
            node=str(result.routing.get("node") or ""),
            status=status,
            api_key_id=job.api_key_id,
            team=job.team,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            ttft_seconds=result.ttft_seconds,
            tpot_seconds=result.tpot_seconds,
            latency_seconds=result.latency_seconds,
            joules=joules,
            dynamic_joules=e.dynamic_joules if e else None,
            idle_joules=e.idle_joules if e else None,
            energy_method=e.method if e else None,
            energy_scope=e.scope if e else None,
            gco2e=gco2e,
            intensity_gco2e_per_kwh=c.intensity_gco2e_per_kwh if c else None,
            pue=c.pue if c else None,
            carbon_source=c.source if c else None,
            carbon_region=c.region if c else None,
            power_limit_watts=energy.power_limit_watts if energy is not None else None,
            routing_reason=result.routing.get("reason"),
            priority=job.controls.get("priority"),
            baseline_model=base.model if base else None,
            baseline_joules=base.joules if base else None,
            baseline_method=base.method if base else None,
            prompt_tokens_method=result.prompt_tokens_method,
            completion_tokens_method=result.completion_tokens_method,
        )
        await self.ledger.arecord(row)
        if job.admission is not None:  # the caller's budgets count what this row counts
            try:
                await job.admission.settle(joules, gco2e, result.prompt_tokens + result.completion_tokens)
            except Exception:  # an unsettled reservation expires by itself; the answer must still go out
                log.exception("could not settle the limits and budgets of request %s", result.request_id)
        self.metrics.observe_request(
            model=result.model, status=status, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, ttft_seconds=result.ttft_seconds,
            tpot_seconds=result.tpot_seconds, joules=joules,
            dynamic_joules=e.dynamic_joules if e else None, idle_joules=e.idle_joules if e else None,
            gco2e=gco2e, api_key=job.api_key_id, team=job.team, baseline_joules=row.baseline_joules,
        )
        if self.tracer is not None:
            self.tracer.request_ended(job, result, row)
        return result

    async def abandoned_work(self, node: str | None, request_id: str) -> AbandonedWork | None:
        """Energy and tokens of an abandoned request, as its replica left them with its node agent.

        node None: the client left before the replica's start reached the gateway (a request without
        deltas sends its start late, or with its end: cluster/replica.py), so any agent may hold the
        work. They are all asked, for as long: the replica's message can come well after the gateway's
        cancel on a busy machine, and the row waits in the background, not the client."""
        if self._abandoned is None:
            return None
        return await self._abandoned(node, request_id, ABANDONED_WAIT_SECONDS)

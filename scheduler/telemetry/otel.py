"""OpenTelemetry traces: one span per ended request, GenAI semantic conventions plus Wattlane's energy and carbon.

Optional (`pip install 'wattlane[otel]'`): nothing here is imported unless telemetry.otlp_endpoint is
set, so with telemetry off a request pays one `is None` test in api/accounting.py.

The span is written when the request's ledger row is (Accounting.record), with its start set back to
when the gateway accepted the request, so its duration is the latency the client saw. It is a
SERVER span named "{gen_ai.operation.name} {gen_ai.request.model}" (e.g. "chat auto"). A request that
carries W3C Trace Context headers (traceparent, tracestate) gets its span as a child of the caller's,
in the caller's trace, and the caller's sampling decision holds (ParentBased); without them the span
starts a trace, sampled at telemetry.sample_ratio. Attributes:

- GenAI conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/, Development
  status): gen_ai.operation.name ("chat" | "text_completion"), gen_ai.provider.name ("wattlane"),
  gen_ai.request.model (as asked, may be "auto"), gen_ai.response.model (the model that ran),
  gen_ai.response.id, gen_ai.response.finish_reasons, gen_ai.usage.input_tokens / output_tokens,
  gen_ai.request.max_tokens / temperature / top_p / seed, server.address, server.port, and error.type
  for requests that did not end "ok".
- Wattlane: wattlane.energy.joules / dynamic_joules / idle_joules / method / scope / device,
  wattlane.carbon.gco2e / intensity_gco2e_per_kwh / pue / source / region, wattlane.baseline.joules /
  model / method and wattlane.energy.saved_joules (an estimate: energy/baseline.py),
  wattlane.routing.reason, wattlane.node, wattlane.api_key_id, wattlane.team, wattlane.status,
  wattlane.ttft_seconds, wattlane.tpot_seconds. Unknown figures are left out, never sent as 0.

Spans leave through the SDK's BatchSpanProcessor and an OTLP/HTTP (protobuf) exporter, off the
request path; a collector that is down costs dropped spans, never a failed request.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scheduler.config import TelemetryConfig

if TYPE_CHECKING:
    from scheduler.api.serving import InferenceResult, Job
    from scheduler.energy.ledger import LedgerRow

log = logging.getLogger(__name__)

INSTRUMENTATION_SCOPE = "wattlane"
PROVIDER_NAME = "wattlane"
#: Wattlane's request kinds -> GenAI operation names
OPERATIONS = {"chat": "chat", "completion": "text_completion"}
TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """The collector's traces URL: <endpoint>/v1/traces, unless the endpoint already names it."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


class RequestTracer:
    """Turns ended requests into spans on its own TracerProvider (never the process-global one)."""

    def __init__(self, processor: SpanProcessor, *, service_name: str = "wattlane", sample_ratio: float = 1.0,
                 server_address: str | None = None, server_port: int | None = None):
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer(INSTRUMENTATION_SCOPE)
        self.server_address = server_address or socket.gethostname()
        self.server_port = server_port
        self._propagator = TraceContextTextMapPropagator()

    def request_ended(self, job: "Job", result: "InferenceResult", row: "LedgerRow") -> None:
        """One span for a request that ended (any status); never raises into the request path."""
        try:
            self._span(job, result, row)
        except Exception:  # telemetry must never fail a request
            log.exception("could not trace request %s", row.request_id)

    def _span(self, job: "Job", result: "InferenceResult", row: "LedgerRow") -> None:
        end_ns = time.time_ns()
        start_ns = end_ns - int(max(result.latency_seconds or 0.0, 0.0) * 1e9)
        operation = OPERATIONS.get(job.request.kind.value, job.request.kind.value)
        params = job.request.params
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER_NAME,
            "gen_ai.request.model": job.model,
            "gen_ai.response.model": result.model,
            "gen_ai.response.id": result.request_id,
            "gen_ai.response.finish_reasons": [result.finish_reason],
            "gen_ai.usage.input_tokens": result.prompt_tokens,
            "gen_ai.usage.output_tokens": result.completion_tokens,
            "gen_ai.request.max_tokens": params.max_tokens,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.seed": params.seed,
            "server.address": self.server_address,
            "server.port": self.server_port,
            "wattlane.status": row.status,
            "wattlane.node": row.node or None,
            "wattlane.api_key_id": row.api_key_id,
            "wattlane.team": row.team,
            "wattlane.routing.reason": row.routing_reason,
            "wattlane.ttft_seconds": row.ttft_seconds,
            "wattlane.tpot_seconds": row.tpot_seconds,
            "wattlane.energy.joules": row.joules,
            "wattlane.energy.dynamic_joules": row.dynamic_joules,
            "wattlane.energy.idle_joules": row.idle_joules,
            "wattlane.energy.method": row.energy_method,
            "wattlane.energy.scope": row.energy_scope,
            "wattlane.energy.device": row.device or None,
            "wattlane.carbon.gco2e": row.gco2e,
            "wattlane.carbon.intensity_gco2e_per_kwh": row.intensity_gco2e_per_kwh,
            "wattlane.carbon.pue": row.pue,
            "wattlane.carbon.source": row.carbon_source,
            "wattlane.carbon.region": row.carbon_region,
            "wattlane.baseline.model": row.baseline_model,
            "wattlane.baseline.joules": row.baseline_joules,
            "wattlane.baseline.method": row.baseline_method,
        }
        if row.baseline_joules is not None and row.joules is not None:
            attrs["wattlane.energy.saved_joules"] = row.baseline_joules - row.joules
        if row.status != "ok":
            attrs["error.type"] = row.status
        # a malformed traceparent extracts to no parent: the span starts a trace of its own
        parent = self._propagator.extract(job.trace_context) if job.trace_context else None
        span = self.tracer.start_span(f"{operation} {job.model}", context=parent, kind=SpanKind.SERVER,
                                      start_time=start_ns, attributes={k: v for k, v in attrs.items() if v is not None})
        if row.status != "ok":
            span.set_status(Status(StatusCode.ERROR, row.status))
        span.end(end_time=end_ns)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Export what is queued, then stop (the gateway calls this when it shuts down)."""
        self.provider.shutdown()


def tracer_from_config(telemetry: TelemetryConfig, *, server_address: str | None = None,
                       server_port: int | None = None) -> RequestTracer | None:
    """An OTLP/HTTP RequestTracer when telemetry.otlp_endpoint is set, else None (telemetry off)."""
    if not telemetry.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=traces_url(telemetry.otlp_endpoint), headers=dict(telemetry.otlp_headers),
                                timeout=telemetry.otlp_timeout_seconds)
    return RequestTracer(BatchSpanProcessor(exporter), service_name=telemetry.service_name,
                         sample_ratio=telemetry.sample_ratio, server_address=server_address, server_port=server_port)

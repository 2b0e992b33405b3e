"""OpenTelemetry request spans: GenAI attributes plus energy and carbon, in memory and over real OTLP/HTTP."""

from __future__ import annotations

import http.server
import threading

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from scheduler.config import ConfigError, TelemetryConfig, WattlaneConfig, load_config
from scheduler.telemetry.otel import RequestTracer, tracer_from_config, traces_url
from tests.support.gateway_app import bearer, build

SMALL, LARGE = "llama-3.1-8b", "llama-3.1-70b"
CHAT = {"model": "auto", "min_quality": 0.0, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5,
        "temperature": 0.5}


def test_each_request_is_one_genai_span_with_the_energy_and_carbon_of_its_answer(tmp_path):
    exporter = InMemorySpanExporter()
    tracer = RequestTracer(SimpleSpanProcessor(exporter), server_address="gw.example", server_port=8000)
    app, gw = build(tmp_path, tracer=tracer, teams={"client": "research"})
    try:
        with TestClient(app) as client:
            r = client.post("/v1/chat/completions", json=CHAT, headers=bearer("client"))
            assert r.status_code == 200
            body = r.json()
            # a request the replica cannot finish (over the context) still gets its span, marked as an error
            bad = client.post("/v1/completions", json={"model": SMALL, "prompt": "x", "max_tokens": 200_000},
                              headers=bearer("client"))
            assert bad.status_code == 400
    finally:
        gw.close()
    spans = exporter.get_finished_spans()
    assert len(spans) == 1  # the refused request never ran: routing refused it, no row and no span
    span = spans[0]
    a = dict(span.attributes)
    assert span.name == "chat auto" and span.kind == SpanKind.SERVER
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "wattlane"
    assert a["gen_ai.request.model"] == "auto" and a["gen_ai.response.model"] == body["model"] == SMALL
    assert a["gen_ai.response.id"] == body["id"] == r.headers["x-request-id"]
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"] == 5
    assert a["gen_ai.request.max_tokens"] == 5 and a["gen_ai.request.temperature"] == 0.5
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert a["server.address"] == "gw.example" and a["server.port"] == 8000
    energy, carbon = body["usage"]["energy"], body["usage"]["carbon"]
    assert a["wattlane.energy.joules"] == pytest.approx(energy["joules"]) and a["wattlane.energy.method"] == "simulated"
    assert a["wattlane.energy.idle_joules"] == pytest.approx(energy["idle_joules"])
    assert a["wattlane.carbon.gco2e"] == pytest.approx(carbon["gco2e"]) and a["wattlane.carbon.region"] == "FRA"
    assert a["wattlane.team"] == "research" and a["wattlane.api_key_id"] == "client-key"
    row = gw.ledger.requests(limit=None)[0]
    assert a["wattlane.baseline.model"] == LARGE and a["wattlane.baseline.method"] == row["baseline_method"]
    assert a["wattlane.energy.saved_joules"] == pytest.approx(row["baseline_joules"] - row["joules"])
    assert "error.type" not in a and span.status.status_code == StatusCode.UNSET
    # the span covers the request as the client saw it
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(row["latency_seconds"], abs=0.01)


def test_a_request_that_failed_on_its_replica_is_an_error_span():
    import asyncio
    import tempfile
    from pathlib import Path

    from scheduler.api.serving import Job
    from scheduler.engines.base import EngineError, GenerationRequest, ModelKind, SamplingParams
    from tests.support.serving import Fleet

    exporter = InMemorySpanExporter()

    async def main():
        fleet = Fleet(Path(tempfile.mkdtemp()), tracer=RequestTracer(SimpleSpanProcessor(exporter)))
        server = fleet.handles[SMALL].server
        real = server.engine.generate

        async def failing(request):
            async for ev in real(request):
                if ev.completion_tokens > 1:
                    raise EngineError("the engine broke")
                yield ev

        server.engine.generate = failing
        request = GenerationRequest("cmpl-1", ModelKind.COMPLETION, prompt="Once", params=SamplingParams(max_tokens=4))
        try:
            with pytest.raises(Exception):
                await fleet.serving.run(Job(request_id="cmpl-1", model=SMALL, request=request, api_key_id="k"))
        finally:
            await fleet.aclose()

    asyncio.run(main())
    (span,) = exporter.get_finished_spans()
    assert span.name == f"text_completion {SMALL}" and span.attributes["gen_ai.operation.name"] == "text_completion"
    assert span.attributes["error.type"] == "error" and span.status.status_code == StatusCode.ERROR
    assert span.attributes["wattlane.energy.joules"] > 0  # the work it did before failing is still counted


class _Collector(http.server.ThreadingHTTPServer):
    """A minimal OTLP/HTTP trace receiver: POST /v1/traces, protobuf body, decoded with opentelemetry-proto."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.got = threading.Event()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                collector.requests.append(msg)
                collector.content_types.append(self.headers["Content-Type"])
                collector.got.set()
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, kind)


def test_spans_reach_a_real_otlp_http_endpoint_with_the_energy_attributes(tmp_path):
    collector = _Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
        tracer = tracer_from_config(TelemetryConfig(otlp_endpoint=endpoint, service_name="wattlane-test",
                                                    otlp_headers={"x-tenant": "t1"}), server_port=8000)
        app, gw = build(tmp_path, tracer=tracer)
        try:
            with TestClient(app) as client:
                r = client.post("/v1/chat/completions", json=CHAT, headers=bearer("client"))
                assert r.status_code == 200
        finally:
            tracer.shutdown()  # the batch processor exports what it holds
            gw.close()
        assert collector.got.wait(10), "no export reached the collector"
    finally:
        collector.shutdown()
        collector.server_close()
    assert collector.content_types == ["application/x-protobuf"]
    (rs,) = [rs for req in collector.requests for rs in req.resource_spans]
    resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
    assert resource["service.name"] == "wattlane-test"
    (span,) = [s for ss in rs.scope_spans for s in ss.spans]
    a = {kv.key: _value(kv.value) for kv in span.attributes}
    body = r.json()
    assert span.name == "chat auto" and a["gen_ai.response.model"] == body["model"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert a["wattlane.energy.joules"] == pytest.approx(body["usage"]["energy"]["joules"])
    assert a["wattlane.energy.method"] == "simulated"
    assert a["wattlane.carbon.gco2e"] == pytest.approx(body["usage"]["carbon"]["gco2e"])
    assert a["wattlane.carbon.source"] == body["usage"]["carbon"]["source"]
    assert span.trace_id.hex() != "0" * 32 and len(span.span_id) == 8


def test_telemetry_config_is_typed_and_off_by_default(tmp_path):
    assert WattlaneConfig.model_validate({"models": [{"id": "m", "kind": "chat", "engine": "simulated"}]}).telemetry.otlp_endpoint is None
    assert tracer_from_config(TelemetryConfig()) is None
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{id: m, kind: chat, engine: simulated, devices: [s0]}]\n"
                   "devices: {nvml: false, simulated: [{id: s0, profile: h100-sxm}]}\n"
                   "telemetry: {otlp_endpoint: 'collector:4318'}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert exc.value.key == "telemetry.otlp_endpoint"


def test_a_request_with_a_traceparent_is_a_child_span_in_the_callers_trace(tmp_path):
    """A caller that traces its own work (W3C traceparent) finds Wattlane's span inside its trace."""
    exporter = InMemorySpanExporter()
    # sample_ratio 0: only the caller's sampled flag can get a span exported
    tracer = RequestTracer(SimpleSpanProcessor(exporter), sample_ratio=0.0)
    app, gw = build(tmp_path, tracer=tracer)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        with TestClient(app) as client:
            for traceparent in (f"00-{trace_id}-{parent_id}-01",  # sampled by the caller
                                f"00-{trace_id}-{parent_id}-00",  # not sampled by the caller: no span
                                "00-garbage"):  # malformed: a trace of its own, sampled at the ratio (0)
                r = client.post("/v1/chat/completions", json=CHAT,
                                headers={**bearer("client"), "traceparent": traceparent, "tracestate": "vendor=x"})
                assert r.status_code == 200
    finally:
        gw.close()
    (span,) = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_id and span.parent.is_remote
    assert span.context.trace_state.get("vendor") == "x"

"""The `openai` upstream engine against a real HTTP server that misbehaves on request (no Ray, seconds).

Tokens stream through as they arrive; usage is the server's or counted; every way a server can fail
(no connection, a stall, a 500, bad JSON, broken SSE, a cut connection, another model) becomes a
clear EngineError within the configured timeouts and ejects the endpoint; a 400 is the client's,
keeps its words and ejects nothing; a client that leaves closes the upstream request; health checks
eject and re-admit with backoff; the serving path retries a request that failed before any token on
the other endpoint, and answers in the OpenAI envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import pytest

from scheduler.api.errors import ApiError
from scheduler.api.serving import Job
from scheduler.config import UpstreamEndpointConfig, UpstreamOptions
from scheduler.engines.base import EngineError, GenerationRequest, ModelKind, RequestRejectedError, SamplingParams
from scheduler.engines.openai_upstream import JPT_ESTIMATE_METHOD, REST_AFTER_DONE_SECONDS, UpstreamEngine
from scheduler.engines.upstream_health import EndpointHealth
from tests.support.fake_upstream import WORDS, FakeUpstream
from tests.support.upstream_serving import UpstreamFleet, upstream_config


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream(stall_seconds=30.0) as server:
        yield server


def engine(base_url: str, name: str, **options: Any) -> UpstreamEngine:
    opts = UpstreamOptions(**{"read_timeout_seconds": 0.5, "connect_timeout_seconds": 0.5, **options})
    ep = UpstreamEndpointConfig(base_url=base_url, served_model_name=name, devices=["cpu0"])
    return UpstreamEngine("m", ModelKind.CHAT, ep, opts, context_length=2048, health_checks=False)


def chat(rid: str = "r1", text: str = "say hello") -> GenerationRequest:
    return GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": text}],
                             params=SamplingParams(max_tokens=8))


async def collect(eng: UpstreamEngine, request: GenerationRequest) -> list[Any]:
    try:
        return [ev async for ev in eng.generate(request)]
    finally:
        await eng.close()


def test_tokens_stream_through_with_the_servers_usage(fake):
    events = asyncio.run(collect(engine(fake.base_url, "ok"), chat()))
    assert [e.text for e in events[:-1]] == WORDS
    assert [e.completion_tokens for e in events[:-1]] == list(range(1, len(WORDS) + 1))
    assert all(a.time_s <= b.time_s for a, b in zip(events, events[1:]))
    last = events[-1]
    assert last.finished and last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (7, len(WORDS))


def test_json_mode_penalties_and_logit_bias_reach_the_server_only_when_asked_for(fake):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    asked = GenerationRequest("r-json", ModelKind.CHAT, messages=[{"role": "user", "content": "x"}],
                              params=SamplingParams(max_tokens=4, response_format=fmt, frequency_penalty=0.5,
                                                    presence_penalty=-1.0, logit_bias={42: -100.0}))
    asyncio.run(collect(engine(fake.base_url, "ok"), asked))
    sent = fake.bodies[-1]
    assert sent["response_format"] == fmt and sent["logit_bias"] == {"42": -100.0}
    assert (sent["frequency_penalty"], sent["presence_penalty"]) == (0.5, -1.0)
    asyncio.run(collect(engine(fake.base_url, "ok"), chat("r-plain")))
    assert not {"response_format", "logit_bias", "frequency_penalty", "presence_penalty"} & set(fake.bodies[-1])


def test_logprobs_are_asked_for_in_each_shape_and_read_from_either():
    from scheduler.engines.openai_upstream import _chunk_logprobs

    eng = engine("http://127.0.0.1:1", "ok")
    chat_req = GenerationRequest("c", ModelKind.CHAT, messages=[{"role": "user", "content": "x"}],
                                 params=SamplingParams(max_tokens=2, return_logprobs=True, top_logprobs=2))
    body = eng._body(chat_req)
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    comp_req = GenerationRequest("p", ModelKind.COMPLETION, prompt="x",
                                 params=SamplingParams(max_tokens=2, return_logprobs=True, top_logprobs=3))
    assert eng._body(comp_req)["logprobs"] == 3
    assert "logprobs" not in eng._body(chat("plain"))
    chat_chunk = {"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Yo", "logprob": -1.5}]}]}}]}
    [t] = _chunk_logprobs(chat_chunk)
    assert (t.token, t.logprob, t.token_bytes) == ("Hi", -0.5, b"Hi")
    assert t.top == (("Hi", -0.5, b"Hi"), ("Yo", -1.5, b"Yo"))
    legacy = {"choices": [{"text": " a b", "logprobs": {"tokens": [" a", " b"], "token_logprobs": [-0.1, -0.2],
                                                       "top_logprobs": [{" a": -0.1}, {" b": -0.2, " c": -2.0}]}}]}
    a, b = _chunk_logprobs(legacy)
    assert (a.token, a.logprob, b.top) == (" a", -0.1, ((" b", -0.2, b" b"), (" c", -2.0, b" c")))
    # a chunk without logprobs, or with a shape of neither kind, has none: never an error mid-stream
    assert _chunk_logprobs({"choices": [{"delta": {"content": "x"}}]}) == []
    assert _chunk_logprobs({"choices": [{"logprobs": {"content": [{"token": 5}]}}]}) == []


def test_completions_stream_and_without_usage_tokens_are_counted(fake):
    eng = engine(fake.base_url, "ok-nousage")
    eng.kind = ModelKind.COMPLETION
    request = GenerationRequest("r2", ModelKind.COMPLETION, prompt="x" * 40, params=SamplingParams(max_tokens=8))

    async def main():
        events = [ev async for ev in eng.generate(request)]
        estimated = eng.prompt_tokens_estimated
        await eng.close()
        return events, estimated

    events, estimated = asyncio.run(main())
    assert "".join(e.text for e in events) == "".join(WORDS)
    # no usage from the server: output chunks counted, prompt estimated from its length (40 bytes / 4)
    assert events[-1].completion_tokens == len(WORDS) and events[-1].prompt_tokens == 10
    assert estimated == 1


def test_a_token_id_prompt_is_refused_before_the_server_is_asked(fake):
    """llama-cpp-python's server answers token ids with a 500: sent on, the request would eject a healthy server."""
    eng = engine(fake.base_url, "ok")
    eng.kind = ModelKind.COMPLETION
    asked = len(fake.bodies)
    request = GenerationRequest("r-ids", ModelKind.COMPLETION, prompt_token_ids=[791, 6864, 315],
                                params=SamplingParams(max_tokens=8))
    with pytest.raises(RequestRejectedError) as info:
        asyncio.run(collect(eng, request))
    assert info.value.param == "prompt" and "send the prompt as text" in str(info.value)
    assert len(fake.bodies) == asked and not eng.health.ejected


FAULTS = {
    "bad-json": "not JSON",
    "broken-sse": "not Server-Sent Events",
    "truncated": "broke mid-response",
    "stall": "timed out waiting for data",
    "stall-mid": "timed out waiting for data",
    "http500": "answered 500: CUDA error",
    "wrong-model": "serves model 'someone-else', not 'wrong-model'",
    "no-such-model": "does not serve model 'no-such-model'",
    "error-chunk": "out of memory",
}


@pytest.mark.parametrize("mode", sorted(FAULTS))
def test_a_misbehaving_server_is_a_clear_engine_error_in_bounded_time_and_ejects_it(fake, mode):
    eng = engine(fake.base_url, mode)
    t0 = time.monotonic()
    with pytest.raises(EngineError) as exc:
        asyncio.run(collect(eng, chat()))
    assert time.monotonic() - t0 < 5.0  # read timeout 0.5 s: a stall never hangs the request
    assert FAULTS[mode] in str(exc.value) and fake.base_url in str(exc.value)
    assert eng.health.ejected and eng.stats()["ejected"] is True
    assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0


def test_an_ejected_endpoint_fails_at_once_without_calling_the_server(fake):
    eng = engine(fake.base_url, "http500", ejection_base_seconds=60.0)
    with pytest.raises(EngineError):
        asyncio.run(collect(eng, chat()))
    before = fake.requests["http500"]
    with pytest.raises(EngineError, match="is ejected"):
        asyncio.run(collect(eng, chat()))
    assert fake.requests["http500"] == before


def test_no_server_listening_is_a_connect_error_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="cannot connect"):
        asyncio.run(collect(engine(f"http://127.0.0.1:{port}", "ok"), chat()))
    assert time.monotonic() - t0 < 3.0


def test_the_servers_400_is_the_clients_error_with_its_words_and_ejects_nothing(fake):
    eng = engine(fake.base_url, "too-long")
    with pytest.raises(RequestRejectedError) as exc:
        asyncio.run(collect(eng, chat()))
    assert "maximum context length is 2048" in str(exc.value)
    assert exc.value.code == "context_length_exceeded"
    assert not eng.health.ejected


def test_a_client_that_leaves_closes_the_upstream_request(fake):
    eng = engine(fake.base_url, "stall-mid", read_timeout_seconds=30.0)

    async def main():
        events = eng.generate(chat())
        got = [await events.__anext__(), await events.__anext__()]  # two tokens, then the server stalls
        await events.aclose()  # what the replica does when its request is cancelled
        stats = eng.stats()
        await eng.close()
        return got, stats

    t0 = time.monotonic()
    got, stats = asyncio.run(main())
    assert [g.completion_tokens for g in got] == [1, 2]
    assert time.monotonic() - t0 < 5.0 and stats["running"] == 0 and not eng.health.ejected


def test_requests_one_after_another_share_one_connection(fake):
    # stopping at [DONE] without reading the end of the body made httpx close the connection, so every
    # request connected again (a TCP, and for https a TLS, handshake more per request)
    eng = engine(fake.base_url, "ok")

    async def main():
        first = len(fake.client_ports)
        for i in range(4):
            events = [ev async for ev in eng.generate(chat(f"reuse{i}"))]
            assert [e.text for e in events[:-1]] == WORDS and events[-1].finished
        await eng.close()
        return fake.client_ports[first:]

    ports = asyncio.run(main())
    assert len(ports) == 4 and len(set(ports)) == 1, ports


def test_a_request_leaves_no_task_behind_for_the_loop(fake):
    # the SSE parser, left suspended at [DONE], was closed later by the loop's async-generator finalizer:
    # one task more per request, run in some other request's time
    eng = engine(fake.base_url, "ok")

    async def main():
        created: list[str] = []
        loop = asyncio.get_running_loop()
        [ev async for ev in eng.generate(chat("warm"))]
        loop.set_task_factory(lambda lp, coro, **kw: created.append(repr(coro)) or asyncio.Task(coro, loop=lp, **kw))
        for i in range(3):
            async with contextlib.aclosing(eng.generate(chat(f"tasks{i}"))) as events:  # as the replica reads them
                assert [ev.text async for ev in events][:-1] == WORDS
        await asyncio.sleep(0.05)  # time for a finalizer's task to be made
        loop.set_task_factory(None)
        await eng.close()
        return created

    assert asyncio.run(main()) == []


def test_a_response_held_open_after_done_ends_the_request_promptly_and_well(fake):
    eng = engine(fake.base_url, "held-after-done", read_timeout_seconds=30.0)
    t0 = time.monotonic()
    events = asyncio.run(collect(eng, chat()))
    assert time.monotonic() - t0 < REST_AFTER_DONE_SECONDS + 2.0
    assert [e.text for e in events[:-1]] == WORDS
    assert events[-1].finished and events[-1].completion_tokens == len(WORDS)
    assert not eng.health.ejected


def test_ejection_backoff_doubles_while_rechecks_fail_and_resets_after_success():
    now = [0.0]
    h = EndpointHealth(base_seconds=1.0, max_seconds=4.0, clock=lambda: now[0])
    assert h.failed("500") and h.ejected and not h.probe_due()
    now[0] = 1.0
    assert h.probe_due() and h.probe(False, "down") is None  # still down: next look in 2 s
    now[0] = 2.5
    assert not h.probe_due()
    now[0] = 3.0
    assert h.probe(False, "down") is None  # next look in 4 s (the cap)
    now[0] = 6.9
    assert not h.probe_due()
    now[0] = 7.0
    assert h.probe(True) == "readmitted" and not h.ejected
    h.succeeded()
    assert h.failed("again") and h.seconds_to_recheck() == pytest.approx(1.0)


def test_one_slow_health_check_does_not_eject_two_in_a_row_do():
    h = EndpointHealth(base_seconds=1.0, max_seconds=4.0, clock=lambda: 0.0)
    assert h.probe(False, "ReadTimeout") is None and not h.ejected
    assert h.probe(True) is None
    assert h.probe(False, "ReadTimeout") is None and not h.ejected
    assert h.probe(False, "ReadTimeout") == "ejected" and h.ejected


def test_health_checks_eject_a_failing_server_and_readmit_it(fake):
    eng = engine(fake.base_url, "ok", health_check_period_seconds=0.1, ejection_base_seconds=0.2)
    eng._health_checks = True
    eng.start_health_checks()
    try:
        fake.healthy = False
        deadline = time.monotonic() + 5
        while not eng.health.ejected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.health.ejected and "503" in eng.health.reason
        fake.healthy = True
        while eng.health.ejected and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert not eng.health.ejected
    finally:
        fake.healthy = True
        asyncio.run(eng.close())


def job(rid: str) -> Job:
    return Job(request_id=rid, model="up", request=chat(rid), api_key_id="k")


def test_a_request_that_fails_before_any_token_is_retried_on_the_other_endpoint(fake):
    config = upstream_config([(fake.base_url, "http500"), (fake.base_url, "ok")],
                             ejection_base_seconds=60.0)

    async def main():
        fleet = UpstreamFleet(config)
        try:
            results = [await fleet.serving.run(job(f"req-{i}")) for i in range(3)]
            methods = fleet.ledger.method_breakdown("model")
            return (results, list(fleet.replicas.chosen), fleet.rows(), [e.health.ejected for e in fleet.engines()],
                    methods)
        finally:
            await fleet.aclose()

    results, chosen, rows, ejected, methods = asyncio.run(main())
    assert all(r.text == "".join(WORDS) for r in results)
    assert ejected == [True, False]
    # the first request met the failing endpoint first and was retried; later ones never go there
    assert chosen[0] == "up#0" and chosen[1:] == ["up#1"] * 3
    assert "retried on another endpoint" in results[0].routing["reason"]
    energy = results[0].energy
    assert energy.method == JPT_ESTIMATE_METHOD and energy.joules > 0
    # reports call it an estimate, never a measurement
    assert [(m["energy_method"], m["method_kind"]) for m in methods] == [(JPT_ESTIMATE_METHOD, "estimated")]
    assert sorted(r["request_id"] for r in rows if r["status"] == "ok") == ["req-0", "req-1", "req-2"]


def test_both_endpoints_failing_is_a_503_in_the_envelope_and_a_400_passes_through(fake):
    async def main():
        fleet = UpstreamFleet(upstream_config([(fake.base_url, "http500"), (fake.base_url, "no-such-model")]))
        try:
            with pytest.raises(ApiError) as down:
                await fleet.serving.run(job("req-down"))
        finally:
            await fleet.aclose()
        fleet = UpstreamFleet(upstream_config([(fake.base_url, "too-long"), (fake.base_url, "too-long")]))
        try:
            with pytest.raises(ApiError) as bad:
                await fleet.serving.run(job("req-bad"))
            rows = fleet.rows()
        finally:
            await fleet.aclose()
        return down.value, bad.value, rows

    down, bad, rows = asyncio.run(main())
    assert down.status == 503 and down.body()["error"]["code"] == "engine_error"
    assert "answered 500" in down.message and "does not serve model" in down.message
    assert bad.status == 400 and bad.body()["error"]["type"] == "invalid_request_error"
    assert "maximum context length" in bad.message
    assert [r["status"] for r in rows] == ["error"]  # the 400 is not retried: one request, one row


def test_a_stream_that_breaks_after_tokens_ends_in_an_error_not_a_retry(fake):
    async def main():
        fleet = UpstreamFleet(upstream_config([(fake.base_url, "truncated"), (fake.base_url, "ok")]))
        try:
            session = await fleet.serving.open(job("req-cut"))
            texts: list[str] = []
            with pytest.raises(ApiError) as exc:
                async for t in session.deltas():
                    texts.append(t)
            return texts, exc.value, fleet.rows()
        finally:
            await fleet.aclose()

    texts, err, rows = asyncio.run(main())
    # placement takes the first endpoint (equal figures: lowest index): the tokens sent stand, the end is an error
    assert texts == WORDS[:2] and err.status == 503 and "broke mid-response" in err.message
    assert [r["status"] for r in rows] == ["error"] and rows[0]["completion_tokens"] == 2


def test_the_servers_own_load_from_its_metrics_overrides_the_counts_seen_here(fake):
    from pathlib import Path

    from scheduler.engines.upstream_load import parse_server_metrics

    sample = Path(__file__).resolve().parents[2] / "data" / "upstream_metrics" / "vllm_v1_dp2_scrape1.txt"
    fake.metrics_text = sample.read_text()
    name = "meta-llama/Llama-3.1-8B-Instruct"  # the model the sample's samples are labelled with (the fake echoes it)
    ep = UpstreamEndpointConfig(base_url=fake.base_url, served_model_name=name, devices=["gpu0"], server="vllm")
    eng = UpstreamEngine("m", ModelKind.CHAT, ep, UpstreamOptions(), context_length=2048, health_checks=False)
    expected = parse_server_metrics(sample.read_text(), "vllm", model_name=name)

    async def main():
        assert eng.stats()["running"] == 0  # no scrape yet: the replica's own count
        [ev async for ev in eng.generate(chat())]  # the first request starts the poller on the replica's loop
        deadline = time.monotonic() + 5
        while eng.server_load() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stats = eng.stats()
        await eng.close()
        return stats

    try:
        stats = asyncio.run(main())
    finally:
        fake.metrics_text = None
    assert expected.running_requests is not None and expected.kv_cache_usage_fraction is not None
    assert stats["running"] == expected.running_requests and stats["waiting"] == expected.waiting_requests
    assert stats["kv_cache_free_fraction"] == pytest.approx(1 - expected.kv_cache_usage_fraction)
    assert not eng.load_poller.running


def test_a_server_without_metrics_has_no_poller_and_keeps_its_own_counts(fake):
    eng = engine(fake.base_url, "ok")  # generic: no metrics_url, no poller
    assert eng.load_poller is None and eng.server_load() is None


def test_a_retry_that_lands_on_the_endpoint_it_avoids_tries_again_and_reaches_the_other(fake):
    """Serve's FIFO router can hand the failed endpoint to the retry before its stats show it ejected."""
    config = upstream_config([(fake.base_url, "http500"), (fake.base_url, "ok")], ejection_base_seconds=60.0)

    async def main():
        fleet = UpstreamFleet(config)
        servers = fleet.replicas.servers
        remote = fleet.replicas.generate.remote
        calls = []

        def fifo_like(request, placement=None, deltas=True):  # the first two calls go to up#0 whatever the hint says
            calls.append(placement)
            if len(calls) <= 2:
                from tests.support.serving import InProcessStream, _over_the_wire

                fleet.replicas.chosen.append("up#0")
                return InProcessStream(servers[0].generate(_over_the_wire(request), placement=placement,
                                                           deltas=deltas))
            return remote(request, placement=placement, deltas=deltas)

        fleet.serving.handles["up"] = type("H", (), {"options": lambda self, **_: self,
                                                      "generate": type("G", (), {"remote": staticmethod(fifo_like)})()})()
        try:
            result = await fleet.serving.run(job("req-fifo"))
            return result, list(fleet.replicas.chosen), calls
        finally:
            await fleet.aclose()

    result, chosen, calls = asyncio.run(main())
    assert result.text == "".join(WORDS)
    assert chosen == ["up#0", "up#0", "up#1"]
    assert calls[1]["avoid_replicas"] == ["up#0"] and calls[2]["avoid_replicas"] == ["up#0"]

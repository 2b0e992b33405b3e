"""The serving core, fast and without Ray: the real Serving, ModelServer, NodeAgent accounting and
SimulatedEngine in one process (tests/support/serving.py); only Ray's handles are in-process stand-ins.

Every accepted request ends with one ledger row (ok, error or cancelled) that carries the work it
did; failures before the first event move to the next candidate; errors reach the client through
the one kind -> status mapping; SSE carries the energy and carbon in its last chunks.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from scheduler.api.errors import ApiError
from scheduler.api.serving import Job
from scheduler.cluster.messages import EnergyReport, ReplicaDelta, ReplicaEnd, ReplicaStart
from scheduler.engines.base import ContextLengthError, EngineError, GenerationRequest, ModelKind, SamplingParams
from tests.support.serving import Fleet, InProcessResponse, whole_call

SMALL, LARGE = "llama-3.1-8b", "llama-3.1-70b"


def job(rid: str = "chatcmpl-1", *, model: str = "auto", max_tokens: int = 4, priority: str | None = None) -> Job:
    request = GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": "hi"}],
                                params=SamplingParams(max_tokens=max_tokens))
    return Job(request_id=rid, model=model, request=request, api_key_id="k",
               controls={"priority": priority} if priority else {})


def test_the_prompt_these_tests_send_to_auto_reads_as_easy_to_the_shipped_predictor():
    """job() relies on "auto" picking the small model for "hi": a predictor that read it as needing the large one
    would fail the tests below for that reason, not theirs, so say so here."""
    from scheduler.config import load_config
    from scheduler.datafiles import sim_fleet_config
    from scheduler.routing.adequacy import load_predictor

    min_quality = load_config(sim_fleet_config()).routing.default_min_quality
    assert load_predictor().adequacy(job().request.messages[-1]["content"]) >= min_quality


def run(fleet_test, admission: str = "queue") -> Any:
    """Run `fleet_test(fleet)` on a fresh fleet and close it (abandoned requests settled first)."""
    import tempfile

    async def main():
        fleet = Fleet(Path(tempfile.mkdtemp()), admission=admission)
        try:
            return await fleet_test(fleet)
        finally:
            await fleet.aclose()

    return asyncio.run(main())


class DeadHandle:
    """A deployment whose replica died: the call fails before any event."""

    def __init__(self) -> None:
        self.calls = 0

    def options(self, **_: Any) -> "DeadHandle":
        return self

    @property
    def generate(self) -> "DeadHandle":
        return self

    def remote(self, request: Any, placement: Any = None, deltas: bool = True) -> "DeadHandle":
        self.calls += 1
        return self

    @property
    def generate_whole(self) -> SimpleNamespace:
        return SimpleNamespace(remote=whole_call(self.remote))

    def __aiter__(self) -> "DeadHandle":
        return self

    async def __anext__(self) -> Any:
        raise RuntimeError("actor died")

    def cancel(self) -> None:
        pass


def failing_engine(fleet: Fleet, model: str, error: BaseException, after_tokens: int) -> None:
    """Make the model's real engine fail after `after_tokens` tokens (the replica still settles the request)."""
    server = fleet.handles[model].server
    real = server.engine.generate

    async def generate(request):
        async for ev in real(request):
            if ev.completion_tokens > after_tokens:
                raise error
            yield ev

    server.engine.generate = generate


def test_a_chat_is_answered_with_energy_and_carbon_and_its_row_is_committed_before_the_answer():
    async def check(fleet: Fleet):
        began = time.monotonic()
        result = await fleet.serving.run(job())
        rows = fleet.rows()  # no wait: the row was durable before run() returned
        return result, rows, time.monotonic() - began

    result, rows, elapsed_s = run(check)
    assert result.model == SMALL and result.completion_tokens == 4 and result.finish_reason == "length"
    assert result.energy.method == "simulated" and result.energy.joules > 0
    assert result.carbon.gco2e > 0 and result.carbon.region == "FRA"
    assert [(r["request_id"], r["status"]) for r in rows] == [("chatcmpl-1", "ok")]
    # the simulator's counts say so, in the result and the row (engines name their counts' source)
    assert (result.prompt_tokens_method, result.completion_tokens_method) == ("simulated", "simulated")
    assert (rows[0]["prompt_tokens_method"], rows[0]["completion_tokens_method"]) == ("simulated", "simulated")
    assert rows[0]["joules"] == pytest.approx(result.energy.joules)
    assert rows[0]["gco2e"] == pytest.approx(result.carbon.gco2e)
    assert 0 <= result.ttft_seconds <= result.latency_seconds
    assert elapsed_s < 2.0, "the energy must not wait for a meter tick (the meter here never ticks)"


def test_a_replica_that_fails_before_its_first_event_is_retried_on_the_next_candidate():
    async def check(fleet: Fleet):
        dead = fleet.serving.handles[SMALL] = DeadHandle()
        result = await fleet.serving.run(job())
        return result, dead.calls, fleet.rows()

    result, calls, rows = run(check)
    assert calls == 1
    assert result.model == LARGE and f"retried on {LARGE} after {SMALL} failed" in result.routing["reason"]
    assert [(r["model"], r["status"]) for r in rows] == [(LARGE, "ok")]


class WrappedHandle:
    """A model's handle in front of the live one (handle.options(...).generate.remote(...)); a subclass's
    remote() decides what each call gets."""

    def __init__(self, live: Any) -> None:
        self.live, self.calls = live, 0

    def options(self, **_: Any) -> "WrappedHandle":
        return self

    @property
    def generate(self) -> "WrappedHandle":
        return self

    @property
    def generate_whole(self) -> SimpleNamespace:
        """A non-streaming request's unary call, in front of what remote() gives."""
        return SimpleNamespace(remote=whole_call(self.remote))


def test_a_replica_whose_node_left_is_retried_on_its_own_model_before_anything_is_sent():
    from scheduler.engines.base import EngineUnavailable

    async def check(fleet: Fleet):
        server = fleet.handles[SMALL].server
        real, calls = server.engine.generate, []

        async def generate(request):  # the first call finds the node agent gone, as on a lost node
            calls.append(1)
            if len(calls) == 1:
                raise EngineUnavailable("the node agent hosting it is gone (ActorDiedError)")
            async for ev in real(request):
                yield ev

        server.engine.generate = generate
        result = await fleet.serving.run(job(model=SMALL))
        return result, len(calls), fleet.rows()

    result, calls, rows = run(check)
    assert calls == 2 and result.model == SMALL and result.finish_reason == "length"
    assert "retried after" in result.routing["reason"] and "unavailable" in result.routing["reason"]
    assert [(r["model"], r["status"]) for r in rows] == [(SMALL, "ok")]


def test_the_retry_after_an_unavailable_replica_asks_the_router_to_pass_that_replica_over():
    """Serve's router keeps offering a live replica whose node agent left (by its last published stats)
    until the health probe fails it, so the retry's placement hint names it in avoid_replicas."""
    from scheduler.engines.base import EngineUnavailable

    async def check(fleet: Fleet):
        handle = fleet.handles[SMALL]
        server, placements = handle.server, []
        real, calls = server.engine.generate, []

        async def generate(request):
            calls.append(1)
            if len(calls) == 1:
                raise EngineUnavailable("the node agent hosting it is gone (ActorDiedError)")
            async for ev in real(request):
                yield ev

        class Recording(WrappedHandle):
            def remote(self, request: Any, placement: Any = None, deltas: bool = True) -> Any:
                placements.append(dict(placement or {}))
                return self.live.generate.remote(request, placement, deltas)

        server.engine.generate = generate
        fleet.serving.handles[SMALL] = Recording(handle)
        result = await fleet.serving.run(job(model=SMALL))
        return result, placements, server.replica_id, fleet.rows()

    result, placements, replica_id, rows = run(check)
    assert result.model == SMALL and result.finish_reason == "length"
    assert [p.get("avoid_replicas") for p in placements] == [None, [replica_id]]
    assert [(r["model"], r["status"]) for r in rows] == [(SMALL, "ok")]


def test_a_replica_actor_that_died_with_its_node_is_retried_on_its_own_model():
    from ray.exceptions import ActorDiedError

    class DiedOnce(WrappedHandle):
        """The model's handle: the first call meets a replica that died (Serve then drops it)."""

        def remote(self, request: Any, placement: Any = None, deltas: bool = True) -> Any:
            self.calls += 1
            return DeadStream() if self.calls == 1 else self.live.generate.remote(request, placement, deltas)

    class DeadStream:
        def __aiter__(self) -> "DeadStream":
            return self

        async def __anext__(self) -> Any:
            raise ActorDiedError()

        def cancel(self) -> None:
            pass

    async def check(fleet: Fleet):
        handle = fleet.serving.handles[SMALL] = DiedOnce(fleet.handles[SMALL])
        result = await fleet.serving.run(job(model=SMALL))
        return result, handle.calls, fleet.rows()

    result, calls, rows = run(check)
    assert calls == 2 and result.model == SMALL and "ActorDiedError" in result.routing["reason"]
    assert [(r["model"], r["status"]) for r in rows] == [(SMALL, "ok")]


def test_when_every_candidate_fails_the_answer_is_503_no_capacity_with_retry_after():
    async def check(fleet: Fleet):
        fleet.serving.handles[SMALL] = DeadHandle()
        fleet.serving.handles[LARGE] = DeadHandle()
        with pytest.raises(ApiError) as exc:
            await fleet.serving.run(job())
        return exc.value

    err = run(check)
    assert err.status == 503 and err.body()["error"]["code"] == "no_capacity"
    assert err.headers == {"Retry-After": "5"} and "RuntimeError" in err.body()["error"]["message"]


@pytest.mark.parametrize("error, after, status, code, param", [
    (EngineError("out of memory"), 2, 503, "engine_error", None),
    (TypeError("an engine bug"), 2, 503, "engine_error", None),
    (ContextLengthError(9000, 100, 8192), 0, 400, "context_length_exceeded", "messages"),
], ids=["engine-error-mid-stream", "engine-bug-mid-stream", "context-length-at-start"])
def test_replica_errors_reach_the_client_through_one_mapping_and_are_recorded_with_their_energy(
        error, after, status, code, param):
    async def check(fleet: Fleet):
        failing_engine(fleet, SMALL, error, after)
        with pytest.raises(ApiError) as exc:
            await fleet.serving.run(job(max_tokens=8))
        return exc.value, fleet.rows(), fleet.handles[LARGE].streams

    err, rows, large_streams = run(check)
    body = err.body()["error"]
    assert (err.status, body["code"], body["param"]) == (status, code, param)
    assert not large_streams, "a replica that answered is not retried elsewhere"
    assert [r["status"] for r in rows] == ["error"]
    assert min(after, 1) <= rows[0]["completion_tokens"] <= after  # the tokens the replica saw before it failed
    assert rows[0]["energy_method"] == "simulated" and rows[0]["joules"] is not None
    # an error row labels its counts too, once the engine produced an event (none before it)
    assert rows[0]["completion_tokens_method"] == ("simulated" if after else None)


def test_cascade_escalates_an_unsure_small_model_and_charges_both_attempts():
    async def check(fleet: Fleet):
        fleet.config.routing.cascade = True  # the simulated engine reports no log-probabilities: unsure
        result = await fleet.serving.run(job(priority="batch"))
        return result, fleet.rows()

    result, rows = run(check)
    assert result.model == LARGE and f"escalated from {SMALL} to {LARGE}" in result.routing["reason"]
    by_id = {r["request_id"]: r for r in rows}
    assert set(by_id) == {"chatcmpl-1", "chatcmpl-1-cascade"}
    assert by_id["chatcmpl-1"]["model"] == SMALL and by_id["chatcmpl-1-cascade"]["model"] == LARGE
    assert result.energy.joules == pytest.approx(by_id["chatcmpl-1"]["joules"] + by_id["chatcmpl-1-cascade"]["joules"])
    assert result.completion_tokens == 8


def test_a_client_that_disconnects_stops_the_generation_and_gets_a_cancelled_row_with_the_work_done(caplog):
    """Starlette cancels a streaming response's task group when the client goes away; every await
    after that is cancelled again. The row must still be written, with the energy the replica left."""
    async def check(fleet: Fleet):
        got: list[str] = []
        session = await fleet.serving.open(job(max_tokens=2000))
        async with anyio.create_task_group() as tg:
            async def consume():
                async for text in session.deltas():
                    got.append(text)
                    if len(got) == 3:
                        tg.cancel_scope.cancel()  # the client disconnected
            tg.start_soon(consume)
        await fleet.serving.settled()
        stream = fleet.handles[SMALL].streams[0]
        return got, fleet.rows(), stream.cancelled, fleet.agent.attributor.running()

    with caplog.at_level(logging.WARNING):
        got, rows, cancelled, running = run(check)
    assert cancelled, "the generation must be stopped"
    assert running == 0, "the node agent settled the request"
    assert [r["status"] for r in rows] == ["cancelled"]
    assert rows[0]["joules"] > 0 and rows[0]["energy_method"] == "simulated"
    assert 3 <= rows[0]["completion_tokens"] < 2000
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client that left"


@pytest.mark.parametrize("leave", ["at the last text", "while the row is written"])
def test_a_client_that_leaves_after_the_work_finished_gets_one_row(leave):
    """A stream whose client left once the replica had finished got two rows, 'ok' and 'cancelled', each
    with the whole request's joules: its energy counted twice (load test, 2 of 80 abandoned streams)."""
    async def check(fleet: Fleet):
        got: list[str] = []
        session = await fleet.serving.open(job(max_tokens=3))
        async with anyio.create_task_group() as tg:
            async def consume():
                async for text in session.deltas():
                    got.append(text)
                    if leave == "at the last text" and session._end is not None:
                        tg.cancel_scope.cancel()  # the client left as the last piece reached it
                    elif leave == "while the row is written" and session._end is not None:
                        await asyncio.sleep(0)
                        tg.cancel_scope.cancel()
            tg.start_soon(consume)
        await fleet.serving.settled()
        return fleet.rows()

    rows = run(check)
    assert [r["status"] for r in rows] == ["ok"], rows
    assert rows[0]["joules"] > 0 and rows[0]["completion_tokens"] == 3


def test_a_client_that_leaves_before_the_first_event_still_gets_a_row(monkeypatch):
    # no replica ever had the request: the agents are asked for the whole wait, shortened here
    monkeypatch.setattr("scheduler.api.accounting.ABANDONED_WAIT_SECONDS", 0.5)

    class Silent(DeadHandle):
        async def __anext__(self) -> Any:
            await asyncio.sleep(3600)

    async def check(fleet: Fleet):
        fleet.serving.handles[SMALL] = Silent()
        task = asyncio.create_task(fleet.serving.open(job()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await fleet.serving.settled()
        return fleet.rows()

    assert [r["status"] for r in run(check)] == ["cancelled"]


class ScriptedHandle(DeadHandle):
    """A deployment that answers with given events (typed, as the replica sends them), `gap_s` apart."""

    def __init__(self, events: list[Any], gap_s: float):
        super().__init__()
        self.events, self.gap_s = list(events), gap_s

    async def __anext__(self) -> Any:
        if not self.events:
            raise StopAsyncIteration
        if self.calls and len(self.events) < 5:
            await asyncio.sleep(self.gap_s)
        return self.events.pop(0)


def test_ttft_and_latency_are_measured_on_the_gateways_clock():
    """The engine stamps events on its own clock (another machine's, or simulated time that lags
    behind): those stamps must not be mixed with the gateway's. TTFT >= 0 and TTFT <= latency."""
    skew = -6.3
    energy = EnergyReport(4.0, 3.0, 1.0, "simulated", "gpu", "gpu0", "n1", True, True, 3.0)
    events = [ReplicaStart("small#0", "gpu0", "n1", skew), ReplicaDelta("", 10, 0, skew),
              ReplicaDelta("a ", 10, 1, skew + 0.01), ReplicaDelta("b ", 10, 2, skew + 0.02),
              ReplicaEnd("c ", 10, 3, "length", skew + 0.03, None, energy)]

    async def check(fleet: Fleet):
        fleet.serving.handles[SMALL] = ScriptedHandle(events, gap_s=0.05)
        return await fleet.serving.run(job()), fleet.rows()

    result, rows = run(check)
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["joules"] == pytest.approx(4.0)
    assert 0.05 <= result.ttft_seconds <= result.latency_seconds
    assert result.latency_seconds >= 0.15
    assert result.tpot_seconds == pytest.approx((result.latency_seconds - result.ttft_seconds) / 2, abs=0.02)


# --- through HTTP: the routes' SSE framing over the same serving path ---------------------------------


def _events(lines: list[str]) -> list[Any]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_sse_stream_frames_chunks_and_puts_usage_energy_and_carbon_last(tmp_path):
    from fastapi.testclient import TestClient

    from tests.support.gateway_app import bearer, build

    app, gw = build(tmp_path)
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with TestClient(app) as client:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=bearer("client")) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                raw = list(r.iter_lines())
                rows_at_end = gw.ledger.requests(limit=None)
    finally:
        gw.close()
    events = _events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    rid = r.headers["x-request-id"]
    assert all(c["id"] == rid and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert len(text.split()) == 5
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["energy"]["method"] == "simulated" and final["carbon"]["gco2e"] > 0
    assert final["choices"][0]["logprobs"]["energy"] == final["energy"]  # where LangChain keeps it
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["energy"] == final["energy"] and usage["usage"]["carbon"] == final["carbon"]
    # the ledger row was committed before the last byte
    assert [(x["request_id"], x["status"]) for x in rows_at_end] == [(rid, "ok")]
    assert rows_at_end[0]["joules"] == pytest.approx(final["energy"]["joules"])


def test_an_error_after_the_headers_is_reported_in_band_in_the_envelope(tmp_path):
    from fastapi.testclient import TestClient

    from tests.support.gateway_app import bearer, build

    app, gw = build(tmp_path)
    failing_engine(gw.fleet, SMALL, EngineError("out of memory"), 2)
    body = {"model": SMALL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    try:
        with TestClient(app) as client:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=bearer("client")) as r:
                raw = list(r.iter_lines())
    finally:
        gw.close()
    events = _events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": f"model {SMALL} failed: out of memory", "type": "service_unavailable",
                                    "param": None, "code": "engine_error"}}


def test_background_ledger_work_runs_outside_the_request_context():
    """Ray cancels the remote calls of a cancelled request's task, found through context variables: the
    abandoned request's settle task inherited them, its call to the node agent was cancelled, and the
    cancelled row had no energy (fresh-clone CI run, 1 in 2)."""
    request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="none")

    async def check(fleet: Fleet):
        request_var.set("the request's task")
        seen = []

        async def background():
            seen.append(request_var.get())

        await fleet.serving._in_background(background(), "probe")
        return seen

    assert run(check) == ["none"]


def test_a_non_streaming_answer_is_one_unary_call_and_still_dates_its_first_token():
    """A non-streaming chat needs nothing before its end: one unary call whose answer is the end event with
    the whole text and the start, whatever the length (a streaming call costs more Ray work, even for one
    item), and the first token is dated from the replica's own measure, so TTFT is not the whole latency."""
    async def check(fleet: Fleet):
        result = await fleet.serving.run(job("chatcmpl-1", model=SMALL, max_tokens=12))
        session = await fleet.serving.open(job("chatcmpl-2", model=SMALL, max_tokens=12))
        streamed = [text async for text in session.deltas()]
        handle = fleet.handles[SMALL]
        answers = [await call for call in handle.calls]
        return result, session.result, streamed, answers, handle.streams, fleet.rows()

    result, streamed_result, streamed, answers, streams, rows = run(check)
    assert [type(a) for a in answers] == [ReplicaEnd] and answers[0].start is not None
    assert len(streams) == 1, "only the streaming request is a stream"
    assert any(isinstance(ev, ReplicaDelta) and ev.text for ev in streams[0].sent), "a stream still gets deltas"
    assert result.completion_tokens == streamed_result.completion_tokens == 12
    assert result.text and len(result.text) == len("".join(streamed))
    assert result.routing["device"] == answers[0].start.device
    assert 0 < result.ttft_seconds < result.latency_seconds
    assert result.tpot_seconds == pytest.approx((result.latency_seconds - result.ttft_seconds) / 11)
    by_id = {r["request_id"]: r for r in rows}
    assert [by_id[k]["status"] for k in ("chatcmpl-1", "chatcmpl-2")] == ["ok", "ok"]
    assert by_id["chatcmpl-1"]["joules"] == pytest.approx(result.energy.joules)


def test_with_slo_admission_a_non_streaming_request_is_a_stream_and_a_short_one_sends_one_event():
    """Admission "slo" predicts waits from how fast Serve starts requests, so it must hear each start as it
    happens: the request stays a stream (each item a Ray round), and a short one sends one item, its end."""
    async def check(fleet: Fleet):
        result = await fleet.serving.run(job(max_tokens=1))
        starts = fleet.serving.selection.starts
        handle = fleet.handles[SMALL]
        return (result, handle.streams[0].sent, handle.calls, starts.pending(SMALL),
                starts.start_rate_per_second(SMALL))

    result, sent, calls, pending, start_rate = run(check, admission="slo")
    assert calls == [] and [type(ev) for ev in sent] == [ReplicaEnd]
    assert sent[0].start is not None and sent[0].start.replica == f"{SMALL}#0"
    assert result.routing["device"] == sent[0].start.device and result.energy.joules > 0
    assert pending == 0 and start_rate > 0, "admission counted the request as started, not as still queued"


def test_a_unary_request_is_counted_started_when_it_is_answered():
    async def check(fleet: Fleet):
        await fleet.serving.run(job(max_tokens=1))
        starts = fleet.serving.selection.starts
        return starts.pending(SMALL), starts.start_rate_per_second(SMALL)

    pending, start_rate = run(check)
    assert pending == 0 and start_rate > 0


def test_with_slo_admission_a_long_request_without_deltas_sends_its_start_once_it_has_run_a_while():
    from scheduler.cluster.replica import START_EVENT_DELAY_SECONDS

    async def check(fleet: Fleet):
        task = asyncio.create_task(fleet.serving.run(job(max_tokens=2000)))
        await asyncio.sleep(START_EVENT_DELAY_SECONDS * 3)
        sent_while_running = list(fleet.handles[SMALL].streams[0].sent)
        pending_while_running = fleet.serving.selection.starts.pending(SMALL)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return sent_while_running, pending_while_running

    sent, pending = run(check, admission="slo")
    assert [type(ev) for ev in sent] == [ReplicaStart]
    assert pending == 0, "admission saw the start while the request ran"


@pytest.mark.parametrize("admission", ["queue", "slo"])
def test_a_request_that_outlives_the_replica_timeout_is_stopped_charged_and_retried_on_the_next_candidate(
        admission):
    """The attempt that timed out is stopped on its replica and its work gets a row of its own; the retry,
    on the same node agent, is charged its own work (it once got the first attempt's joules, being the same
    request id to the agent, and its own work went unattributed). A unary call (admission "queue") is
    answered whole, so replica_timeout_seconds bounds the whole request; a stream's, its start and then its end."""
    async def check(fleet: Fleet):
        fleet.config.routing.replica_timeout_seconds = 0.3
        server = fleet.handles[SMALL].server
        real = server.engine.generate

        async def stalls(request):  # the small model takes its prompt, then stalls (a stuck engine)
            async for ev in real(request):
                yield ev
                await asyncio.sleep(3600)

        server.engine.generate = stalls
        result = await fleet.serving.run(job(max_tokens=4))
        await fleet.serving.settled()
        handle = fleet.handles[SMALL]
        balance = fleet.agent.attributor.balance()
        return (result, handle.calls[0] if admission == "queue" else handle.streams[0], fleet.rows(),
                fleet.agent.attributor.running(), balance.dynamic_joules + balance.idle_assigned_joules)

    result, first_call, rows, running, charged = run(check, admission=admission)
    assert first_call.cancelled, "the attempt that timed out was cancelled, and its request stopped on the replica"
    assert result.model == LARGE and f"retried on {LARGE} after {SMALL} failed" in result.routing["reason"]
    assert running == 0
    assert sorted((r["model"], r["status"], r["request_id"]) for r in rows) == [
        (LARGE, "ok", "chatcmpl-1"), (SMALL, "error", "chatcmpl-1-failed-attempt")]
    by_model = {r["model"]: r for r in rows}
    assert by_model[SMALL]["joules"] > 0 and by_model[SMALL]["prompt_tokens"] > 0
    assert by_model[LARGE]["joules"] == pytest.approx(result.energy.joules) and result.energy.device != \
        by_model[SMALL]["device"], "the retry is charged its own work, on its own GPUs"
    assert sum(r["joules"] for r in rows) == pytest.approx(charged), "every joule the agent charged is in a row"


def test_an_attempt_that_timed_out_before_its_replica_ran_it_leaves_no_row(monkeypatch):
    """Stuck in Serve's queue, it did no work: a row for it would count as a request of its own."""
    from scheduler.api import accounting

    monkeypatch.setattr(accounting, "ABANDONED_WAIT_SECONDS", 0.2)

    class StuckInQueue(WrappedHandle):
        @property
        def generate_whole(self) -> SimpleNamespace:
            def remote(request: Any, placement: Any = None) -> InProcessResponse:
                self.calls += 1
                return InProcessResponse(asyncio.sleep(3600))

            return SimpleNamespace(remote=remote)

    async def check(fleet: Fleet):
        fleet.config.routing.replica_timeout_seconds = 0.3
        fleet.serving.handles[SMALL] = StuckInQueue(fleet.handles[SMALL])
        result = await fleet.serving.run(job(max_tokens=4))
        await fleet.serving.settled()
        return result, fleet.rows()

    result, rows = run(check)
    assert result.model == LARGE
    assert [(r["model"], r["status"], r["request_id"]) for r in rows] == [(LARGE, "ok", "chatcmpl-1")]


@pytest.mark.parametrize("admission", ["queue", "slo"])
def test_a_request_without_deltas_whose_client_leaves_before_its_start_arrived_gets_a_row_with_the_work_done(
        admission):
    """Its start has not reached the gateway, so the gateway does not know the node: the agents are asked
    (a unary call, admission "queue", brings its start only with its end; a stream sends it after a while)."""
    from scheduler.cluster.replica import START_EVENT_DELAY_SECONDS

    async def check(fleet: Fleet):
        task = asyncio.create_task(fleet.serving.run(job(max_tokens=2000)))
        await asyncio.sleep(START_EVENT_DELAY_SECONDS / 2)
        handle = fleet.handles[SMALL]
        if admission == "slo":
            assert handle.streams[0].sent == []  # nothing reached the gateway yet
        else:
            assert not handle.calls[0]._task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await fleet.serving.settled()
        return fleet.rows(), fleet.agent.attributor.running()

    rows, running = run(check, admission=admission)
    assert running == 0, "the node agent settled the request"
    assert [r["status"] for r in rows] == ["cancelled"]
    assert rows[0]["joules"] > 0 and rows[0]["energy_method"] == "simulated"

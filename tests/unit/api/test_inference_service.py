"""The gateway's inference path with an in-process replica stream: every accepted request ends with
one ledger row (ok, error or cancelled) that carries the work it did, and its timing is consistent."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from scheduler.api.errors import ApiError
from scheduler.api.inference import InferenceService, Job
from scheduler.api.router import Routed
from scheduler.routing.admission import StartQueue

ENERGY = {"joules": 4.0, "dynamic_joules": 3.0, "idle_joules": 1.0, "method": "simulated", "scope": "gpu",
          "device": "gpu0", "node": "n1", "power_limit_watts": 300.0}


class FakeEvents:
    """A Serve response stream: the replica's event dicts, one every `gap_s` seconds."""

    def __init__(self, events: list[dict[str, Any]], gap_s: float = 0.0, hang_after: int | None = None):
        self._events = list(events)
        self.gap_s = gap_s
        self.hang_after = hang_after
        self.sent = 0
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.hang_after is not None and self.sent >= self.hang_after:
            await asyncio.sleep(3600)  # a long generation the client will not wait for
        if self.sent and self.gap_s:
            await asyncio.sleep(self.gap_s)
        if not self._events:
            raise StopAsyncIteration
        self.sent += 1
        return self._events.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, streams: list[FakeEvents]):
        self.streams = streams
        self.calls = 0

    def options(self, **_: Any) -> "FakeHandle":
        return self

    @property
    def generate(self) -> "FakeHandle":
        return self

    def remote(self, payload: dict[str, Any], placement: Any = None) -> FakeEvents:
        self.calls += 1
        return self.streams.pop(0)


class FakeGateway:
    def __init__(self, handles: dict[str, FakeHandle], abandoned: dict[str, Any] | None = None):
        self.config = SimpleNamespace(routing=SimpleNamespace(replica_timeout_seconds=5.0))
        self.model_handles = handles
        self.router = SimpleNamespace(starts=StartQueue())  # admission's view of dispatched-not-started requests
        self.rows: list[tuple[str, Any]] = []
        self.abandoned = abandoned
        self.abandoned_asked: list[tuple[str | None, str]] = []

    def ensure_refresher(self) -> None:
        pass

    def replicas_by_model(self) -> None:
        return None

    async def carbon_for(self, energy: dict[str, Any], t_s: float) -> dict[str, Any]:
        return {"gco2e": energy["joules"] * 1e-4, "intensity_gco2e_per_kwh": 360.0, "pue": 1.0, "source": "fixed",
                "region": "XX"}

    async def record(self, job: Job, result: Any, status: str, energy_raw: Any = None) -> None:
        self.rows.append((status, result))

    async def abandoned_outcome(self, node: str | None, request_id: str) -> dict[str, Any] | None:
        self.abandoned_asked.append((node, request_id))
        return self.abandoned


def routed(model: str = "small", fallbacks: tuple[str, ...] = ("large",)) -> Routed:
    decision = SimpleNamespace(fallbacks=[(m, "") for m in fallbacks], next_model=None)
    return Routed(model=model, reason="test", controls=SimpleNamespace(priority=None), decision=decision)


def job() -> Job:
    return Job(request_id="chatcmpl-1", endpoint="chat", model="small", api_key_id="k",
               payload={"request_id": "chatcmpl-1", "kind": "chat", "messages": [], "params": {}})


START = {"type": "start", "replica": "small#0", "device": "gpu0", "node": "n1", "time_s": 0.0}


def delta(n: int, t: float) -> dict[str, Any]:
    return {"type": "delta", "text": "w ", "prompt_tokens": 10, "completion_tokens": n, "time_s": t}


def test_client_disconnect_records_a_cancelled_row_with_the_work_done(caplog):
    """Starlette cancels a streaming response's task group when the client goes away; every await
    after that is cancelled again. The row must still be written, with the energy the replica left."""
    stream = FakeEvents([START, delta(0, 0.0), delta(1, 0.0), delta(2, 0.0), delta(3, 0.0)], hang_after=4)
    gw = FakeGateway({"small": FakeHandle([stream])},
                     abandoned={"energy": ENERGY, "prompt_tokens": 10, "completion_tokens": 7})
    service = InferenceService(gw)
    got: list[str] = []

    async def main():
        session = await service.open(job(), routed())
        async with anyio.create_task_group() as tg:
            async def consume():
                async for text in session.deltas():
                    got.append(text)
                    if len(got) == 2:
                        tg.cancel_scope.cancel()  # the client disconnected
            tg.start_soon(consume)
        await service.settled()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert stream.cancelled, "the generation must be stopped"
    assert [s for s, _ in gw.rows] == ["cancelled"]
    result = gw.rows[0][1]
    assert result.energy["joules"] == pytest.approx(4.0) and result.carbon["gco2e"] > 0
    assert (result.prompt_tokens, result.completion_tokens) == (10, 7)
    assert gw.abandoned_asked == [("n1", "chatcmpl-1")]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client that left"


def test_client_disconnect_before_the_first_event_still_records_a_row():
    stream = FakeEvents([START], hang_after=1)
    gw = FakeGateway({"small": FakeHandle([stream])})
    service = InferenceService(gw)

    async def main():
        task = asyncio.create_task(service.open(job(), routed()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await service.settled()

    asyncio.run(main())
    assert stream.cancelled
    assert [s for s, _ in gw.rows] == ["cancelled"]


def test_error_mid_stream_records_the_energy_and_tokens_of_the_work_done():
    error = {"type": "error", "status": 503, "message": "model small failed: boom", "param": None,
             "code": "engine_error", "prompt_tokens": 10, "completion_tokens": 3, "energy": ENERGY}
    stream = FakeEvents([START, delta(0, 0.0), delta(2, 0.0), error])
    gw = FakeGateway({"small": FakeHandle([stream])})
    service = InferenceService(gw)

    async def main():
        session = await service.open(job(), routed())
        with pytest.raises(ApiError) as exc:
            async for _ in session.deltas():
                pass
        return exc.value

    err = asyncio.run(main())
    assert err.status == 503
    assert [s for s, _ in gw.rows] == ["error"]
    result = gw.rows[0][1]
    assert result.energy["joules"] == pytest.approx(4.0)
    assert (result.prompt_tokens, result.completion_tokens) == (10, 3)


def test_an_error_as_first_event_is_recorded_and_not_retried_elsewhere():
    error = {"type": "error", "status": 503, "message": "model small failed: TypeError", "param": None,
             "code": "engine_error", "prompt_tokens": 0, "completion_tokens": 0, "energy": ENERGY}
    small, large = FakeHandle([FakeEvents([START, error])]), FakeHandle([])
    gw = FakeGateway({"small": small, "large": large})
    service = InferenceService(gw)

    with pytest.raises(ApiError) as exc:
        asyncio.run(service.open(job(), routed()))
    assert exc.value.status == 503 and large.calls == 0
    assert [s for s, _ in gw.rows] == ["error"] and gw.rows[0][1].energy["joules"] == pytest.approx(4.0)


def test_a_stream_that_dies_mid_way_answers_in_the_envelope_and_is_recorded():
    class Dying(FakeEvents):
        async def __anext__(self):
            if self.sent == 3:
                raise RuntimeError("actor died")
            return await super().__anext__()

    gw = FakeGateway({"small": FakeHandle([Dying([START, delta(0, 0.0), delta(1, 0.0), delta(2, 0.0)])])})
    service = InferenceService(gw)

    async def main():
        session = await service.open(job(), routed())
        async for _ in session.deltas():
            pass

    with pytest.raises(ApiError) as exc:
        asyncio.run(main())
    assert exc.value.status == 503 and exc.value.body()["error"]["code"] == "engine_error"
    assert [s for s, _ in gw.rows] == ["error"]
    assert gw.rows[0][1].completion_tokens == 1


def test_ttft_and_latency_are_measured_on_one_clock():
    """The engine stamps events on its own clock (another machine's, or simulated time that lags
    behind): those stamps must not be mixed with the gateway's. TTFT >= 0 and TTFT <= latency."""
    skew = -6.3  # the engine's clock runs 6.3 s behind the gateway's
    events = [START, delta(0, skew), delta(1, skew + 0.01), delta(2, skew + 0.02),
              {"type": "end", "text": "", "prompt_tokens": 10, "completion_tokens": 3, "finish_reason": "length",
               "time_s": skew + 0.03, "mean_logprob": None, "energy": ENERGY}]
    gw = FakeGateway({"small": FakeHandle([FakeEvents(events, gap_s=0.05)])})
    service = InferenceService(gw)

    async def main():
        session = await service.open(job(), routed())
        async for _ in session.deltas():
            pass
        return session.result

    result = asyncio.run(main())
    assert [s for s, _ in gw.rows] == ["ok"]
    assert 0.05 <= result.ttft_seconds <= result.latency_seconds
    assert result.latency_seconds >= 0.15
    assert result.tpot_seconds == pytest.approx((result.latency_seconds - result.ttft_seconds) / 2, abs=0.02)


@pytest.mark.parametrize("fields", [{}, {"max_tokens": None, "temperature": None, "top_p": None, "stop": None,
                                         "seed": None, "stream_options": None, "user": None}],
                         ids=["left-out", "null"])
def test_optional_sampling_fields_reach_the_simulated_engine_as_valid_params(fields):
    """The schema fuzz found chats without max_tokens failing with 503 on the simulated fleet."""
    from scheduler.api.protocol import ChatCompletionRequest
    from scheduler.api.routes.inference import _params
    from scheduler.config import load_config
    from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
    from scheduler.engines.simulated import build_simulated_engine
    from scheduler.datafiles import sim_fleet_config

    body = ChatCompletionRequest(model="auto", messages=[{"role": "user", "content": "hi"}], **fields)
    params = SamplingParams(**_params(body, body.effective_max_tokens()))
    cfg = load_config(sim_fleet_config())

    async def main():
        eng = build_simulated_engine(cfg.models[0], cfg, {})
        gen = eng.generate(GenerationRequest("fuzz", ModelKind.CHAT, messages=[{"role": "user", "content": "hi"}],
                                             params=params))
        first = await gen.__anext__()
        await gen.aclose()
        await eng.close()
        return first

    first = asyncio.run(main())
    assert first.completion_tokens >= 1

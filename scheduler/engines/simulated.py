"""The simulated engine behind the real gateway: the shared BatchCore driven by wall-clock time in asyncio.

It generates placeholder text (one short word per token) of exactly the length a real engine would
(max_tokens, or force_output_tokens for replays) at the pace the calibrated model predicts for the
current batch, and drives its SimulatedGpu devices so the meter reads simulated joules that follow
the work. Nothing here pretends to be a language model: responses say so through their text and
every energy figure carries method "simulated".
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from scheduler.config import ModelConfig, WattlaneConfig
from scheduler.devices.simulated import SimulatedGpu
from scheduler.engines.base import (
    Engine,
    EngineError,
    EngineEvent,
    GenerationRequest,
    ModelKind,
    ReplicaStats,
    RequestRejectedError,
    TokenCountMethod,
)
from scheduler.sim.builders import build_core, replica_device_groups
from scheduler.sim.core import BatchCore, CoreListener, RecentLatencies, SimRequest, replica_stats

#: the placeholder vocabulary; each word stands for one generated token
PLACEHOLDER_WORDS = ("sim", "token", "watt", "lane", "joule", "batch", "clock", "decode")


def placeholder_text(start: int, count: int) -> str:
    return "".join(PLACEHOLDER_WORDS[i % len(PLACEHOLDER_WORDS)] + " " for i in range(start, start + count))


class _Listener(CoreListener):
    def __init__(self, engine: "SimulatedEngine"):
        self.engine = engine

    def on_finish(self, req: SimRequest, now: float) -> None:
        self.engine._recent.add(req)


class SimulatedEngine(Engine):
    """Continuous batching on simulated GPUs in real time (one instance per replica)."""

    token_counts_method = TokenCountMethod.SIMULATED.value

    def __init__(
        self,
        model_id: str,
        kind: ModelKind,
        core: BatchCore,
        context_length: int,
        *,
        replica_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.model_id = model_id
        self.kind = kind
        self.context_length = context_length
        self.core = core
        self.replica_id = replica_id or f"{model_id}#0"
        self._clock = clock
        self._recent = RecentLatencies()
        core.listener = _Listener(self)
        self._wake_at: float | None = None
        self._changed = asyncio.Event()
        self._progress: dict[SimRequest, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        for g in core.gpus:
            g.add_settings_listener(self._settings_changed)

    # --- Engine ---------------------------------------------------------------------------------
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The hint when given (trace replay), else ~4 characters per token plus the chat template."""
        if request.prompt_tokens_hint is not None:
            return int(request.prompt_tokens_hint)
        if request.prompt_token_ids is not None:
            return max(1, len(request.prompt_token_ids))
        if request.messages is not None:
            chars = sum(len(m.get("content") or "") for m in request.messages)
            return max(1, chars // 4 + 4 * len(request.messages) + 1)
        return max(1, len(request.prompt or "") // 4)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        prompt = self.check_fits(request)
        params = request.params
        if params.response_format is not None:  # routing keeps JSON requests off simulated models (supports_json)
            raise RequestRejectedError(f"model {self.model_id} is simulated: its text is filler and cannot follow "
                                       "response_format", param="response_format")
        if params.return_logprobs:
            raise RequestRejectedError(f"model {self.model_id} is simulated: its placeholder tokens have no "
                                       "log-probabilities", param="logprobs")
        out = params.force_output_tokens or self.resolve_max_tokens(request, prompt)
        if out < 1:
            yield EngineEvent("", prompt, 0, self._clock(), finished=True, finish_reason="length")
            return
        self._ensure_task()
        now = self._clock()
        self._catch_up(now)
        req = SimRequest(request.request_id or f"sim-{next(self._ids)}", prompt, out, now, model_id=self.model_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._progress[req] = queue
        self._reschedule(self.core.submit(req, now))
        sent = 0
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"simulated engine stopped: {item}") from item
                generated, t = item
                if generated > sent:
                    done = generated >= out
                    yield EngineEvent(
                        placeholder_text(sent, generated - sent), prompt, generated, t,
                        finished=done, finish_reason="length" if done else None,
                    )
                    sent = generated
                    if done:
                        return
        finally:
            self._progress.pop(req, None)
            if req.state != "done":
                self.core.cancel(req, self._clock())

    def stats(self) -> ReplicaStats:
        return ReplicaStats(**replica_stats(self.core, self.model_id, self.replica_id, self._recent, self._clock()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        for g in self.core.gpus:
            g.set_idle()
            g.attach_model(False)

    # --- the clock loop -------------------------------------------------------------------------
    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._changed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sim-engine-{self.replica_id}")

    def _reschedule(self, t: float | None) -> None:
        self._wake_at = t
        self._changed.set()

    def _settings_changed(self, _gpu: SimulatedGpu) -> None:
        # the governor changes settings from its own thread: re-plan on the engine's event loop
        loop = self._task.get_loop() if self._task is not None else None
        if loop is None or loop.is_closed():
            self.core.replan_after_settings_change(self._clock())
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._reschedule(self.core.replan_after_settings_change(self._clock()))
        else:
            loop.call_soon_threadsafe(lambda: self._reschedule(self.core.replan_after_settings_change(self._clock())))

    def _step(self) -> None:
        """End the segment due at _wake_at, plan the next, and tell every waiting request its progress."""
        t = self._wake_at
        assert t is not None
        self._wake_at = self.core.advance(t)
        for req, queue in self._progress.items():
            queue.put_nowait((self.core.generated(req), t))

    def _catch_up(self, now: float) -> None:
        """Play the segments that should have ended by `now` (the loop ran late) before a new arrival,
        so the core never schedules work that arrived at `now` in its past (negative TTFT)."""
        while self._wake_at is not None and self._wake_at <= now:
            self._step()

    async def _run(self) -> None:
        try:
            while True:
                self._changed.clear()
                if self._wake_at is None:
                    await self._changed.wait()
                    continue
                delay = self._wake_at - self._clock()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=delay)
                    except asyncio.TimeoutError:
                        pass
                    continue  # re-planned, caught up or due: the clock decides on the next pass
                self._step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surface to every waiting request rather than hanging them
            for queue in self._progress.values():
                queue.put_nowait(exc)
            raise


def build_simulated_engine(model: ModelConfig, config: WattlaneConfig, devices: dict, replica_index: int = 0) -> SimulatedEngine:
    """The engine for replica `replica_index` of `model`, on the SimulatedGpu objects in `devices`.

    Devices not in `devices` are created from config.devices.simulated (the node agent normally
    owns them and passes them in, so the meter and the governor see the same objects).
    """
    pool = dict(devices)
    for d in config.devices.simulated:
        if d.id not in pool:
            pool[d.id] = SimulatedGpu(d.id, d.profile, node=d.node)
    key = f"models (id {model.id})"
    groups = replica_device_groups(model, config, pool, key=key)
    gpus = groups[replica_index % len(groups)]
    core = build_core(model, config, gpus, key=key)
    return SimulatedEngine(model.id, ModelKind(model.kind), core, model.context_length, replica_id=f"{model.id}#{replica_index % len(groups)}")


def build_simulated_replica_engine(model: ModelConfig, config: WattlaneConfig, state_dir: Path, devices: dict | None = None,
                                   replica_index: int = 0) -> SimulatedEngine:
    """The registered builder (engines/base.py ENGINE_BUILDERS); simulated engines keep no state on disk."""
    return build_simulated_engine(model, config, devices or {}, replica_index=replica_index)

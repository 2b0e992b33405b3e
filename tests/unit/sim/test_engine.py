"""The real-time simulated engine: placeholder text of the right length, stats, simulated energy."""

import asyncio
import time

from scheduler.config import load_config
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.engines.simulated import build_simulated_engine
from scheduler.datafiles import sim_fleet_config


def test_generates_exact_token_counts_and_meters_energy():
    cfg = load_config(sim_fleet_config())

    async def main():
        eng = build_simulated_engine(cfg.models[0], cfg, {})
        gpu = eng.core.gpus[0]
        e0 = gpu.energy_joules()

        async def one(i, n, forced=None):
            text, events = "", []
            req = GenerationRequest(f"r{i}", ModelKind.CHAT, messages=[{"role": "user", "content": "hi " * 100}],
                                    params=SamplingParams(max_tokens=n, force_output_tokens=forced))
            async for ev in eng.generate(req):
                events.append(ev)
                text += ev.text
            first_token_s = next(ev.time_s for ev in events if ev.completion_tokens > 0)
            tpot_seconds = (events[-1].time_s - first_token_s) / (events[-1].completion_tokens - 1)
            return len(text.split()), events[-1].completion_tokens, tpot_seconds

        results = await asyncio.gather(one(0, 30), one(1, 40), one(2, 500, forced=12))
        stats = eng.stats()
        energy = gpu.energy_joules() - e0
        await eng.close()
        return results, stats, energy

    results, stats, energy = asyncio.run(main())
    assert [r[0] for r in results] == [30, 40, 12]
    assert [r[1] for r in results] == [30, 40, 12]
    assert all(0.004 < r[2] < 0.05 for r in results)
    assert stats["requests_completed"] == 3 and stats["running"] == 0
    assert stats["joules_per_decode_token"] > 0 and stats["prefill_tokens_per_second"] > 1000
    assert energy > 0


def test_request_without_max_tokens_gets_the_default_length():
    """A client that leaves max_tokens (and the other sampling fields) out still gets an answer."""
    from scheduler.engines.base import DEFAULT_MAX_TOKENS

    cfg = load_config(sim_fleet_config())

    async def main():
        eng = build_simulated_engine(cfg.models[0], cfg, {})
        req = GenerationRequest("no-max", ModelKind.CHAT, messages=[{"role": "user", "content": "hi"}],
                                params=SamplingParams(max_tokens=None, seed=None, stop=[]))
        events = [ev async for ev in eng.generate(req)]
        await eng.close()
        return events

    events = asyncio.run(main())
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == DEFAULT_MAX_TOKENS


def test_event_times_never_precede_arrival_when_the_loop_runs_late():
    """If the engine's loop falls behind (a busy event loop), a new arrival must not be scheduled in the
    past: its first token is stamped at or after the time it arrived (TTFT >= 0)."""
    cfg = load_config(sim_fleet_config())
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    async def main():
        from scheduler.engines.simulated import SimulatedEngine

        base = build_simulated_engine(cfg.models[0], cfg, {})
        eng = SimulatedEngine(base.model_id, base.kind, base.core, base.context_length, clock=clock)

        async def collect(rid, n):
            req = GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": "hi " * 50}],
                                    params=SamplingParams(max_tokens=n))
            return [ev async for ev in eng.generate(req)]

        long_run = asyncio.create_task(collect("long", 400))
        await asyncio.sleep(0.1)
        offset[0] += 5.0  # the loop stalled for 5 s: every planned segment end is now in the past
        arrival = clock()
        late = await collect("late", 5)
        await long_run
        await eng.close()
        return arrival, late

    arrival, late = asyncio.run(main())
    assert late[-1].finished
    assert min(ev.time_s for ev in late) >= arrival

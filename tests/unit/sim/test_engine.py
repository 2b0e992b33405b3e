"""The real-time simulated engine: placeholder text of the right length, stats, simulated energy."""

import asyncio

from scheduler.config import load_config
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams, StatsRecorder
from scheduler.engines.simulated import build_simulated_engine
from scheduler.datafiles import sim_fleet_config


def test_generates_exact_token_counts_and_meters_energy():
    cfg = load_config(sim_fleet_config())

    async def main():
        eng = build_simulated_engine(cfg.models[0], cfg, {})
        gpu = eng.core.gpus[0]
        e0 = gpu.energy_joules()

        async def one(i, n, forced=None):
            rec, text = StatsRecorder(), ""
            req = GenerationRequest(f"r{i}", ModelKind.CHAT, messages=[{"role": "user", "content": "hi " * 100}],
                                    params=SamplingParams(max_tokens=n, force_output_tokens=forced))
            async for ev in eng.generate(req):
                rec.observe(ev)
                text += ev.text
            return len(text.split()), rec.stats()

        results = await asyncio.gather(one(0, 30), one(1, 40), one(2, 500, forced=12))
        stats = eng.stats()
        energy = gpu.energy_joules() - e0
        await eng.close()
        return results, stats, energy

    results, stats, energy = asyncio.run(main())
    assert [r[0] for r in results] == [30, 40, 12]
    assert [r[1].completion_tokens for r in results] == [30, 40, 12]
    assert all(0.004 < r[1].tpot_seconds < 0.05 for r in results)
    assert stats["requests_completed"] == 3 and stats["running"] == 0
    assert stats["joules_per_decode_token"] > 0 and stats["prefill_tokens_per_second"] > 1000
    assert energy > 0

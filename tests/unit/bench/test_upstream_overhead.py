"""The upstream overhead benchmark's own logic: sides taking turns, per-round and A/A figures, the verdict (no server)."""

from __future__ import annotations

import asyncio
import gc

from benchmarks.upstream_overhead import GcPauses, engine_summary, engine_verdict, rotate


def test_sides_take_turns_one_batch_each_with_a_whole_batch_in_flight():
    in_flight = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    order: list[str] = []

    def side(name: str):
        async def one() -> float:
            in_flight[name] += 1
            most[name] = max(most[name], in_flight[name])
            order.append(name)
            await asyncio.sleep(0.001)
            in_flight[name] -= 1
            assert in_flight["a" if name == "b" else "b"] == 0  # never both sides at once
            return 0.001
        return one

    timings = asyncio.run(rotate({"a": side("a"), "b": side("b")}, n=20, concurrency=8, warmup=0))
    assert [len(timings["a"]), len(timings["b"])] == [20, 20]
    assert most == {"a": 8, "b": 8}
    assert order == ["a"] * 8 + ["b"] * 8 + ["a"] * 8 + ["b"] * 8 + ["a"] * 4 + ["b"] * 4


def test_a_garbage_collection_is_booked_to_the_side_in_flight():
    async def quiet() -> float:
        return 0.0

    async def collects() -> float:
        gc.collect()
        return 0.0

    with GcPauses() as pauses:
        asyncio.run(rotate({"quiet": quiet, "collects": collects}, n=3, concurrency=1, pauses=pauses, warmup=0))
    by_side = pauses.by_side()
    assert by_side["collects"]["full_collections"] == 3
    assert by_side.get("quiet", {"full_collections": 0})["full_collections"] == 0


def _round(direct_ms: list[float], engine_ms: list[float], again_ms: list[float]) -> dict[str, list[float]]:
    return {"direct": [x / 1000 for x in direct_ms], "engine": [x / 1000 for x in engine_ms],
            "direct_again": [x / 1000 for x in again_ms]}


def test_the_verdict_sets_the_engines_median_against_the_target_and_the_aa_band():
    base = [10.0] * 99 + [20.0]
    rounds = [
        _round(base, [x + 1.0 for x in base], base),  # engine +1 ms everywhere, A/A 0
        _round(base, [x + 1.0 for x in base], [x + 3.0 for x in base]),  # A/A +3 ms: noise this large
        _round(base, [x + 9.0 for x in base], [x - 2.0 for x in base]),  # one bad round for the engine
    ]
    s = engine_summary(rounds, 8)
    assert s["rounds"] == 3 and s["requests_per_round"] == 100
    assert abs(s["engine_added_p50_ms_median_of_rounds"] - 1.0) < 1e-6
    assert abs(s["engine_added_p99_ms_median_of_rounds"] - 1.0) < 1e-6  # the bad round does not decide it
    assert s["aa_added_p99_ms_range_of_rounds"] == [-2.0, 3.0]
    assert [r["engine_added_p99_ms"] for r in s["per_round"]] == [1.0, 1.0, 9.0]
    line = engine_verdict(8, s)
    assert "p50 +1.00 ms" in line and "p99 +1.00 ms" in line and "NOT met" not in line
    assert "A/A band of the rounds is -2.00 .. +3.00 ms, the engine's median is inside it" in line

    # the last batch of every round holds the 20 ms request: over twice the median (10 ms) where a side adds to it
    assert "over twice the median (20.0 ms), of 39 per side: engine 3, direct 0, A/A 1" in line

    slow = engine_summary([_round(base, [x + 6.0 for x in base], base)] * 3)
    line = engine_verdict(8, slow)
    assert "p99 +6.00 ms (median of 3 rounds; target +5 ms: NOT met" in line and "is above it" in line


def test_stalls_are_counted_per_side_against_the_median_batch():
    ok = [0.010] * 8
    stalled = [0.010] * 7 + [0.050]  # one request of the batch stalled: the batch did
    rounds = [{"direct": ok * 3, "engine": ok + stalled + stalled, "direct_again": stalled + ok * 2}]
    st = engine_summary(rounds, 8)["stalled_batches"]
    assert (st["engine"], st["direct"], st["direct_again"], st["batches_per_side"]) == (2, 0, 1, 3)

"""Attribution rules: shares by work, idle pool and its amortisation, late reports, conservation."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.energy.attribution import Attributor


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-9, abs=1e-9)


def test_interval_shared_by_decode_tokens() -> None:
    a = Attributor(settle_delay_seconds=0.0)
    a.start("a", "gpu0", 0.0)
    a.start("b", "gpu0", 0.0)
    a.progress("a", 0, 30, 1.0)
    a.progress("b", 0, 10, 1.0)
    a.on_interval("gpu0", 0.0, 1.0, 100.0)
    ea = a.finish("a", 1.0)
    eb = a.finish("b", 1.0)
    assert ea.dynamic_joules == approx(75.0)
    assert eb.dynamic_joules == approx(25.0)
    assert ea.complete and ea.metered


def test_prefill_tokens_are_weighted() -> None:
    a = Attributor(prefill_token_weight=0.25, settle_delay_seconds=0.0)
    a.start("prefill", "gpu0", 0.0)
    a.start("decode", "gpu0", 0.0)
    a.progress("prefill", 400, 0, 1.0)  # 400 x 0.25 = 100 work
    a.progress("decode", 0, 100, 1.0)
    a.on_interval("gpu0", 0.0, 1.0, 50.0)
    assert a.finish("prefill", 1.0).dynamic_joules == approx(25.0)
    assert a.finish("decode", 1.0).dynamic_joules == approx(25.0)


def test_no_reported_work_means_equal_shares() -> None:
    a = Attributor(settle_delay_seconds=0.0)
    for rid in ("a", "b", "c", "d"):
        a.start(rid, "gpu0", 0.0)
    a.on_interval("gpu0", 0.0, 1.0, 40.0)
    assert [a.finish(r, 1.0).dynamic_joules for r in ("a", "b", "c", "d")] == [approx(10.0)] * 4


def test_work_is_interpolated_within_intervals() -> None:
    # a reports 0 at t=0 (start) and 20 at t=2: 10 tokens fall in each 1 s interval
    a = Attributor(settle_delay_seconds=0.0)
    a.start("a", "gpu0", 0.0)
    a.start("b", "gpu0", 0.0)
    a.progress("a", 0, 20, 2.0)
    a.progress("b", 0, 10, 1.0)  # b then stops producing tokens
    a.progress("b", 0, 10, 2.0)
    a.on_interval("gpu0", 0.0, 1.0, 20.0)
    a.on_interval("gpu0", 1.0, 2.0, 20.0)
    ea, eb = a.finish("a", 2.0), a.finish("b", 2.0)
    assert ea.dynamic_joules == approx(10.0 + 20.0)
    assert eb.dynamic_joules == approx(10.0)


def test_late_report_within_settle_delay_still_counts() -> None:
    a = Attributor(settle_delay_seconds=0.5)
    a.start("a", "gpu0", 0.0)
    a.start("b", "gpu0", 0.0)
    a.progress("a", 0, 10, 0.1)
    a.on_interval("gpu0", 0.0, 0.1, 10.0)
    # b's report for t=0.1 arrives after the interval, before settlement
    a.progress("b", 0, 30, 0.1)
    a.on_interval("gpu0", 0.1, 0.7, 0.0)  # meter moves past 0.1 + 0.5: settles [0, 0.1]
    assert a.balance("gpu0").unsettled_joules == approx(0.0)
    assert a.finish("a", 0.7).dynamic_joules == approx(2.5)
    assert a.finish("b", 0.7).dynamic_joules == approx(7.5)


def test_only_the_busy_part_of_a_boundary_interval_is_charged() -> None:
    a = Attributor(settle_delay_seconds=10.0)
    a.start("a", "gpu0", 0.25)
    a.on_interval("gpu0", 0.0, 1.0, 40.0)  # a ran in the last three quarters
    a.on_interval("gpu0", 1.0, 2.0, 40.0)
    e = a.finish("a", 1.5)  # and in the first half of this one
    assert e.dynamic_joules == approx(30.0 + 20.0)
    a.on_interval("gpu0", 2.0, 20.0, 0.0)  # settles both: the unbusy parts become idle
    b = a.balance("gpu0")
    assert b.idle_pool_joules == approx(30.0)
    assert b.accounted_joules == approx(b.metered_joules)
    # two back-to-back requests that together cover an interval share all of it
    a.start("x", "gpu0", 20.0)
    a.start("y", "gpu0", 20.5)
    a.on_interval("gpu0", 20.0, 21.0, 10.0)
    assert a.finish("x", 20.5).dynamic_joules == approx(5.0)
    assert a.finish("y", 21.0).dynamic_joules == approx(5.0)


def test_finishing_request_pays_early_and_rest_goes_to_others() -> None:
    a = Attributor(settle_delay_seconds=10.0)
    a.start("short", "gpu0", 0.0)
    a.start("long", "gpu0", 0.0)
    a.progress("short", 0, 10, 1.0)
    a.progress("long", 0, 30, 1.0)
    a.on_interval("gpu0", 0.0, 1.0, 40.0)
    assert a.finish("short", 1.0).dynamic_joules == approx(10.0)
    a.on_interval("gpu0", 1.0, 2.0, 8.0)
    a.progress("long", 0, 40, 2.0)
    assert a.finish("long", 2.0).dynamic_joules == approx(30.0 + 8.0)


def test_idle_intervals_go_to_pool_and_are_amortised_by_work() -> None:
    a = Attributor(settle_delay_seconds=0.0, idle_amortization_seconds=60.0)
    a.on_interval("cpu0", 0.0, 10.0, 100.0)  # nobody running: idle
    assert a.balance("cpu0").idle_pool_joules == approx(100.0)
    a.start("a", "cpu0", 10.0)
    a.progress("a", 0, 10, 11.0)
    a.on_interval("cpu0", 10.0, 11.0, 5.0)
    ea = a.finish("a", 11.0)
    # the only request finished in the window takes the whole idle pool of the window
    assert ea.dynamic_joules == approx(5.0)
    assert ea.idle_joules == approx(100.0)
    assert ea.joules == approx(105.0)
    a.on_interval("cpu0", 11.0, 12.0, 30.0)
    a.start("b", "cpu0", 12.0)
    a.progress("b", 0, 30, 13.0)
    a.on_interval("cpu0", 12.0, 13.0, 3.0)
    eb = a.finish("b", 13.0)
    # b did 30 of the 40 tokens finished in the window, so it owes 3/4 of the 130 J of idle
    # metered in it, but only the 30 J a did not already take are left: b is capped at those
    assert eb.idle_joules == approx(30.0)
    assert a.balance("cpu0").idle_pool_joules == approx(0.0)
    a.on_interval("cpu0", 13.0, 14.0, 40.0)
    for rid in ("c", "d"):
        a.start(rid, "cpu0", 14.0)
        a.progress(rid, 0, 10, 15.0)
    a.on_interval("cpu0", 14.0, 15.0, 2.0)
    ec = a.finish("c", 15.0)
    # window idle 170 J x 10 / (10 + 30 + 10) tokens = 34 J, within the 40 J still unassigned
    assert ec.idle_joules == approx(34.0)
    assert a.finish("d", 15.0).idle_joules == approx(6.0)  # capped: only 6 J left


def test_idle_before_ready_is_startup_energy_not_the_first_requests() -> None:
    """Models load for 30 s (idle, 300 J); the first request after ready pays only the idle after ready."""
    a = Attributor(settle_delay_seconds=0.0, idle_amortization_seconds=60.0, starting_up=True)
    a.on_interval("cpu0", 0.0, 29.5, 295.0)
    a.mark_ready(30.0)
    a.mark_ready(31.0)  # only the first call counts
    a.on_interval("cpu0", 29.5, 30.5, 10.0)  # straddles the ready time: half of it is start-up
    a.on_interval("cpu0", 30.5, 32.0, 15.0)
    a.start("a", "cpu0", 32.0)
    a.progress("a", 0, 10, 33.0)
    a.on_interval("cpu0", 32.0, 33.0, 3.0)
    e = a.finish("a", 33.0)
    assert e.dynamic_joules == approx(3.0)
    assert e.idle_joules == approx(20.0)  # 5 J of the straddling interval + 15 J: 2 s of idle after ready
    b = a.balance("cpu0")
    assert b.startup_joules == approx(300.0)
    assert a.startup_joules("cpu0") == approx(300.0) and a.startup_settled("cpu0")
    assert b.idle_pool_joules == approx(0.0)
    assert b.accounted_joules == approx(b.metered_joules)


def test_first_request_marks_ready_when_nothing_did() -> None:
    a = Attributor(settle_delay_seconds=0.0, idle_amortization_seconds=60.0, starting_up=True)
    a.on_interval("cpu0", 0.0, 10.0, 100.0)
    assert a.ready_s is None and not a.startup_settled("cpu0")
    a.start("a", "cpu0", 10.0)
    assert a.ready_s == 10.0
    a.on_interval("cpu0", 10.0, 11.0, 5.0)
    assert a.finish("a", 11.0).idle_joules == 0.0
    assert a.balance("cpu0").startup_joules == approx(100.0)


def test_without_starting_up_all_idle_is_shared_as_before() -> None:
    a = Attributor(settle_delay_seconds=0.0, idle_amortization_seconds=60.0)
    a.mark_ready(5.0)  # no effect: it was ready from the start
    a.on_interval("cpu0", 0.0, 10.0, 100.0)
    assert a.balance("cpu0").startup_joules == 0.0 and a.balance("cpu0").idle_pool_joules == approx(100.0)


def test_idle_older_than_window_is_never_charged() -> None:
    a = Attributor(settle_delay_seconds=0.0, idle_amortization_seconds=5.0)
    a.on_interval("cpu0", 0.0, 1.0, 100.0)
    a.on_interval("cpu0", 1.0, 99.0, 0.0)
    a.start("a", "cpu0", 99.0)
    a.on_interval("cpu0", 99.0, 100.0, 1.0)
    e = a.finish("a", 100.0)
    assert e.idle_joules == 0.0
    b = a.balance("cpu0")
    assert b.idle_pool_joules == approx(100.0)
    assert b.accounted_joules == approx(b.metered_joules)


def test_steady_traffic_pays_idle_power_over_rate() -> None:
    # 10 W idle floor metered as idle intervals between requests; one request per second
    a = Attributor(settle_delay_seconds=0.0, idle_amortization_seconds=20.0)
    charges = []
    for i in range(200):
        t = float(i)
        a.on_interval("cpu0", t, t + 0.5, 5.0)  # idle half second: 5 J
        a.start(f"r{i}", "cpu0", t + 0.5)
        a.progress(f"r{i}", 0, 10, t + 1.0)
        a.on_interval("cpu0", t + 0.5, t + 1.0, 20.0)
        charges.append(a.finish(f"r{i}", t + 1.0).idle_joules)
    # after warm-up each request pays the idle of its period, 5 J, scaled by 20 idle seconds over
    # the 21 requests finished in the window (the request itself included): conservative
    tail = charges[100:]
    assert sum(tail) / len(tail) == pytest.approx(5.0 * 20 / 21, rel=0.01)
    assert max(tail) <= 5.0
    # the unassigned idle pool does not grow without bound
    assert a.balance("cpu0").idle_pool_joules < 0.1 * 200 * 5.0


def test_device_without_meter_reports_unmetered() -> None:
    a = Attributor()
    a.start("a", "remote0", 0.0)
    a.progress("a", 5, 5, 0.5)
    e = a.finish("a", 1.0)
    assert not e.metered and not e.complete
    assert e.joules == 0.0
    assert a.covered_until("remote0") is None


def test_finish_before_coverage_is_marked_incomplete_and_conserves() -> None:
    a = Attributor(settle_delay_seconds=0.0)
    a.start("a", "gpu0", 0.0)
    a.on_interval("gpu0", 0.0, 1.0, 10.0)
    e = a.finish("a", 1.5)
    assert e.metered and not e.complete
    assert e.dynamic_joules == approx(10.0)
    a.on_interval("gpu0", 1.0, 2.0, 10.0)  # nobody left to charge: idle pool
    b = a.balance("gpu0")
    assert b.idle_pool_joules == approx(10.0)
    assert b.accounted_joules == approx(20.0)


def test_late_progress_after_finish_is_ignored_and_double_finish_fails() -> None:
    a = Attributor(settle_delay_seconds=0.0)
    a.start("a", "gpu0", 0.0)
    a.on_interval("gpu0", 0.0, 1.0, 10.0)
    a.finish("a", 1.0)
    a.progress("a", 0, 100, 0.9)
    with pytest.raises(KeyError):
        a.finish("a", 1.0)
    with pytest.raises(ValueError):
        a.on_interval("gpu0", 2.0, 1.0, 1.0)


def test_final_counts_on_finish_weight_a_silent_request() -> None:
    # b never reports progress, but its final counts at finish place its work in the interval
    a = Attributor(settle_delay_seconds=5.0)
    a.start("a", "gpu0", 0.0)
    a.start("b", "gpu0", 0.0)
    a.progress("a", 0, 10, 1.0)
    a.on_interval("gpu0", 0.0, 1.0, 20.0)
    eb = a.finish("b", 1.0, prefill_tokens_done=0, decode_tokens_done=10)
    assert eb.dynamic_joules == approx(10.0)


def test_discard_gives_energy_back_and_conserves() -> None:
    a = Attributor(settle_delay_seconds=0.0)
    a.start("a", "gpu0", 0.0)
    a.start("x", "gpu0", 0.0)
    a.on_interval("gpu0", 0.0, 1.0, 10.0)
    a.discard("x")
    b = a.balance("gpu0")
    assert b.accounted_joules == approx(b.metered_joules)
    assert a.running("gpu0") == 1


def test_memory_stays_bounded_over_many_requests() -> None:
    a = Attributor(settle_delay_seconds=0.3, idle_amortization_seconds=5.0)
    sizes = []
    t = 0.0
    for i in range(3000):
        a.start(f"r{i}", "gpu0", t)
        for k in range(1, 4):
            a.progress(f"r{i}", 50, 5 * k, t + 0.1 * k)
            a.on_interval("gpu0", t + 0.1 * (k - 1), t + 0.1 * k, 3.0)
        t += 0.3
        a.on_interval("gpu0", t, t + 0.1, 1.0)
        t += 0.1
        a.finish(f"r{i}", t - 0.1)
        sizes.append(a.memory_items())
    assert max(sizes[1000:]) <= max(sizes[:1000]) + 5
    assert max(sizes) < 200


def test_concurrent_threads_conserve() -> None:
    a = Attributor(settle_delay_seconds=0.2)
    stop = threading.Event()
    clock = [0.0]
    lock = threading.Lock()

    def now() -> float:
        with lock:
            return clock[0]

    def meter() -> None:
        t = 0.0
        while not stop.is_set():
            with lock:
                clock[0] = t + 0.01
            a.on_interval("gpu0", t, t + 0.01, 1.0)
            t += 0.01

    results = []

    def client(k: int) -> None:
        for i in range(150):
            rid = f"c{k}-{i}"
            a.start(rid, "gpu0", now())
            for j in range(3):
                a.progress(rid, 10, j, now())
            results.append(a.finish(rid, now()))

    th = threading.Thread(target=meter)
    th.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    stop.set()
    th.join()
    b = a.balance()
    assert len(results) == 600
    assert all(r.dynamic_joules >= 0 and r.idle_joules >= 0 for r in results)
    assert b.accounted_joules == pytest.approx(b.metered_joules, rel=1e-9)


# --- property tests --------------------------------------------------------------------------

DEVICES = ("gpu0", "gpu1", "cpu0")

op = st.one_of(
    st.tuples(st.just("start"), st.sampled_from(DEVICES)),
    st.tuples(st.just("progress"), st.integers(0, 50), st.integers(0, 200), st.integers(0, 20), st.floats(0, 0.3)),
    st.tuples(st.just("interval"), st.sampled_from(DEVICES), st.floats(0.001, 1.0), st.floats(0, 500)),
    st.tuples(st.just("finish"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("tick"), st.floats(0, 2.0)),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op, max_size=120),
    settle=st.sampled_from([0.0, 0.25, 1.0]),
    window=st.sampled_from([0.5, 5.0, 60.0]),
    weight=st.sampled_from([0.1, 0.25, 1.0]),
    ready_after=st.one_of(st.none(), st.integers(0, 60)),
)
def test_conservation_for_random_interleavings(ops, settle, window, weight, ready_after) -> None:
    """ready_after: None, ready from the start; n, starting up until mark_ready after the n-th operation."""
    a = Attributor(prefill_token_weight=weight, settle_delay_seconds=settle, idle_amortization_seconds=window,
                   starting_up=ready_after is not None)
    now = 0.0
    meter_t = {d: 0.0 for d in DEVICES}
    running: list[str] = []
    counts: dict[str, tuple[int, int]] = {}
    finished = []
    n = 0
    last_assigned = 0.0
    for i, o in enumerate(ops):
        if i == ready_after:
            a.mark_ready(now)
        kind = o[0]
        if kind == "start":
            rid = f"r{n}"
            n += 1
            a.start(rid, o[1], now)
            running.append(rid)
            counts[rid] = (0, 0)
        elif kind == "progress" and running:
            rid = running[o[1] % len(running)]
            p, d = counts[rid]
            p, d = p + o[2], d + o[3]
            counts[rid] = (p, d)
            a.progress(rid, p, d, max(0.0, now - o[4]))  # possibly a late report
        elif kind == "interval":
            dev = o[1]
            t0 = meter_t[dev]
            t1 = t0 + o[2]
            meter_t[dev] = t1
            now = max(now, t1)
            a.on_interval(dev, t0, t1, o[3])
        elif kind == "finish" and running:
            rid = running.pop(o[1] % len(running))
            p, d = counts[rid]
            e = a.finish(rid, now, prefill_tokens_done=p if o[2] else None, decode_tokens_done=d if o[2] else None)
            finished.append(e)
            assert e.dynamic_joules >= -1e-9 and e.idle_joules >= -1e-9
            assert e.joules == pytest.approx(e.dynamic_joules + e.idle_joules)
        elif kind == "tick":
            now += o[1]
        b = a.balance()
        assert b.accounted_joules == pytest.approx(b.metered_joules, rel=1e-9, abs=1e-6)
        assigned = b.dynamic_joules + b.idle_assigned_joules
        assert assigned >= last_assigned - 1e-6  # charges only grow
        last_assigned = assigned
        assert b.idle_pool_joules >= -1e-6 and b.unsettled_joules >= -1e-6 and b.startup_joules >= -1e-6
    # finish everything, then push every meter far ahead so all intervals settle
    for rid in running:
        finished.append(a.finish(rid, now))
    for dev in DEVICES:
        a.on_interval(dev, max(meter_t[dev], now), max(meter_t[dev], now) + settle + 1.0, 0.0)
    b = a.balance()
    assert b.unsettled_joules == pytest.approx(0.0, abs=1e-6)
    per_request = sum(e.joules for e in finished)
    assert per_request + b.idle_pool_joules + b.startup_joules == pytest.approx(b.metered_joules, rel=1e-9, abs=1e-6)


def test_finish_when_covered_waits_for_the_meter_without_blocking() -> None:
    import asyncio

    a = Attributor(settle_delay_seconds=0.5)
    a.register_device("gpu0")
    a.on_interval("gpu0", 0.0, 1.0, 1.0)
    a.start("a", "gpu0", 0.5)

    async def main():
        task = asyncio.create_task(a.finish_when_covered("a", 1.5, timeout_seconds=5.0, poll_seconds=0.005))
        await asyncio.sleep(0.05)
        assert not task.done()  # the meter has not covered 1.5 yet
        a.on_interval("gpu0", 1.0, 2.0, 10.0)  # the loop was free to run this
        return await task

    e = asyncio.run(main())
    assert e.complete
    # a ran in the second half of [0, 1] and the first half of [1, 2]: half of each is busy, and
    # the idle half of [0, 1] (settled by then) comes back to it as the only request in the window
    assert e.dynamic_joules == approx(0.5 + 5.0)
    assert e.idle_joules == approx(0.5)

    a.start("b", "gpu0", 2.0)
    timed_out = asyncio.run(a.finish_when_covered("b", 9.0, timeout_seconds=0.05))
    assert not timed_out.complete


def test_reading_the_meter_when_a_request_ends_closes_it_at_once_and_conserves() -> None:
    """The node agent reads the counter at a request's end (DeviceMeter.sample_now) instead of waiting
    for the next tick: the request is complete without a wait, and every metered joule is accounted for."""
    from scheduler.energy.meter import DeviceMeter
    from tests.unit.energy.test_meter import FakeClocks, ScriptedDevice

    dev = ScriptedDevice("gpu0")
    clocks = FakeClocks()
    meter = DeviceMeter([dev], 0.1, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    a = Attributor(settle_delay_seconds=0.3, idle_amortization_seconds=60.0)
    meter.add_callback(lambda iv: a.on_interval(iv.device_id, iv.t0_s, iv.t1_s, iv.energy_joules))
    meter.baseline()
    t0 = clocks.wall
    results = []
    for i in range(20):  # requests that end between ticks, one after another
        rid = f"r{i}"
        a.start(rid, "gpu0", clocks.wall)
        clocks.advance(0.04)
        dev.counter_joules += 4.0
        a.progress(rid, 10, 3, clocks.wall)
        end_s = clocks.wall
        assert (a.covered_until("gpu0") or 0.0) < end_s
        meter.sample_now(["gpu0"])
        results.append(a.finish(rid, end_s, prefill_tokens_done=10, decode_tokens_done=3))
        clocks.advance(0.07)  # a tick with nothing running: idle
        dev.counter_joules += 1.0
        meter.sample_once()
    assert all(r.complete and r.metered for r in results)
    # each request alone on the device for its 40 ms: it is charged exactly that busy energy
    assert all(r.dynamic_joules == approx(4.0) for r in results)
    for _ in range(10):  # later ticks settle everything
        clocks.advance(0.1)
        meter.sample_once()
    b = a.balance()
    assert b.metered_joules == approx(dev.counter_joules - 1000.0)
    assert b.accounted_joules == approx(b.metered_joules)
    assert sum(r.joules for r in results) + b.idle_pool_joules + b.unsettled_joules == approx(b.metered_joules)
    assert clocks.wall > t0

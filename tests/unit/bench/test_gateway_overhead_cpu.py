"""The gateway-overhead benchmark's CPU table: each process's own use over the window, never negative."""

from benchmarks.gateway_overhead import _cpu_used_by_title, _process_name


def test_a_process_that_ended_in_the_window_does_not_subtract_from_its_titles_live_ones():
    # an orphaned DashboardAgent of an earlier Ray session (pid 7) exits during the timed rounds: the table
    # showed DashboardAgent at -2.69 ms per request
    start = {1: ("ray::DashboardAgent", 40.0), 7: ("ray::DashboardAgent", 90.0), 3: ("ray::NodeAgent", 5.0)}
    end = {1: ("ray::DashboardAgent", 41.5), 3: ("ray::NodeAgent", 6.0), 9: ("ray::ServeReplica:x:gateway", 2.0)}
    used = _cpu_used_by_title(start, end)
    assert used == {"ray::DashboardAgent": 1.5, "ray::NodeAgent": 1.0, "ray::ServeReplica:x:gateway": 2.0}


def test_a_replica_keeps_one_name_whatever_task_it_runs():
    # the plain app's ingress was listed as "...plain_ingress.handle_request_with_rejection" when the snapshot
    # caught it inside a request, and its CPU landed in two rows
    idle = _process_name("ray::ServeReplica:plain:plain_ingress")
    busy = _process_name("ray::ServeReplica:plain:plain_ingress.handle_request_with_rejection")
    assert idle == busy == "ray::ServeReplica:plain:plain_ingress"
    assert _process_name("ray::ServeReplica:wattlane:model-llama-3-1-8b") == "ray::ServeReplica:wattlane:model-llama-3-1-8b"
    assert _process_name("ray::NodeAgent.sim_generate") == "ray::NodeAgent"
    assert _process_name("/usr/bin/raylet --flag=1") == "raylet"


def test_the_stage_table_derives_the_unmeasured_parts_from_the_header_and_the_clients_time():
    from benchmarks.gateway_overhead import parse_server_timing, stage_breakdown

    ms = parse_server_timing("route;dur=0.100, replica;dur=5.000, engine;dur=1.200, energy;dur=0.450, "
                             "accounting;dur=0.350, total;dur=6.000")
    assert ms == {"route": 0.1, "replica": 5.0, "engine": 1.2, "energy": 0.45, "accounting": 0.35, "total": 6.0}
    out = stage_breakdown([(0.0130, ms)])  # the client waited 13 ms
    assert round(out["serve_and_transport"]["p50_ms"], 6) == 3.35  # 5.0 - 1.2 - 0.45
    assert round(out["gateway_rest"]["p50_ms"], 6) == 0.55  # 6.0 - 0.1 - 5.0 - 0.35
    assert round(out["outside_handler"]["p50_ms"], 6) == 7.0  # 13 - 6


def test_the_added_p50s_interval_covers_a_real_difference_and_excludes_none():
    """Two noisy latency series 1.5 ms apart: the interval holds 1.5 ms and not 0 or 1 ms; with no difference
    it holds 0. A wrong pairing or unit (seconds for ms) would put it elsewhere."""
    import numpy as np
    import pytest

    from benchmarks.gateway_overhead import added_p50_interval_ms

    rng = np.random.default_rng(1)
    plain = list(0.010 + rng.gamma(2.0, 0.0005, 600))
    slower = [t + 0.0015 for t in plain]
    low, high = added_p50_interval_ms(plain, slower)
    assert low <= 1.5 <= high and low > 1.0
    same_low, same_high = added_p50_interval_ms(plain, list(0.010 + rng.gamma(2.0, 0.0005, 600)))
    assert same_low < 0.0 < same_high
    with pytest.raises(ValueError, match="two or more pairs"):
        added_p50_interval_ms(plain, slower[:10])

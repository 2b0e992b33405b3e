"""Upstream servers' load: parsers on samples of each server's output, and the poller against a live server."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from scheduler.engines.upstream_load import (
    MetricsParseError,
    ServerLoad,
    ServerLoadPoller,
    detect_server_kind,
    merge_llamacpp,
    parse_llamacpp_slots,
    parse_server_metrics,
    to_replica_stats,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "upstream_metrics"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def sample(name: str) -> str:
    return (DATA / name).read_text()


# --- parsers, on each server's sample ------------------------------------------------------------

def test_vllm_v1_data_parallel_sums_engines_and_averages_kv():
    load = parse_server_metrics(sample("vllm_v1_dp2_scrape1.txt"), "vllm")
    assert load.server == "vllm"
    assert (load.running_requests, load.waiting_requests) == (7 + 5, 3 + 0)
    assert load.kv_cache_usage_fraction == pytest.approx((0.4375 + 0.3125) / 2)
    assert (load.prefix_cache_hits_total, load.prefix_cache_queries_total) == (6144 + 2048, 10240 + 8192)
    # one scrape: the lifetime ratio of the counters
    assert load.prefix_cache_hit_rate == pytest.approx(8192 / 18432)
    assert load.prompt_tokens_total == 58213 + 40960
    assert load.generation_tokens_total == 91377 + 77314
    assert load.prompt_tokens_per_second is None  # a rate needs two scrapes


def test_vllm_hit_rate_and_throughput_come_from_counter_deltas_between_scrapes():
    first = parse_server_metrics(sample("vllm_v1_dp2_scrape1.txt"), "vllm", observed_at_s=1000.0)
    second = parse_server_metrics(sample("vllm_v1_dp2_scrape2.txt"), "vllm", previous=first, observed_at_s=1001.0)
    # engine 0: +2048 queried, +1536 cached; engine 1: +1024 queried, +512 cached
    assert second.prefix_cache_hit_rate == pytest.approx((1536 + 512) / (2048 + 1024))
    assert second.prefix_cache_hit_rate != pytest.approx(second.prefix_cache_hits_total
                                                         / second.prefix_cache_queries_total)
    assert second.prompt_tokens_per_second == pytest.approx((60261 - 58213) + (41984 - 40960))
    assert second.generation_tokens_per_second == pytest.approx((91902 - 91377) + (77790 - 77314))
    assert (second.running_requests, second.waiting_requests) == (14, 3)

    # nothing queried since: the interval's rate carries over rather than falling back to lifetime
    idle = parse_server_metrics(sample("vllm_v1_dp2_scrape2.txt"), "vllm", previous=second, observed_at_s=1002.0)
    assert idle.prefix_cache_hit_rate == pytest.approx(second.prefix_cache_hit_rate)
    assert idle.generation_tokens_per_second == 0.0

    # counters that went down mean the server restarted: lifetime ratio, no negative throughput
    restarted = parse_server_metrics(sample("vllm_v1_dp2_scrape1.txt"), "vllm", previous=second, observed_at_s=1003.0)
    assert restarted.prefix_cache_hit_rate == pytest.approx(8192 / 18432)
    assert restarted.prompt_tokens_per_second is None


def test_vllm_v1_prefers_current_names_over_deprecated_ones():
    text = sample("vllm_v1_dp2_scrape1.txt").replace(
        'vllm:gpu_cache_usage_perc{engine="0"', 'vllm:gpu_cache_usage_perc{engine="9"').replace(
        'vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375',
        'vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.9375')
    assert parse_server_metrics(text, "vllm").kv_cache_usage_fraction == pytest.approx((0.9375 + 0.3125) / 2)


def test_vllm_v0_names_and_a_server_without_prefix_counters():
    load = parse_server_metrics(sample("vllm_v0.txt"), "vllm")
    assert (load.running_requests, load.waiting_requests) == (4, 2)
    assert load.kv_cache_usage_fraction == pytest.approx(0.625)  # vllm:gpu_cache_usage_perc
    assert load.prefix_cache_hit_rate is None  # this v0 build exposes none: unknown, not zero
    assert (load.prompt_tokens_total, load.generation_tokens_total) == (120055, 64212)


def test_vllm_v0_hit_rate_gauge_is_read_as_is():
    text = sample("vllm_v0.txt") + (
        "# HELP vllm:gpu_prefix_cache_hit_rate GPU prefix cache block hit rate.\n"
        "# TYPE vllm:gpu_prefix_cache_hit_rate gauge\n"
        f'vllm:gpu_prefix_cache_hit_rate{{model_name="{MODEL}"}} 0.8125\n')
    assert parse_server_metrics(text, "vllm").prefix_cache_hit_rate == pytest.approx(0.8125)


def test_vllm_v0_verbatim_idle_server_with_prefix_caching_off():
    # a real v0 scrape (AIBrix's docs): idle, so its load is 0 and must read as 0, not as unknown
    load = parse_server_metrics(sample("vllm_v0_aibrix_docs.txt"), "vllm")
    assert (load.running_requests, load.waiting_requests) == (0, 0)
    assert load.kv_cache_usage_fraction == 0.0
    assert (load.prompt_tokens_total, load.generation_tokens_total) == (148.0, 955.0)
    # gpu_prefix_cache_hit_rate is -1.0 there: v0's "prefix caching is off", which is no rate at all
    assert load.prefix_cache_hit_rate is None
    assert to_replica_stats(load) == {"running": 0, "waiting": 0, "kv_cache_free_fraction": 1.0}
    # the same family with a real rate is still read
    live = sample("vllm_v0_aibrix_docs.txt").replace(
        'vllm:gpu_prefix_cache_hit_rate{model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct"} -1.0',
        'vllm:gpu_prefix_cache_hit_rate{model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct"} 0.25')
    assert parse_server_metrics(live, "vllm").prefix_cache_hit_rate == pytest.approx(0.25)


def test_vllm_v1_design_doc_excerpt_under_load():
    text = sample("vllm_v1_design_doc_excerpt.txt")
    with pytest.raises(MetricsParseError):  # the doc elides families with "..." lines
        parse_server_metrics(text, "vllm")
    load = parse_server_metrics("\n".join(ln for ln in text.splitlines() if ln != "..."), "vllm",
                                model_name="meta-llama/Llama-3.1-8B-Instruct")
    assert load.running_requests == 8
    assert load.generation_tokens_total == 27453.0
    # families the excerpt leaves out stay unknown rather than zero
    assert (load.waiting_requests, load.kv_cache_usage_fraction, load.prompt_tokens_total) == (None, None, None)


def test_sglang_sample():
    load = parse_server_metrics(sample("sglang.txt"), "sglang")
    assert (load.running_requests, load.waiting_requests) == (162, 2826)
    assert load.kv_cache_usage_fraction == pytest.approx(0.28)
    assert load.prefix_cache_hit_rate == pytest.approx(0.007507552643049313)
    assert (load.prompt_tokens_total, load.generation_tokens_total) == (8.128902e6, 7.557572e6)


def test_tgi_sample_reads_batch_queue_and_reserved_kv():
    load = parse_server_metrics(sample("tgi.txt"), "tgi")
    assert (load.running_requests, load.waiting_requests) == (12, 5)
    assert load.kv_cache_usage_fraction == pytest.approx(49152 / 131072)
    assert load.prefix_cache_hit_rate is None
    assert (load.prompt_tokens_total, load.generation_tokens_total) == (912384, 402318)


def test_llamacpp_real_scrapes_while_busy_and_after():
    # captured from a real llama-server (2 slots, 5 concurrent requests): 2 run, 3 wait
    busy1 = parse_server_metrics(sample("llamacpp_metrics_busy1.txt"), "llamacpp", observed_at_s=1000.0)
    assert (busy1.running_requests, busy1.waiting_requests) == (2, 3)
    assert busy1.kv_cache_usage_fraction is None  # this build has no KV metric
    assert (busy1.prefix_cache_hits_total, busy1.prefix_cache_queries_total) == (0, 43)
    assert busy1.prefix_cache_hit_rate == 0.0  # nothing cached yet: a real 0, not unknown

    busy2 = parse_server_metrics(sample("llamacpp_metrics_busy2.txt"), "llamacpp", previous=busy1,
                                 observed_at_s=1001.0)
    assert busy2.prompt_tokens_per_second == pytest.approx(86 - 43)
    # llama.cpp adds generated tokens to its counter when a request ends, so none show mid-request
    assert (busy2.generation_tokens_total, busy2.generation_tokens_per_second) == (0, 0.0)

    idle = parse_server_metrics(sample("llamacpp_metrics_idle.txt"), "llamacpp", previous=busy2,
                                observed_at_s=1060.0)
    assert (idle.running_requests, idle.waiting_requests) == (0, 0)
    assert (idle.prompt_tokens_total, idle.generation_tokens_total) == (137, 1280)
    # cached and uncached prompt tokens: 78 hits of 137 + 78 queried, 78 of 129 since busy2
    assert (idle.prefix_cache_hits_total, idle.prefix_cache_queries_total) == (78, 137 + 78)
    assert idle.prefix_cache_hit_rate == pytest.approx(78 / ((137 + 78) - 86))
    assert parse_server_metrics(sample("llamacpp_metrics_idle.txt"), "llamacpp").prefix_cache_hit_rate == \
        pytest.approx(78 / (137 + 78))


def test_llamacpp_older_build_kv_ratio():
    older = sample("llamacpp_metrics_busy1.txt") + (
        "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio 0.173828\n")
    assert parse_server_metrics(older, "llamacpp").kv_cache_usage_fraction == pytest.approx(0.173828)


def test_llamacpp_real_slots_busy_and_idle_merge_with_metrics():
    busy = parse_llamacpp_slots(json.loads(sample("llamacpp_slots_busy.json")))
    idle = parse_llamacpp_slots(json.loads(sample("llamacpp_slots_idle.json")))
    assert (busy.running_requests, busy.total_slots) == (2, 2)
    assert (idle.running_requests, idle.total_slots) == (0, 2)
    merged = merge_llamacpp(parse_server_metrics(sample("llamacpp_metrics_busy1.txt"), "llamacpp"), busy)
    assert (merged.running_requests, merged.waiting_requests, merged.total_slots) == (2, 3, 2)


def test_llamacpp_slots_sample_and_older_state_field():
    load = parse_llamacpp_slots(json.loads(sample("llamacpp_slots.json")))
    assert (load.running_requests, load.total_slots, load.waiting_requests) == (2, 2, None)
    slots = json.loads(sample("llamacpp_slots.json"))
    slots[1]["is_processing"] = False
    assert parse_llamacpp_slots(slots).running_requests == 1
    older = [{"id": 0, "state": 1}, {"id": 1, "state": 0}, {"id": 2, "state": 0}]
    assert parse_llamacpp_slots(older).running_requests == 1
    with pytest.raises(MetricsParseError):
        parse_llamacpp_slots({"error": {"code": 501, "message": "This server does not support slots endpoint."}})


def test_model_name_selects_one_models_samples():
    other = sample("sglang.txt").replace(MODEL, "Qwen/Qwen2.5-7B-Instruct")
    both = sample("sglang.txt") + other.replace("# HELP", "# XHELP").replace("# TYPE", "# XTYPE")
    # several models on one page: summed without a name, one model's alone with it
    assert parse_server_metrics(both, "sglang").running_requests == 2 * 162
    assert parse_server_metrics(both, "sglang", model_name=MODEL).running_requests == 162
    assert parse_server_metrics(both, "sglang", model_name="absent/model").running_requests is None


def test_missing_metrics_stay_none_and_map_to_no_stats():
    text = "# HELP process_cpu_seconds_total Total user and system CPU time.\n" \
           "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
    for kind in ("vllm", "sglang", "tgi", "llamacpp"):
        load = parse_server_metrics(text, kind)
        assert load.is_empty(), kind
        assert to_replica_stats(load) == {}
    assert parse_server_metrics("", "vllm").is_empty()


def test_garbage_raises_a_clear_parse_error():
    with pytest.raises(MetricsParseError, match="vllm server's metrics are not Prometheus text.*<html>"):
        parse_server_metrics("<html><body>502 Bad Gateway</body></html>", "vllm")
    with pytest.raises(MetricsParseError):
        parse_server_metrics('{"running": 3}', "sglang")
    with pytest.raises(ValueError, match="unknown server kind"):
        parse_server_metrics(sample("sglang.txt"), "ollama")


def test_to_replica_stats_keeps_only_what_is_known():
    load = parse_server_metrics(sample("tgi.txt"), "tgi")
    assert to_replica_stats(load) == {"running": 12, "waiting": 5,
                                      "kv_cache_free_fraction": pytest.approx(1 - 49152 / 131072)}
    slots_only = parse_llamacpp_slots(json.loads(sample("llamacpp_slots.json")))
    assert to_replica_stats(slots_only) == {"running": 2}  # no waiting figure: absent, not 0


def test_detect_server_kind():
    assert detect_server_kind(sample("vllm_v0.txt")) == "vllm"
    assert detect_server_kind(sample("sglang.txt")) == "sglang"
    assert detect_server_kind(sample("tgi.txt")) == "tgi"
    assert detect_server_kind(sample("llamacpp_metrics_busy1.txt")) == "llamacpp"
    assert detect_server_kind("python_gc_objects_collected_total 3\n") is None


# --- the poller against a live HTTP server ---------------------------------------------------------

class _Upstream:
    """A real HTTP server (Starlette on uvicorn) whose /metrics and /slots answer as `mode` says."""

    def __init__(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route

        self.mode = "ok"
        self.metrics = sample("llamacpp_metrics_busy1.txt")
        self.hits = 0
        self.release = asyncio.Event()  # ends hanging handlers when the server stops

        async def metrics(_request):
            self.hits += 1
            if self.mode == "hang":
                await asyncio.wait_for(self.release.wait(), 60)
            if self.mode == "fail":
                return PlainTextResponse("upstream exploded", status_code=500)
            if self.mode == "garbage":
                return PlainTextResponse("<html>maintenance</html>")
            if self.mode == "no-metrics":  # llama-server started without --metrics
                return PlainTextResponse("not found", status_code=404)
            return PlainTextResponse(self.metrics, media_type="text/plain; version=0.0.4")

        async def slots(_request):
            if self.mode in ("fail", "garbage"):
                return PlainTextResponse("no", status_code=503)
            return JSONResponse(json.loads(sample("llamacpp_slots_busy.json")))

        self.app = Starlette(routes=[Route("/metrics", metrics), Route("/slots", slots)])

    async def __aenter__(self):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc):
        self.release.set()
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 5)
        self.sock.close()


async def _until(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_poller_keeps_latest_goes_stale_on_failures_and_recovers():
    async def scenario():
        async with _Upstream() as up:
            poller = ServerLoadPoller.for_base_url(up.url + "/v1", server="auto", period_seconds=0.05,
                                                   timeout_seconds=1.0)
            poller.start()
            await _until(lambda: poller.latest is not None)
            assert poller.server == "llamacpp"  # detected from the first scrape
            assert poller.latest.running_requests == 2 and poller.latest.waiting_requests == 3
            assert poller.replica_stats(max_age_seconds=5.0) == {"running": 2, "waiting": 3}

            up.mode = "fail"
            await _until(lambda: poller.consecutive_failures >= 1)
            good = poller.latest  # the last good load (a scrape in flight may have landed just before)
            await _until(lambda: poller.consecutive_failures >= 3)
            assert poller.latest is good  # stale, not replaced by nothing
            assert "500" in poller.last_error
            await asyncio.sleep(0.2)
            assert poller.age_seconds() > 0.2
            assert poller.replica_stats(max_age_seconds=0.1) == {}  # too old to place on
            assert poller.running

            up.mode = "garbage"
            failures = poller.consecutive_failures
            await _until(lambda: poller.consecutive_failures > failures + 1)
            assert "MetricsParseError" in poller.last_error and poller.latest is good

            up.mode = "ok"
            up.metrics = up.metrics.replace("llamacpp:requests_processing 2", "llamacpp:requests_processing 3")
            # a scrape in flight at the switch may land /slots alone (its /metrics answered in garbage mode):
            # wait for a load read from /metrics, the only one with a queue length
            await _until(lambda: poller.latest is not good and poller.latest.waiting_requests is not None)
            assert poller.latest.running_requests == 3 and poller.consecutive_failures == 0
            assert poller.latest.total_slots == 2  # /slots filled what /metrics does not say
            await poller.stop()
            assert not poller.running

    asyncio.run(scenario())


def test_llamacpp_poller_without_metrics_endpoint_reads_slots():
    async def scenario():
        async with _Upstream() as up:
            up.mode = "no-metrics"
            poller = ServerLoadPoller.for_base_url(up.url + "/v1", server="llamacpp")
            load = await poller.poll_once()
            assert (load.running_requests, load.total_slots, load.waiting_requests) == (2, 2, None)
            assert "404" in poller.last_error and poller.consecutive_failures == 0
            await poller.stop()

    asyncio.run(scenario())


def test_poller_stop_cancels_a_scrape_in_flight_promptly():
    async def scenario():
        async with _Upstream() as up:
            up.mode = "hang"
            poller = ServerLoadPoller(up.url + "/metrics", server="vllm", period_seconds=0.05, timeout_seconds=30.0)
            poller.start()
            await _until(lambda: up.hits >= 1)
            t0 = time.monotonic()
            await poller.stop()
            assert time.monotonic() - t0 < 1.0
            assert poller.latest is None and not poller.running

    asyncio.run(scenario())


def test_poller_survives_an_unreachable_server():
    async def scenario():
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        poller = ServerLoadPoller(f"http://127.0.0.1:{port}/metrics", server="sglang", period_seconds=0.05)
        assert await poller.poll_once() is None
        poller.start()
        await _until(lambda: poller.consecutive_failures >= 3)
        assert poller.latest is None and poller.age_seconds() is None and "ConnectError" in poller.last_error
        await poller.stop()

    asyncio.run(scenario())


def test_poller_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown server kind"):
        ServerLoadPoller("http://x/metrics", server="triton")
    with pytest.raises(ValueError):
        ServerLoadPoller(None)
    assert isinstance(ServerLoad(server="vllm", observed_at_s=0.0).is_empty(), bool)

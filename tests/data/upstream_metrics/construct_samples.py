"""Writes the constructed vLLM and TGI samples of this folder (see README.md for what each one is).

vLLM renders /metrics with prometheus-client, so these samples are rendered by the same library
from vLLM's own metric definitions (names, HELP text, types, label names) at the commits the README
names; only the values are ours. Run it with the repository's environment:
    python tests/data/upstream_metrics/construct_samples.py
"""

from __future__ import annotations

from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

HERE = Path(__file__).parent
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def vllm_v1(per_engine: dict[str, dict[str, float]]) -> bytes:
    """vllm/v1/metrics/loggers.py PrometheusStatLogger at 005a810bc40faa25b8870fbc8559c3462581eee3."""
    prometheus_client.enable_created_metrics()
    r = CollectorRegistry()
    labels = ["model_name", "engine"]
    running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r)
    waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r)
    gpu_cache = Gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage."
                      "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", labels, registry=r)
    gpu_q = Counter("vllm:gpu_prefix_cache_queries", "GPU prefix cache queries, in terms of number of queried"
                    "tokens. DEPRECATED: Use vllm:prefix_cache_queries instead.", labels, registry=r)
    gpu_h = Counter("vllm:gpu_prefix_cache_hits", "GPU prefix cache hits, in terms of number of cached "
                    "tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.", labels, registry=r)
    kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r)
    q = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                labels, registry=r)
    h = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, registry=r)
    pre = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, registry=r)
    prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
    gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r)
    ok = Counter("vllm:request_success", "Count of successfully processed requests.", labels + ["finished_reason"],
                 registry=r)
    ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels,
                     buckets=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                              7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0], registry=r)
    for engine, v in per_engine.items():
        lv = (MODEL, engine)
        running.labels(*lv).set(v["running"])
        waiting.labels(*lv).set(v["waiting"])
        gpu_cache.labels(*lv).set(v["kv"])
        kv.labels(*lv).set(v["kv"])
        for c in (gpu_q, q):
            c.labels(*lv).inc(v["queries"])
        for c in (gpu_h, h):
            c.labels(*lv).inc(v["hits"])
        pre.labels(*lv).inc(v["preemptions"])
        prompt.labels(*lv).inc(v["prompt"])
        gen.labels(*lv).inc(v["generation"])
        for reason, n in (("stop", v["stop"]), ("length", v["length"]), ("abort", 0)):
            ok.labels(*lv, reason).inc(n)
        for seconds in v["ttfts"]:
            ttft.labels(*lv).observe(seconds)
    return generate_latest(r)


def vllm_v0(v: dict[str, float]) -> bytes:
    """vllm/engine/metrics.py Metrics at f0afa0c28a3160de7a2ece6eeda2afc8abba8b39 (it disables _created)."""
    prometheus_client.disable_created_metrics()
    r = CollectorRegistry()
    labels = ["model_name"]
    Info("vllm:cache_config", "information of cache_config", registry=r).info(
        {"block_size": "16", "cache_dtype": "auto", "gpu_memory_utilization": "0.9", "num_gpu_blocks": "27910",
         "num_cpu_blocks": "2048", "sliding_window": "None", "swap_space_bytes": "4294967296"})
    Gauge("vllm:num_requests_running", "Number of requests currently running on GPU.", labels,
          registry=r).labels(MODEL).set(v["running"])
    Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
          registry=r).labels(MODEL).set(v["waiting"])
    Gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", labels, registry=r).labels(MODEL).set(0)
    Gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", labels,
          registry=r).labels(MODEL).set(v["kv"])
    Gauge("vllm:cpu_cache_usage_perc", "CPU KV-cache usage. 1 means 100 percent usage.", labels,
          registry=r).labels(MODEL).set(0)
    Counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", labels,
            registry=r).labels(MODEL).inc(v["preemptions"])
    Counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", labels,
            registry=r).labels(MODEL).inc(v["prompt"])
    Counter("vllm:generation_tokens_total", "Number of generation tokens processed.", labels,
            registry=r).labels(MODEL).inc(v["generation"])
    Counter("vllm:request_success_total", "Count of successfully processed requests.", labels + ["finished_reason"],
            registry=r).labels(MODEL, "stop").inc(v["stop"])
    Gauge("vllm:avg_prompt_throughput_toks_per_s", "Average prefill throughput in tokens/s.", labels,
          registry=r).labels(MODEL).set(v["avg_prompt_tps"])
    Gauge("vllm:avg_generation_throughput_toks_per_s", "Average generation throughput in tokens/s.", labels,
          registry=r).labels(MODEL).set(v["avg_generation_tps"])
    return generate_latest(r)


def main() -> None:
    first = {
        "0": dict(running=7, waiting=3, kv=0.4375, queries=10240, hits=6144, preemptions=1, prompt=58213,
                  generation=91377, stop=412, length=17, ttfts=[0.031, 0.052, 0.12, 0.47]),
        "1": dict(running=5, waiting=0, kv=0.3125, queries=8192, hits=2048, preemptions=0, prompt=40960,
                  generation=77314, stop=388, length=9, ttfts=[0.028, 0.09]),
    }
    # one second later: engine 0 saw 2048 more queried prefix tokens (1536 cached), engine 1 1024 (512 cached)
    second = {
        "0": {**first["0"], "running": 8, "waiting": 1, "kv": 0.5, "queries": 12288, "hits": 7680,
              "prompt": 60261, "generation": 91902},
        "1": {**first["1"], "running": 6, "waiting": 2, "kv": 0.375, "queries": 9216, "hits": 2560,
              "prompt": 41984, "generation": 77790},
    }
    (HERE / "vllm_v1_dp2_scrape1.txt").write_bytes(vllm_v1(first))
    (HERE / "vllm_v1_dp2_scrape2.txt").write_bytes(vllm_v1(second))
    (HERE / "vllm_v0.txt").write_bytes(vllm_v0(dict(running=4, waiting=2, kv=0.625, preemptions=3, prompt=120055,
                                                    generation=64212, stop=803, avg_prompt_tps=251.3,
                                                    avg_generation_tps=489.7)))


if __name__ == "__main__":
    main()

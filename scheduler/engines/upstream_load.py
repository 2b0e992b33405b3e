"""Load read from an upstream server itself: /metrics of vLLM, SGLang, TGI and llama.cpp, and llama.cpp's /slots.

`parse_server_metrics` turns one Prometheus scrape into a `ServerLoad` (parsed with
prometheus-client's text parser); `ServerLoadPoller` scrapes a server on a short period in the
background and keeps the latest; `to_replica_stats` maps a load onto the ReplicaStats keys
placement reads. Anything a server does not expose stays None, never zero.

Rules the parser follows:
- Several label sets of one metric (vLLM's data-parallel `engine`, SGLang's ranks) are summed for
  counts and counters and averaged for fractions. With `model_name` given, only samples whose
  `model_name` label (SGLang before 0.4: `name`) equals it count; samples with no such label count
  for every model.
- Names differ between versions; each field reads the first name the server exposes from a list
  (vLLM v1's `kv_cache_usage_perc` before v0's `gpu_cache_usage_perc`, and so on).
- The prefix-cache hit rate comes from the server's hit/query counters where it has them (llama.cpp:
  its cached and uncached prompt-token counters, whose sum is the tokens queried): over
  the interval since the previous scrape when tokens were queried in it, else the last interval's
  rate, else the lifetime ratio. A server that only exports a hit-rate gauge is read as is, except
  a negative gauge (vLLM v0's -1 while prefix caching is off), which means no rate: None.
- Text that is not the Prometheus exposition format raises MetricsParseError; well-formed text
  without any metric this module knows gives a ServerLoad whose fields are all None.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)

#: server kinds parse_server_metrics understands; "auto" (poller only) picks one from the first scrape
SERVER_KINDS = ("vllm", "sglang", "tgi", "llamacpp")
#: the metric-name prefix that identifies each kind in a scrape
KIND_PREFIXES = {"vllm": "vllm:", "sglang": "sglang:", "tgi": "tgi_", "llamacpp": "llamacpp:"}
#: labels that name the served model, in the order servers have used them
MODEL_LABELS = ("model_name", "name")


class MetricsParseError(ValueError):
    """A scrape that is not Prometheus text (an HTML error page, truncated output, JSON)."""


@dataclass(frozen=True)
class ServerLoad:
    """One observation of an upstream server's own state. None: the server does not say."""

    server: str  # vllm | sglang | tgi | llamacpp
    observed_at_s: float  # wall-clock time of the scrape (time.time())
    running_requests: int | None = None  # requests in the running batch (llama.cpp: busy slots)
    waiting_requests: int | None = None  # requests queued or deferred
    kv_cache_usage_fraction: float | None = None  # 0..1 of the KV cache in use (TGI: reserved by the batch)
    prefix_cache_hit_rate: float | None = None  # 0..1 of queried prompt tokens found cached
    prompt_tokens_total: float | None = None  # counter: prompt tokens processed since the server started
    generation_tokens_total: float | None = None  # counter: tokens generated since the server started
    prompt_tokens_per_second: float | None = None  # from the counters between two scrapes
    generation_tokens_per_second: float | None = None
    prefix_cache_queries_total: float | None = None  # counters behind the hit rate, kept for the next delta
    prefix_cache_hits_total: float | None = None
    total_slots: int | None = None  # llama.cpp: parallel slots (--parallel)

    def is_empty(self) -> bool:
        """True when the scrape said nothing this module can use."""
        return all(getattr(self, f) is None for f in _LOAD_FIELDS)


_LOAD_FIELDS = ("running_requests", "waiting_requests", "kv_cache_usage_fraction", "prefix_cache_hit_rate",
                "prompt_tokens_total", "generation_tokens_total", "total_slots")


@dataclass(frozen=True)
class _Names:
    """Where one server kind keeps each field; every entry lists names newest first."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    kv_usage: tuple[str, ...] = ()
    # (numerator, denominator) pairs whose ratio is the KV usage (TGI's reserved tokens)
    kv_usage_ratio: tuple[tuple[str, str], ...] = ()
    hit_counters: tuple[tuple[str, str], ...] = ()  # (hits, queries)
    # (cached, uncached) prompt-token counters: hits = cached, queries = cached + uncached (llama.cpp)
    hit_split_counters: tuple[tuple[str, str], ...] = ()
    hit_rate_gauge: tuple[str, ...] = ()
    prompt_tokens: tuple[str, ...] = ()
    generation_tokens: tuple[str, ...] = ()


# Sample names as prometheus-client's parser yields them (counters carry their _total suffix).
_NAMES: dict[str, _Names] = {
    # vllm/v1/metrics/loggers.py (v1) and vllm/engine/metrics.py (v0)
    "vllm": _Names(
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        hit_counters=(("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
                      ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total")),
        hit_rate_gauge=("vllm:gpu_prefix_cache_hit_rate",),
        prompt_tokens=("vllm:prompt_tokens_total",),
        generation_tokens=("vllm:generation_tokens_total",),
    ),
    # python/sglang/srt/metrics/collector.py
    "sglang": _Names(
        running=("sglang:num_running_reqs",),
        waiting=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
        hit_rate_gauge=("sglang:cache_hit_rate",),
        prompt_tokens=("sglang:prompt_tokens_total",),
        generation_tokens=("sglang:generation_tokens_total",),
    ),
    # router/src/server.rs and backends/v3/src/{backend,queue,lib}.rs (metrics-exporter-prometheus)
    "tgi": _Names(
        running=("tgi_batch_current_size",),
        waiting=("tgi_queue_size",),
        kv_usage_ratio=(("tgi_batch_current_max_tokens", "tgi_batch_max_total_tokens"),),
        # TGI has no token counters; its per-request histograms' sums count finished requests' tokens
        prompt_tokens=("tgi_request_input_length_sum",),
        generation_tokens=("tgi_request_generated_tokens_sum",),
    ),
    # tools/server/server.cpp, GET /metrics (needs --metrics)
    "llamacpp": _Names(
        running=("llamacpp:requests_processing",),
        waiting=("llamacpp:requests_deferred",),
        kv_usage=("llamacpp:kv_cache_usage_ratio",),  # removed from newer builds
        # newer builds count cached prompt tokens apart, and prompt_tokens_total excludes them
        hit_split_counters=(("llamacpp:prompt_tokens_cached_total", "llamacpp:prompt_tokens_total"),),
        prompt_tokens=("llamacpp:prompt_tokens_total",),
        generation_tokens=("llamacpp:tokens_predicted_total",),
    ),
}


def _read_samples(text: str, server: str) -> dict[str, list[tuple[Mapping[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, float(s.value)))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")[:120]
        raise MetricsParseError(
            f"the {server} server's metrics are not Prometheus text ({exc}); the response began: {first!r}"
        ) from None
    return samples


def detect_server_kind(text: str) -> str | None:
    """The server kind whose metric prefix a scrape uses most, or None when it names none of them."""
    samples = _read_samples(text, "unknown")
    counts = {kind: sum(1 for name in samples if name.startswith(prefix)) for kind, prefix in KIND_PREFIXES.items()}
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] else None


class _Scrape:
    """The samples of one scrape, filtered to one served model, with sum/mean over label sets."""

    def __init__(self, samples: dict[str, list[tuple[Mapping[str, str], float]]], model_name: str | None):
        self.samples = samples
        self.model_name = model_name

    def _values(self, name: str, drop_negative: bool = False) -> list[float] | None:
        rows = self.samples.get(name)
        if rows is None:
            return None
        out = []
        for labels, value in rows:
            if self.model_name is not None:
                named = next((labels[k] for k in MODEL_LABELS if k in labels), None)
                if named is not None and named != self.model_name:
                    continue
            if math.isnan(value) or (drop_negative and value < 0):
                continue
            out.append(value)
        return out or None

    def total(self, names: Iterable[str]) -> float | None:
        for name in names:
            values = self._values(name)
            if values is not None:
                return sum(values)
        return None

    def mean(self, names: Iterable[str], drop_negative: bool = False) -> float | None:
        for name in names:
            values = self._values(name, drop_negative)
            if values is not None:
                return sum(values) / len(values)
        return None

    def pair(self, pairs: Iterable[tuple[str, str]]) -> tuple[float, float] | None:
        for a, b in pairs:
            va, vb = self.total((a,)), self.total((b,))
            if va is not None and vb is not None:
                return va, vb
        return None


def _fraction(value: float | None) -> float | None:
    return None if value is None else min(1.0, max(0.0, value))


def _count(value: float | None) -> int | None:
    return None if value is None else max(0, int(round(value)))


def parse_server_metrics(text: str, server: str, model_name: str | None = None,
                         previous: ServerLoad | None = None, observed_at_s: float | None = None) -> ServerLoad:
    """One /metrics scrape of a `server` (vllm | sglang | tgi | llamacpp) as a ServerLoad.

    `previous` (the same server's last load) turns counters into rates: the prefix-cache hit
    rate over the interval and the token throughputs. `model_name` keeps only that served model's
    samples where a server exposes several.
    """
    if server not in _NAMES:
        raise ValueError(f"unknown server kind {server!r}; use one of {', '.join(SERVER_KINDS)}")
    names = _NAMES[server]
    scrape = _Scrape(_read_samples(text, server), model_name)
    now_s = time.time() if observed_at_s is None else observed_at_s

    kv = scrape.mean(names.kv_usage)
    if kv is None:
        reserved = scrape.pair(names.kv_usage_ratio)
        if reserved is not None and reserved[1] > 0:
            kv = reserved[0] / reserved[1]

    hits_queries = scrape.pair(names.hit_counters)
    if hits_queries is None:
        split = scrape.pair(names.hit_split_counters)
        if split is not None:
            hits_queries = (split[0], split[0] + split[1])
    load = ServerLoad(
        server=server,
        observed_at_s=now_s,
        running_requests=_count(scrape.total(names.running)),
        waiting_requests=_count(scrape.total(names.waiting)),
        kv_cache_usage_fraction=_fraction(kv),
        # vLLM v0 reports -1 while prefix caching is off: no rate, not a rate of 0
        prefix_cache_hit_rate=_fraction(scrape.mean(names.hit_rate_gauge, drop_negative=True)),
        prompt_tokens_total=scrape.total(names.prompt_tokens),
        generation_tokens_total=scrape.total(names.generation_tokens),
        prefix_cache_hits_total=hits_queries[0] if hits_queries else None,
        prefix_cache_queries_total=hits_queries[1] if hits_queries else None,
    )
    return with_rates(load, previous)


def _counter_rate(now: float | None, before: float | None, seconds: float) -> float | None:
    if now is None or before is None or seconds <= 0 or now < before:  # now < before: the server restarted
        return None
    return (now - before) / seconds


def with_rates(load: ServerLoad, previous: ServerLoad | None) -> ServerLoad:
    """`load` with the rates its counters give against `previous` (hit rate, tokens per second)."""
    hit_rate = load.prefix_cache_hit_rate
    if load.prefix_cache_queries_total is not None and load.prefix_cache_hits_total is not None:
        hits, queries = load.prefix_cache_hits_total, load.prefix_cache_queries_total
        hit_rate = hits / queries if queries > 0 else None  # lifetime, unless an interval says more
        if previous is not None and previous.prefix_cache_queries_total is not None \
                and previous.prefix_cache_hits_total is not None and queries >= previous.prefix_cache_queries_total:
            d_queries = queries - previous.prefix_cache_queries_total
            if d_queries > 0:
                hit_rate = (hits - previous.prefix_cache_hits_total) / d_queries
            elif previous.prefix_cache_hit_rate is not None:
                hit_rate = previous.prefix_cache_hit_rate  # nothing queried since: the last rate still holds
    if previous is None or previous.server != load.server:
        return replace(load, prefix_cache_hit_rate=_fraction(hit_rate))
    seconds = load.observed_at_s - previous.observed_at_s
    return replace(
        load,
        prefix_cache_hit_rate=_fraction(hit_rate),
        prompt_tokens_per_second=_counter_rate(load.prompt_tokens_total, previous.prompt_tokens_total, seconds),
        generation_tokens_per_second=_counter_rate(load.generation_tokens_total, previous.generation_tokens_total,
                                                   seconds),
    )


def parse_llamacpp_slots(slots: Any, observed_at_s: float | None = None) -> ServerLoad:
    """llama.cpp server's GET /slots (a list of slots) as a ServerLoad: busy slots and slot count.

    Builds since late 2024 say `is_processing`; older ones a numeric `state` (0 idle, 1 processing).
    The queue of deferred requests is not in /slots, so waiting stays None.
    """
    if not isinstance(slots, list) or not all(isinstance(s, dict) for s in slots):
        raise MetricsParseError(f"llama.cpp /slots must be a JSON list of slot objects, got {type(slots).__name__}")
    busy = 0
    for s in slots:
        if "is_processing" in s:
            busy += bool(s["is_processing"])
        elif "state" in s:
            busy += s["state"] != 0
        else:
            raise MetricsParseError(f"llama.cpp /slots entry without is_processing or state: keys {sorted(s)[:8]}")
    return ServerLoad(server="llamacpp", observed_at_s=time.time() if observed_at_s is None else observed_at_s,
                      running_requests=busy, total_slots=len(slots))


def merge_llamacpp(metrics: ServerLoad | None, slots: ServerLoad | None) -> ServerLoad | None:
    """/metrics and /slots of one llama.cpp server as one load: /metrics first, /slots fills its gaps."""
    if metrics is None or slots is None:
        return metrics or slots
    return replace(metrics, running_requests=metrics.running_requests if metrics.running_requests is not None
                   else slots.running_requests, total_slots=slots.total_slots)


def to_replica_stats(load: ServerLoad) -> dict[str, Any]:
    """The ReplicaStats keys (scheduler/engines/base.py) this load knows; unknown ones are left out, not zeroed."""
    stats: dict[str, Any] = {}
    if load.running_requests is not None:
        stats["running"] = load.running_requests
    if load.waiting_requests is not None:
        stats["waiting"] = load.waiting_requests
    if load.kv_cache_usage_fraction is not None:
        stats["kv_cache_free_fraction"] = 1.0 - load.kv_cache_usage_fraction
    return stats


def server_root(base_url: str) -> str:
    """An OpenAI base URL (http://host:8000/v1) without its /v1: servers publish /metrics at the root."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class ServerLoadPoller:
    """Scrapes one server every `period_seconds` in the background and keeps its latest load.

    It never raises into its caller: a failed scrape leaves `latest` as it was (so its age grows)
    and records the error in `last_error`. `start()` needs a running event loop; `stop()` cancels
    the loop and any scrape in flight at once.
    """

    def __init__(self, metrics_url: str | None, server: str = "auto", period_seconds: float = 0.5,
                 timeout_seconds: float = 2.0, model_name: str | None = None, slots_url: str | None = None,
                 headers: Mapping[str, str] | None = None, client: Any = None):
        if server not in SERVER_KINDS and server not in ("auto", "generic"):
            raise ValueError(f"unknown server kind {server!r}; use auto or one of {', '.join(SERVER_KINDS)}")
        if metrics_url is None and slots_url is None:
            raise ValueError("a poller needs a metrics_url, a slots_url, or both")
        if period_seconds <= 0:
            raise ValueError("period_seconds must be positive")
        self.metrics_url = metrics_url
        self.slots_url = slots_url
        self.server = "auto" if server == "generic" else server
        self.period_seconds = period_seconds
        self.timeout_seconds = timeout_seconds
        self.model_name = model_name
        self.headers = dict(headers or {})
        self.latest: ServerLoad | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.scrapes = 0
        self._latest_monotonic: float | None = None
        self._client = client
        self._owns_client = client is None
        self._task: asyncio.Task | None = None

    @classmethod
    def for_base_url(cls, base_url: str, server: str = "auto", **kwargs: Any) -> ServerLoadPoller:
        """A poller for the server behind an OpenAI base URL: /metrics at its root, and /slots for llama.cpp."""
        root = server_root(base_url)
        slots = root + "/slots" if server in ("llamacpp", "auto", "generic") else None  # auto: used if llama.cpp
        return cls(root + "/metrics", server=server, slots_url=kwargs.pop("slots_url", slots), **kwargs)

    def age_seconds(self) -> float | None:
        """Seconds since the latest good scrape; None before the first one."""
        return None if self._latest_monotonic is None else time.monotonic() - self._latest_monotonic

    def replica_stats(self, max_age_seconds: float) -> dict[str, Any]:
        """to_replica_stats of the latest load, or {} when there is none younger than max_age_seconds."""
        age = self.age_seconds()
        if self.latest is None or age is None or age > max_age_seconds:
            return {}
        return to_replica_stats(self.latest)

    def _http(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self.timeout_seconds, headers=self.headers)
        return self._client

    async def _get(self, url: str):
        response = await self._http().get(url, timeout=self.timeout_seconds)
        response.raise_for_status()
        return response

    async def _scrape_metrics(self) -> ServerLoad | None:
        if self.metrics_url is None:
            return None
        text = (await self._get(self.metrics_url)).text
        if self.server == "auto":
            kind = detect_server_kind(text)
            if kind is None:
                raise MetricsParseError(f"{self.metrics_url} exposes no vLLM, SGLang, TGI or llama.cpp metrics")
            self.server = kind
            log.info("%s: detected a %s server", self.metrics_url, kind)
        return parse_server_metrics(text, self.server, model_name=self.model_name, previous=self.latest)

    async def _scrape_slots(self) -> ServerLoad | None:
        if self.slots_url is None or self.server not in ("llamacpp", "auto"):
            return None
        return parse_llamacpp_slots((await self._get(self.slots_url)).json())

    async def _scrape(self) -> list[ServerLoad | BaseException | None]:
        if self.server == "auto" and self.metrics_url is not None:
            # the kind decides whether /slots means anything: learn it from /metrics first
            try:
                metrics: ServerLoad | BaseException | None = await self._scrape_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return [exc, None]
            if self.server != "llamacpp":
                return [metrics, None]
            try:
                return [metrics, await self._scrape_slots()]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return [metrics, exc]
        return list(await asyncio.gather(self._scrape_metrics(), self._scrape_slots(), return_exceptions=True))

    async def poll_once(self) -> ServerLoad | None:
        """One scrape now; returns the new load, or None (error recorded) when it failed."""
        metrics, slots = await self._scrape()
        errors = [r for r in (metrics, slots) if isinstance(r, BaseException)]
        for r in errors:
            if isinstance(r, asyncio.CancelledError):
                raise r
        good_metrics = None if isinstance(metrics, BaseException) else metrics
        good_slots = None if isinstance(slots, BaseException) else slots
        load = merge_llamacpp(good_metrics, good_slots)
        self.scrapes += 1
        if load is None:
            self.consecutive_failures += 1
            self.last_error = "; ".join(f"{type(e).__name__}: {e}" for e in errors) or "nothing to scrape"
            if self.consecutive_failures in (1, 10) or self.consecutive_failures % 100 == 0:
                log.warning("load scrape of %s failed (%d in a row): %s", self.metrics_url or self.slots_url,
                            self.consecutive_failures, self.last_error)
            return None
        self.latest = load
        self._latest_monotonic = time.monotonic()
        self.consecutive_failures = 0
        self.last_error = "; ".join(f"{type(e).__name__}: {e}" for e in errors) or None  # one half may fail
        return load

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the loop: the load goes stale and says why
                self.consecutive_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("load poller of %s", self.metrics_url or self.slots_url)
            await asyncio.sleep(max(0.0, self.period_seconds - (time.monotonic() - started)))

    def start(self) -> None:
        """Begin polling on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"load-poller:{self.metrics_url}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Cancel the loop (and a scrape in flight) and close the HTTP client this poller made."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

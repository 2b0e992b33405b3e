"""Prometheus metrics of DESIGN.md (Metrics), in one dedicated registry, in base units.

The gateway calls observe_request() once per finished request; replicas' queue lengths, power
actions and grid intensity have their own setters; device gauges are read at scrape time from a
callable (the node agents' latest DeviceSnapshots), so a scrape never touches a device.

Several gateway replicas (separate processes on the head node) run in prometheus-client's multiprocess
mode: the deployment gives only them PROMETHEUS_MULTIPROC_DIR (multiprocess_dir()), each replica's
request counters and histograms live in files there, and a scrape of any replica sums every replica's,
the dead ones' included, so totals never go back. What every replica sees alike (device readings, power
actions the node agents count, model replicas' queues, grid intensity) is exported by the scraped
replica alone, from its own view, so it appears once and never from a replica that is gone. Budget
shares are read from the shared teams database by whichever replica checks a budget: the latest wins.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: prometheus-client reads it once, when first imported: it must be in the process's environment from its start
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: the state directory's folder for the gateway replicas' metric files
MULTIPROC_DIRNAME = "prometheus-multiproc"
#: the Ray cluster the files were written in: files from another cluster's run are wiped
_CLUSTER_MARK = "cluster-id"

#: joules per request span a CPU-side 135M model (~1 J) to long 70B GPU generations (~10 kJ)
ENERGY_BUCKETS_JOULES = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, float("inf"))
#: time to first token: tens of ms on a warm GPU to tens of s behind a long queue
TTFT_BUCKETS_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60, float("inf"))
#: time per output token: ~5 ms (fast GPU) to ~0.5 s (small CPU box under load)
TPOT_BUCKETS_SECONDS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, float("inf"))

DeviceSource = Callable[[], Iterable[Any]]


def _get(snapshot: Any, name: str) -> Any:
    if isinstance(snapshot, Mapping):
        return snapshot.get(name)
    return getattr(snapshot, name, None)


class _DeviceCollector(Collector):
    """Device gauges built at scrape time from DeviceSnapshot objects or dicts with the same keys."""

    def __init__(self) -> None:
        self.source: DeviceSource | None = None

    def collect(self) -> Iterable[Any]:
        labels = ["device", "node", "kind"]
        power = GaugeMetricFamily("wattlane_device_power_watts", "Device power draw in watts.", labels=labels)
        energy = CounterMetricFamily("wattlane_device_energy_joules", "Device energy counter in joules since the meter started.", labels=labels)
        limit = GaugeMetricFamily("wattlane_device_power_limit_watts", "Enforced device power limit in watts.", labels=labels)
        clock = GaugeMetricFamily("wattlane_device_sm_clock_mhz", "Device SM (graphics) clock in MHz.", labels=labels)
        startup = GaugeMetricFamily("wattlane_device_startup_energy_joules",
                                    "Idle energy metered before the service was ready (models loading), charged to no request.",
                                    labels=labels)
        snapshots: Iterable[Any] = ()
        if self.source is not None:
            try:
                snapshots = list(self.source())
            except Exception:  # a failing source must not break the whole scrape
                log.exception("device snapshot source failed during a scrape")
                snapshots = ()
        for s in snapshots:
            lv = [str(_get(s, "device_id")), str(_get(s, "node")), str(_get(s, "kind"))]
            for family, key in ((power, "power_watts"), (energy, "energy_joules"), (limit, "power_limit_watts"), (clock, "sm_clock_mhz"),
                                (startup, "startup_energy_joules")):
                v = _get(s, key)
                if v is not None:
                    family.add_metric(lv, float(v))
        yield from (power, energy, limit, clock, startup)

    def describe(self) -> Iterable[Any]:
        return []


class _SharedViewCollector(Collector):
    """Series every gateway replica knows alike: model replicas' queues, power actions, grid intensity.

    Kept in plain dicts (never in prometheus-client's value classes, which multiprocess mode would
    write to files and sum over the replicas), so the scraped replica exports its view once."""

    def __init__(self) -> None:
        self.queues: dict[tuple[str, str], tuple[float, float]] = {}
        self.power_actions: dict[tuple[str, str], float] = {}
        self.grid_intensity: dict[str, float] = {}

    def collect(self) -> Iterable[Any]:
        running = GaugeMetricFamily("wattlane_num_requests_running", "Requests running on a replica.", labels=["model", "replica"])
        waiting = GaugeMetricFamily("wattlane_num_requests_waiting", "Requests queued for a replica.", labels=["model", "replica"])
        for (model, replica), (r, w) in list(self.queues.items()):
            running.add_metric([model, replica], r)
            waiting.add_metric([model, replica], w)
        actions = CounterMetricFamily("wattlane_power_actions", "Power setting changes applied, by device and action.",
                                      labels=["device", "action"])
        for (device, action), n in list(self.power_actions.items()):
            actions.add_metric([device, action], n)
        grid = GaugeMetricFamily("wattlane_grid_intensity_gco2e_per_kwh", "Grid carbon intensity in force, gCO2e per kWh.",
                                 labels=["region"])
        for region, v in list(self.grid_intensity.items()):
            grid.add_metric([region], v)
        yield from (running, waiting, actions, grid)

    def describe(self) -> Iterable[Any]:
        return []


class _OwnSeriesCollector(Collector):
    """The wattlane_ series of the multiprocess files (other code in the process may write its own there)."""

    def __init__(self, path: str) -> None:
        self._inner = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterable[Any]:
        return [m for m in self._inner.collect() if m.name.startswith("wattlane_")]


def multiprocess_dir(state_dir: Path, cluster_id: str) -> Path:
    """The gateway replicas' metric folder, emptied when its files come from another Ray cluster.

    Files of this cluster's dead replicas stay: their requests still count and the totals never fall
    (a redeploy that keeps the running replicas must not lose their files from under them either)."""
    path = Path(state_dir) / MULTIPROC_DIRNAME
    mark = path / _CLUSTER_MARK
    if path.exists() and (not mark.exists() or mark.read_text().strip() != cluster_id):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not mark.exists():
        mark.write_text(cluster_id + "\n")
    return path


def multiprocess_active() -> str | None:
    """The multiprocess folder this process writes its series to, or None (in-process, as in tests)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if values.ValueClass is values.MutexValue:
        raise RuntimeError(f"{MULTIPROC_ENV} is set but prometheus_client was imported before it was: "
                           "set it in the process's environment from its start")
    return path


class WattlaneMetrics:
    """All Wattlane series in their own CollectorRegistry (never the global default one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess_path = multiprocess_active()
        r = self.registry
        self.request_energy = Histogram(
            "wattlane_request_energy_joules", "Energy attributed to one request, in joules.", ["model"], buckets=ENERGY_BUCKETS_JOULES, registry=r
        )
        self.energy = Counter("wattlane_energy_joules_total", "Joules attributed to requests, by part (dynamic or idle).", ["model", "part"], registry=r)
        self.carbon = Counter("wattlane_carbon_grams_total", "Grams of CO2e attributed to requests.", ["model"], registry=r)
        self.requests = Counter("wattlane_requests_total", "Finished requests by status.", ["model", "status"], registry=r)
        self.tokens = Counter("wattlane_tokens_total", "Tokens processed, by kind (prompt or completion).", ["model", "kind"], registry=r)
        self.ttft = Histogram("wattlane_request_ttft_seconds", "Time to first token in seconds.", ["model"], buckets=TTFT_BUCKETS_SECONDS, registry=r)
        self.tpot = Histogram("wattlane_request_tpot_seconds", "Mean time per output token after the first, in seconds.", ["model"], buckets=TPOT_BUCKETS_SECONDS, registry=r)
        # savings against the baseline (energy/baseline.py): two counters, because a request can cost more
        # than its baseline (a cascade's repeat) and a counter cannot go down; saved = baseline - actual
        savings_labels = ["model", "team", "api_key"]
        self.savings_baseline = Counter(
            "wattlane_savings_baseline_joules_total",
            "Estimated joules the requests would have used under the savings baseline (largest adequate model).",
            savings_labels, registry=r)
        self.savings_actual = Counter(
            "wattlane_savings_actual_joules_total",
            "Joules attributed to the same requests (those with a baseline estimate).", savings_labels, registry=r)
        # set by the budget enforcement (teams and keys): the share of each budget used in its current period,
        # read from the database all replicas share, so with several replicas the latest reading is the one
        self.budget_used = Gauge(
            "wattlane_budget_used_ratio", "Share of an energy or carbon budget used in its current period (1 = all).",
            ["scope", "name", "kind"], registry=r, multiprocess_mode="mostrecent")
        # routing.quality_budget: each gateway replica holds its own window, so each process keeps its series
        self.quality_budget = Gauge(
            "wattlane_quality_budget",
            "routing.quality_budget in this gateway replica, by figure: target and served_mean (mean predicted "
            "quality of the requests as served), threshold (the predicted quality a model needs now; rank gain-per-joule: "
            "for a request of the window's mean weight) and window "
            "(requests in the window).", ["figure"], registry=r, multiprocess_mode="liveall")
        self.quality_budget_shed = Counter(
            "wattlane_quality_budget_shed_total",
            "Requests the quality budget shed to a smaller model because no adequate one could meet their SLO.",
            registry=r)
        self._quality_budget_shed_seen = 0
        self._shared = _SharedViewCollector()
        self._devices = _DeviceCollector()
        r.register(self._shared)
        r.register(self._devices)

    def observe_request(
        self,
        *,
        model: str,
        status: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        ttft_seconds: float | None = None,
        tpot_seconds: float | None = None,
        joules: float | None = None,
        dynamic_joules: float | None = None,
        idle_joules: float | None = None,
        gco2e: float | None = None,
        api_key: str | None = None,
        team: str | None = None,
        baseline_joules: float | None = None,
    ) -> None:
        """Count one finished request. None means "not known" and is left out, never counted as 0."""
        self.requests.labels(model=model, status=status).inc()
        if prompt_tokens:
            self.tokens.labels(model=model, kind="prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model=model, kind="completion").inc(completion_tokens)
        if ttft_seconds is not None:
            self.ttft.labels(model=model).observe(ttft_seconds)
        if tpot_seconds is not None:
            self.tpot.labels(model=model).observe(tpot_seconds)
        if joules is not None:
            self.request_energy.labels(model=model).observe(joules)
        if dynamic_joules is not None:
            self.energy.labels(model=model, part="dynamic").inc(max(0.0, dynamic_joules))
        if idle_joules is not None:
            self.energy.labels(model=model, part="idle").inc(max(0.0, idle_joules))
        if gco2e is not None:
            self.carbon.labels(model=model).inc(max(0.0, gco2e))
        if baseline_joules is not None and joules is not None:
            who = {"model": model, "team": team or "", "api_key": api_key or ""}
            self.savings_baseline.labels(**who).inc(max(0.0, baseline_joules))
            self.savings_actual.labels(**who).inc(max(0.0, joules))

    def set_budget_used(self, *, scope: str, name: str, kind: str, used_ratio: float) -> None:
        """scope: "key" or "team"; name: its id; kind: "energy" or "carbon"; used_ratio: used / allowed."""
        self.budget_used.labels(scope=scope, name=name, kind=kind).set(used_ratio)

    def set_quality_budget(self, state: Mapping[str, Any]) -> None:
        """A QualityBudget.state(): its figures as gauges (served_mean None: nothing served yet, left out)."""
        for figure in ("target", "served_mean", "threshold", "window"):
            value = state.get(figure)
            if value is not None and math.isfinite(value):
                self.quality_budget.labels(figure=figure).set(value)
        shed = int(state.get("shed") or 0)
        if shed > self._quality_budget_shed_seen:
            self.quality_budget_shed.inc(shed - self._quality_budget_shed_seen)
            self._quality_budget_shed_seen = shed

    def set_replica_queue(self, *, model: str, replica: str, running: int, waiting: int) -> None:
        self._shared.queues[(model, replica)] = (float(running), float(waiting))

    def remove_replica(self, *, model: str, replica: str) -> None:
        self._shared.queues.pop((model, replica), None)

    def power_action(self, *, device: str, action: str, count: int = 1) -> None:
        """action: e.g. set_power_limit, reset_power_limit, lock_clocks, reset_clocks, restore."""
        if count < 0:
            raise ValueError("a counter only goes up")
        key = (device, action)
        self._shared.power_actions[key] = self._shared.power_actions.get(key, 0.0) + count

    def set_grid_intensity(self, *, region: str, gco2e_per_kwh: float) -> None:
        self._shared.grid_intensity[region] = float(gco2e_per_kwh)

    def set_device_source(self, source: DeviceSource | None) -> None:
        """A callable returning DeviceSnapshot objects (or dicts with their keys), called per scrape."""
        self._devices.source = source

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics.

        In multiprocess mode: every gateway replica's request series, summed, plus this replica's view
        of what they all share."""
        if self.multiprocess_path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        scrape = CollectorRegistry()
        scrape.register(_OwnSeriesCollector(self.multiprocess_path))
        scrape.register(self._shared)
        scrape.register(self._devices)
        return generate_latest(scrape), CONTENT_TYPE_LATEST


"""Discrete-event fleet simulation: replay a trace through routing, the batching core and the governor in virtual time.

One event heap drives everything: request arrivals, the end of each replica's current segment
(BatchCore), governor steps every power.interval_seconds and power-timeline samples. Devices are
SimulatedGpu objects reading the heap's clock, so the governor sees the same Device interface as
on real NVML GPUs. The run is deterministic for a given trace, config and seed.

Routing (auto_selection="route", the default) is the gateway's own code: every arrival goes through
scheduler.routing.select.route() with the live ReplicaStats of every replica, the shipped adequacy
predictor and the config's routing defaults. Trace requests get prompts and correctness labels from
the held-out routing split (scheduler.sim.prompts), so a run also reports the answer accuracy those
labels imply. Replica choice: route()'s own energy placement when the placement hook is
scheduler.routing.placement.place ("energy"); otherwise the hook picks among the chosen model's
replicas (round-robin cycles per model). auto_selection="placement-only" is the older behaviour:
"auto" lets the placement hook choose among every replica of every model, with no model selection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, get_args

import numpy as np

from scheduler.config import RoutingConfig, WattlaneConfig
from scheduler.config_error import ConfigError
from scheduler.devices.simulated import SimulatedGpu
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.sim.builders import build_core, model_profile_for, replica_device_groups
from scheduler.sim.core import BatchCore, CoreListener, RecentLatencies, SimRequest, replica_stats
from scheduler.sim.event_loop import EventLoop, VirtualClock
from scheduler.sim.fleet_result import FleetResult
from scheduler.sim.hooks import GovernorHook, Placement, RoundRobin
from scheduler.sim.metered import MeteredGpu
from scheduler.sim.profiles import ProfileError
from scheduler.sim.trace import Trace, TraceError

AUTO_SELECTIONS = ("route", "placement-only")
#: what route() is told of each output length in route mode (FleetSimulator output_lengths)
OUTPUT_LENGTHS = ("known", "running-mean")
#: how route() picks among adequate models that meet the SLO (the config's routing.model_choice values)
MODEL_CHOICES: tuple[str, ...] = get_args(RoutingConfig.model_fields["model_choice"].annotation)
#: the running-mean estimate before any request has arrived
FIRST_OUTPUT_ESTIMATE = 256
#: timeline samples plus governor steps one replay may take. They recur at a fixed virtual interval whatever the
#: traffic, until the arrivals end and the fleet has drained, so their count is that span over the interval: a tiny
#: speedup (1e-300 stretches an hour to 1e303 s) or interval would never finish. 100,000 samples take about a
#: second and keep about 100 MB of timeline; the packaged hour at the defaults needs about 3,700 events.
MAX_PERIODIC_EVENTS = 100_000


class ReplayTooLongError(ValueError):
    """The replay would schedule more than MAX_PERIODIC_EVENTS timeline samples and governor steps."""


class SimReplica(CoreListener):
    """One replica in virtual time: its core, its wake-up event and its latency records."""

    def __init__(self, replica_id: str, model_id: str, core: BatchCore, loop: EventLoop, on_done: Callable[[SimRequest], None],
                 park_idle_seconds: float | None = None):
        self.replica_id, self.model_id, self.core, self.loop = replica_id, model_id, core, loop
        self.recent = RecentLatencies()
        self._on_done = on_done
        self._token = 0
        self._wake_at: float | None = None
        #: parking: after this long with no work, lock every GPU to its lowest clock; release on the next arrival
        self.park_idle_seconds = park_idle_seconds
        self._park_token = 0
        self._parked_settings: list[tuple[float, float] | None] | None = None
        self.parks = 0
        #: False once a pool move took its GPUs (scheduler/sim/pools.py): out of routing, stats and the governor
        self.active = True
        core.listener = self
        for g in core.gpus:
            g.add_settings_listener(self._settings_changed)

    # parking lives here rather than in a governor group so that it composes with any governor
    # policy (slo-feedback steers busy GPUs only). The clock lock takes effect at once: NVML clock
    # changes take milliseconds, well below the SLO scale.
    def _idle_now(self) -> None:
        if self.park_idle_seconds is None:
            return
        self._park_token += 1
        self.loop.at(self.loop.clock.now + self.park_idle_seconds, self._park, self._park_token)

    def _park(self, token: int) -> None:
        if token != self._park_token or not self.core.idle or self._parked_settings is not None:
            return
        self._parked_settings = [g.locked_clocks_mhz() for g in self.core.gpus]
        self.parks += 1
        for g in self.core.gpus:
            low = g.clock_constraints().min_mhz
            g.set_locked_clocks_mhz(low, low)

    def _unpark(self) -> None:
        saved, self._parked_settings = self._parked_settings, None
        self._park_token += 1
        if saved is None:
            return
        for g, lock in zip(self.core.gpus, saved):
            if lock is None:
                g.reset_locked_clocks()
            else:
                g.set_locked_clocks_mhz(*lock)

    @property
    def parked(self) -> bool:
        return self._parked_settings is not None

    def on_finish(self, req: SimRequest, now: float) -> None:
        self.recent.add(req)
        self._on_done(req)

    def _schedule(self, t: float | None) -> None:
        if t == self._wake_at:
            return
        self._token += 1
        self._wake_at = t
        if t is not None:
            self.loop.at(t, self._wake, self._token)

    def _wake(self, token: int) -> None:
        if token != self._token:
            return  # superseded by a re-plan
        self._wake_at = None
        nxt = self.core.advance(self.loop.clock.now)
        self._schedule(nxt)
        if nxt is None:
            self._idle_now()

    def submit(self, req: SimRequest) -> None:
        self._unpark()
        self._schedule(self.core.submit(req, self.loop.clock.now))

    def _settings_changed(self, _gpu: SimulatedGpu) -> None:
        self._schedule(self.core.replan_after_settings_change(self.loop.clock.now))

    def stats(self) -> dict:
        return replica_stats(self.core, self.model_id, self.replica_id, self.recent, self.loop.clock.now)


class FleetSimulator:
    """Builds simulated devices and replicas from a config and replays a trace through them."""

    def __init__(
        self,
        config: WattlaneConfig,
        *,
        placement: Placement | None = None,
        governor_factory: Callable[[WattlaneConfig, dict[str, SimulatedGpu], Callable[[], float]], GovernorHook | None] | None = None,
        seed: int = 0,
        model: str | None = None,
        slo_ttft_seconds: float | None = None,
        slo_tpot_seconds: float | None = None,
        timeline_interval_seconds: float = 60.0,
        auto_selection: str = "route",
        min_quality: float | None = None,
        predictor: Any | None = None,
        prompt_pool: Any | None = None,
        strong_models: Sequence[str] | None = None,
        park_idle_seconds: float | None = None,
        oracle: bool = False,
        oracle_model_choice: str = "lowest-energy",
        quality_budget: Any | None = None,
        slo_batching: bool = False,
        batch_clocks: bool = False,
        clock_switch_seconds: float | None = None,
        pools: bool = False,
        output_lengths: str = "known",
    ):
        """model: every request's model id, or "auto" (model selection); either wins over a trace's Model column.
            None: the trace's Model column where it has one, else "auto".
        auto_selection: "route" (model selection + placement by scheduler.routing.select.route) or
        "placement-only" (the placement hook chooses among all replicas; no model selection).
        min_quality: quality target for route mode (default: config.routing.default_min_quality).
        predictor: adequacy predictor (default: the shipped one, or config.routing.predictor_path).
        prompt_pool: scheduler.sim.prompts.PromptPool (default: the held-out routing split).
        strong_models: model ids answering as the labels' strong model, the rest as the weak one
            (default: the largest model when there are several; with one model, no label accuracy).
        park_idle_seconds: park a replica's GPUs (lowest clock) after this long without work; None: never.
        oracle: route mode with perfect knowledge of adequacy: the small model is adequate exactly when the
            prompt's labels say it answers as well as the large one (weak correct, or strong wrong too);
            route() then picks the lowest predicted energy among adequate models that meet the SLO.
        oracle_model_choice: with oracle, how route() picks among the adequate models that meet the SLO:
            "lowest-energy" (the oracle) or "smallest" (Wattlane's default rule: full Wattlane's routing
            with a perfect predictor).
        quality_budget: a scheduler.routing.quality_budget.QualityBudget: hold min_quality as a window
            average instead of a per-request wall (route mode).
        slo_batching: each replica sizes its prefill chunks and running sequences from the SLO
            (BatchCore.set_slo_batching) instead of the fixed engine options.
        batch_clocks: each replica sets its SM clock per batch from the deadlines of the work in it and
            drops it between batches (BatchCore.set_batch_clocks); a governor's clock lock is its ceiling.
        clock_switch_seconds: with batch_clocks, the stall of one clock change (default core.CLOCK_SWITCH_SECONDS).
        pools: pools that follow the load (scheduler/sim/pools.py): GPUs move from the smallest model's replicas
            to an extra replica of the largest model while routing cannot place its requests within their SLO,
            and back; each move costs a model load (route mode).
        output_lengths: what route() is told of a request's output length (route mode): "known", its true
            length (as if max_tokens were exact); "running-mean", the mean output length of the requests that
            arrived before it (256 for the first), as a gateway that only learns the typical length would.
        """
        if auto_selection not in AUTO_SELECTIONS:
            raise ValueError(f"auto_selection must be one of {', '.join(AUTO_SELECTIONS)}, got {auto_selection!r}")
        if min_quality is not None and not 0.0 <= min_quality <= 1.0:
            raise ValueError(f"min_quality must be between 0 and 1, got {min_quality!r}")
        if park_idle_seconds is not None and park_idle_seconds < 0:
            raise ValueError(f"park_idle_seconds must be >= 0, got {park_idle_seconds!r}")
        if oracle and auto_selection != "route":
            raise ValueError("oracle needs auto_selection='route'")
        if oracle_model_choice not in MODEL_CHOICES:
            raise ValueError(f"oracle_model_choice must be one of {', '.join(MODEL_CHOICES)}, got {oracle_model_choice!r}")
        if pools and auto_selection != "route":
            raise ValueError("pools need auto_selection='route'")
        if model not in (None, "auto") and model not in {m.id for m in config.models}:
            # every request would be rejected, and the replay would report a fleet that served nothing
            raise ValueError(f"model {model!r} is not one of the config's models "
                             f"({', '.join(m.id for m in config.models)}) or 'auto'")
        for name, seconds in (("slo_ttft_seconds", slo_ttft_seconds), ("slo_tpot_seconds", slo_tpot_seconds),
                              ("timeline_interval_seconds", timeline_interval_seconds)):
            if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{name} must be a positive finite number of seconds, got {seconds!r}")
        if output_lengths not in OUTPUT_LENGTHS:
            raise ValueError(f"output_lengths must be one of {', '.join(OUTPUT_LENGTHS)}, got {output_lengths!r}")
        self.output_lengths = output_lengths
        self.pools = pools
        self.pool_manager: Any = None
        self._clock_switch_seconds = clock_switch_seconds
        self.auto_selection = auto_selection
        self.min_quality = min_quality
        self.park_idle_seconds = park_idle_seconds
        self.oracle = oracle
        self.oracle_model_choice = oracle_model_choice
        self.quality_budget = quality_budget
        self.slo_batching = slo_batching
        self.batch_clocks = batch_clocks
        self._predictor = predictor
        self._prompt_pool = prompt_pool
        self.strong_models = None if strong_models is None else frozenset(strong_models)
        self.config = config
        self.clock = VirtualClock()
        self.loop = EventLoop(self.clock)
        self.seed = seed
        self.placement = placement or RoundRobin(start=seed)
        self.model = model
        self.slo_ttft = slo_ttft_seconds if slo_ttft_seconds is not None else config.routing.default_slo.ttft_ms / 1000.0
        self.slo_tpot = slo_tpot_seconds if slo_tpot_seconds is not None else config.routing.default_slo.tpot_ms / 1000.0
        self.timeline_interval = timeline_interval_seconds
        self.devices: dict[str, MeteredGpu] = {}
        for d in config.devices.simulated:
            try:
                self.devices[d.id] = MeteredGpu(d.id, d.profile, node=d.node, clock=self.clock)
            except ProfileError as exc:
                raise ConfigError(str(exc), file=config.source_path, key=f"devices.simulated (id {d.id}).profile", fix="use a profile from scheduler/sim/data/gpus.json") from None
        self.replicas: list[SimReplica] = []
        self._done: list[SimRequest] = []
        for i, m in enumerate(config.models):
            if m.engine != "simulated":
                continue
            for r, gpus in enumerate(replica_device_groups(m, config, self.devices, key=f"models[{i}] (id {m.id})")):
                core = self._core(m, gpus, key=f"models[{i}] (id {m.id})")
                self.replicas.append(SimReplica(f"{m.id}#{r}", m.id, core, self.loop, self._done.append, park_idle_seconds))
        if not self.replicas:
            raise ConfigError("no model with engine 'simulated'", file=config.source_path, key="models", fix="set engine: simulated on at least one model")
        self.governor = governor_factory(config, self.devices, self.clock) if governor_factory else None

    def _core(self, model: Any, gpus: list, *, key: str) -> BatchCore:
        core = build_core(model, self.config, gpus, key=key)
        if self.slo_batching:
            core.set_slo_batching(self.slo_ttft, self.slo_tpot)
        if self.batch_clocks:
            core.set_batch_clocks(self.slo_ttft, self.slo_tpot, **({} if self._clock_switch_seconds is None else
                                                                 {"switch_seconds": self._clock_switch_seconds}))
        return core

    # --- pool moves (scheduler/sim/pools.py) ---------------------------------------------------
    def replica_width(self, model_id: str) -> int:
        """GPUs per replica of a model (its tensor-parallel width)."""
        m = self.config.model(model_id)
        if m is None:
            raise KeyError(model_id)
        return model_profile_for(m, self.config, self.devices, key=f"model {model_id}").num_gpus

    def add_replica(self, model_id: str, gpus: list) -> int:
        """A new replica of a model on these GPUs (their old replica retired); its index in self.replicas."""
        m = self.config.model(model_id)
        assert m is not None
        n = sum(1 for r in self.replicas if r.model_id == model_id)
        model = m.model_copy(update={"devices": [g.device_id for g in gpus], "replicas": 1})
        rep = SimReplica(f"{model_id}#{n}", model_id, self._core(model, gpus, key=f"model {model_id}"), self.loop,
                         self._done.append, self.park_idle_seconds)
        self.replicas.append(rep)
        rep._idle_now()
        return len(self.replicas) - 1

    def retire_replica(self, rep: "SimReplica") -> None:
        """An idle replica gives up its GPUs: no more parking or clock settings from it, defaults while they load."""
        rep.active = False
        rep._unpark()
        rep.park_idle_seconds = None
        for g in rep.core.gpus:
            g.reset_locked_clocks()

    def _check_trace(self, trace: Trace) -> Trace:
        """The trace as replayed (an explicit model drops its Model column); refuses one that names models the fleet lacks
        or that would take too many periodic events to replay."""
        if self.model is not None and trace.model is not None:
            trace = Trace(trace.arrival_s, trace.prompt_tokens, trace.output_tokens, None, trace.source)
        if trace.model is not None:
            known = [m.id for m in self.config.models]
            unknown = sorted(set(trace.model) - set(known) - {"auto"})
            if unknown:
                # each such request would be rejected, and the replay would report it as the fleet's refusal
                raise TraceError(f"{trace.source or 'trace'}: its Model column names {', '.join(map(repr, unknown))}, not a model "
                                 f"of {self.config.source_path or 'the config'} ({', '.join(known)}); use those ids or 'auto', "
                                 "or give every request one model (wattlane simulate --model)")
        span = float(trace.arrival_s[-1]) if len(trace) else 0.0
        events = span / self.timeline_interval
        where = f"{events:.3g} timeline samples at {self.timeline_interval:g} s"
        if self.governor is not None:
            events += span / self.config.power.interval_seconds
            where += f" and {span / self.config.power.interval_seconds:.3g} governor steps at {self.config.power.interval_seconds:g} s"
        if not events <= MAX_PERIODIC_EVENTS:
            raise ReplayTooLongError(f"the trace's arrivals span {span:.3g} virtual seconds: {where}, "
                                     f"more than the {MAX_PERIODIC_EVENTS:,} a replay may take")
        return trace

    def run(self, trace: Trace) -> FleetResult:
        wall0 = time.perf_counter()
        trace = self._check_trace(trace)
        n = len(trace)
        arrivals, prompts, outputs = trace.arrival_s, trace.prompt_tokens, trace.output_tokens
        models = trace.model
        rejected = [0]
        by_model: dict[str, list[int]] = {}
        for idx, rep in enumerate(self.replicas):
            by_model.setdefault(rep.model_id, []).append(idx)
        ctx_limit = {m.id: m.context_length for m in self.config.models}
        on_arrival_work = getattr(self.governor, "on_work_arrived", None)
        routed = self._routed_arrivals(trace, by_model, rejected, on_arrival_work) if self.auto_selection == "route" else None

        def arrive(i: int) -> None:
            now = self.clock.now
            target = models[i] if models is not None else self.model or "auto"
            cands = list(range(len(self.replicas))) if target == "auto" else by_model.get(target, [])
            p, o = int(prompts[i]), int(outputs[i])
            cands = [c for c in cands if p + o <= ctx_limit[self.replicas[c].model_id]]
            request = GenerationRequest(
                request_id=f"trace-{i}", kind=ModelKind.CHAT, prompt_tokens_hint=p,
                params=SamplingParams(max_tokens=o, force_output_tokens=o),
            )
            choice = self.placement(request, [self.replicas[c].stats() for c in cands]) if cands else None
            if choice is None:
                rejected[0] += 1
                return
            rep = self.replicas[cands[choice]]
            if on_arrival_work is not None:
                for g in rep.core.gpus:
                    on_arrival_work(g.device_id, now)
            rep.submit(SimRequest(request.request_id, p, o, now, model_id=rep.model_id))

        on_arrive = routed.arrive if routed is not None else arrive
        if self.pools:
            from scheduler.routing.select import size_order
            from scheduler.sim.pools import CHECK_SECONDS, PoolManager

            present = [m.id for m in size_order(self.config.models) if m.id in by_model]
            if len(present) >= 2:
                self.pool_manager = PoolManager(self, by_model, present[0], present[-1])

                def check_pools(_: Any) -> None:
                    self.pool_manager.check(self.clock.now)
                    if self.clock.now < last_arrival or self.pool_manager.busy():
                        self.loop.at(self.clock.now + CHECK_SECONDS, check_pools)

                self.loop.at(CHECK_SECONDS, check_pools)
        for rep in self.replicas:
            rep._idle_now()  # replicas with no work from the start may park too
        for i in range(n):
            self.loop.at(float(arrivals[i]), on_arrive, i)
        last_arrival = float(arrivals[-1]) if n else 0.0

        steps = [0]
        periodic = [0]

        def count_periodic() -> None:
            # the arrival span was checked up front; this catches a drain that outlasts the cap
            periodic[0] += 1
            if periodic[0] > MAX_PERIODIC_EVENTS:
                raise ReplayTooLongError(f"the fleet was still draining at {self.clock.now:.3g} virtual seconds after "
                                         f"{MAX_PERIODIC_EVENTS:,} timeline samples and governor steps, the most a replay may take")

        if self.governor is not None:
            interval = self.config.power.interval_seconds

            def govern(_: Any) -> None:
                stats_by_device: dict[str, list[dict]] = {d: [] for d in self.devices}
                for rep in self.replicas:
                    if not rep.active:
                        continue
                    s = rep.stats()
                    for g in rep.core.gpus:
                        stats_by_device[g.device_id].append(s)
                self.governor.step(self.clock.now, stats_by_device)
                steps[0] += 1
                count_periodic()
                if self.clock.now < last_arrival or any(not r.core.idle for r in self.replicas):
                    self.loop.at(self.clock.now + interval, govern)

            self.loop.at(0.0, govern)

        timeline: dict[str, dict[str, list[float]]] = {d: {"t_s": [], "power_watts": [], "power_limit_watts": [], "sm_clock_mhz": []} for d in self.devices}
        last_energy = {d: g.energy_joules_at(0.0) for d, g in self.devices.items()}

        def sample(_: Any) -> None:
            now = self.clock.now
            for d, g in self.devices.items():
                e = g.energy_joules_at(now)
                tl = timeline[d]
                tl["t_s"].append(now)
                tl["power_watts"].append((e - last_energy[d]) / self.timeline_interval)
                tl["power_limit_watts"].append(g.power_limit_watts())
                tl["sm_clock_mhz"].append(g.sm_clock_mhz())
                last_energy[d] = e
            count_periodic()
            if now < last_arrival or any(not r.core.idle for r in self.replicas):
                self.loop.at(now + self.timeline_interval, sample)

        self.loop.at(self.timeline_interval, sample)
        self.loop.run()
        done = self._done
        end = max([last_arrival] + [r.finish_s for r in done if r.finish_s is not None])

        ttft = np.array([r.ttft_seconds for r in done if r.ttft_seconds is not None])
        tpot = np.array([r.tpot_seconds for r in done if r.tpot_seconds is not None])
        slo_ok = sum(
            1 for r in done
            if r.ttft_seconds is not None and r.ttft_seconds <= self.slo_ttft and (r.tpot_seconds is None or r.tpot_seconds <= self.slo_tpot)
        )
        energy = {d: g.energy_joules_at(end) for d, g in self.devices.items()}
        devices = {}
        for d, g in self.devices.items():
            p = timeline[d]["power_watts"]
            devices[d] = {
                "profile": g.profile.key, "node": g.node, "energy_joules": energy[d], "mean_power_watts": energy[d] / end if end > 0 else 0.0,
                "max_interval_power_watts": max(p) if p else None, "min_interval_power_watts": min(p) if p else None,
                "power_limit_watts_final": g.power_limit_watts(), "locked_clocks_mhz_final": g.locked_clocks_mhz(),
                "energy_method": g.energy_method.value,
            }
        replicas = {
            r.replica_id: {"model": r.model_id, "active": r.active, "devices": [g.device_id for g in r.core.gpus], "completed": r.core.completed,
                           "preemptions": r.core.preemptions, "tokens_generated": r.core.tokens_generated}
            for r in self.replicas
        }
        used = {id(g) for r in self.replicas for g in r.core.gpus}
        accounting = {d: g.accounting_at(max(end, g._t_last)) for d, g in self.devices.items()}
        return FleetResult(
            requests=n, completed=len(done), rejected=rejected[0], virtual_seconds=end, wall_seconds=time.perf_counter() - wall0,
            energy_joules=sum(energy.values()),
            prompt_tokens=int(sum(r.prompt_tokens for r in done)), completion_tokens=int(sum(r.output_tokens for r in done)),
            ttft_seconds=ttft, tpot_seconds=tpot, slo_ok=slo_ok, slo={"ttft_seconds": self.slo_ttft, "tpot_seconds": self.slo_tpot},
            devices=devices, timeline=timeline, replicas=replicas,
            preemptions=sum(r.core.preemptions for r in self.replicas), governor_steps=steps[0],
            settings={"seed": self.seed, "model": self.model or ("trace Model column" if models is not None else "auto"),
                      "auto_selection": self.auto_selection,
                      "park_idle_seconds": self.park_idle_seconds, "oracle": self.oracle,
                      "oracle_model_choice": self.oracle_model_choice if self.oracle else None,
                      "slo_batching": self.slo_batching,
                      "batch_clocks": self.batch_clocks, "clock_switches": sum(r.core.clock_switches for r in self.replicas),
                      "quality_budget": self.quality_budget is not None, "output_lengths": self.output_lengths,
                      "pools": self.pool_manager.summary(end) if self.pool_manager is not None else None,
                      "unused_devices": [d for d, g in self.devices.items() if id(g) not in used]},
            routing=routed.summary() if routed is not None else {},
            accounting=accounting,
            done=done,
            parks=sum(r.parks for r in self.replicas),
        )

    def _routed_arrivals(self, trace: Trace, by_model: dict[str, list[int]], rejected: list[int],
                         on_arrival_work: Callable[[str, float], Any] | None) -> "_RoutedArrivals":
        from scheduler.routing.adequacy import load_predictor
        from scheduler.sim.prompts import held_out_pool

        predictor = self._predictor if self._predictor is not None else load_predictor(self.config.routing.predictor_path)
        pool = self._prompt_pool if self._prompt_pool is not None else held_out_pool()
        return _RoutedArrivals(self, trace, by_model, rejected, on_arrival_work, predictor, pool)


class _CachedAdequacy:
    """The predictor's adequacy per prompt text, computed once: trace replays draw the same prompts many times."""

    def __init__(self, predictor: Any):
        self._predictor = predictor
        self._cache: dict[str, float] = {}

    def adequacy(self, prompt: str) -> float:
        a = self._cache.get(prompt)
        if a is None:
            a = self._cache[prompt] = self._predictor.adequacy(prompt)
        return a


class _Known:
    """The oracle's predictor: one request's true adequacy."""

    def __init__(self, adequacy: float):
        self._a = adequacy

    def adequacy(self, prompt: str) -> float:
        return self._a


class _RoutedArrivals:
    """Arrivals in route mode: the gateway's route() picks model and replica from live replica stats."""

    def __init__(self, sim: FleetSimulator, trace: Trace, by_model: dict[str, list[int]], rejected: list[int],
                 on_arrival_work: Callable[[str, float], Any] | None, predictor: Any, pool: Any):
        from scheduler.routing.controls import merge_request_controls
        from scheduler.routing.placement import place as energy_place
        from scheduler.routing.select import size_order

        self.sim, self.trace, self.by_model, self.rejected, self.on_arrival_work = sim, trace, by_model, rejected, on_arrival_work
        self.models = [m for m in size_order(sim.config.models) if m.id in by_model]
        self.model_pos = {m.id: k for k, m in enumerate(self.models)}
        # the sim's SLO is the request's SLO, so route() plans against what the run is scored on
        fields: dict[str, Any] = {"slo": {"ttft_ms": sim.slo_ttft * 1000.0, "tpot_ms": sim.slo_tpot * 1000.0}}
        if sim.min_quality is not None:
            fields["min_quality"] = sim.min_quality
        if sim.oracle:
            fields["min_quality"] = 0.5  # adequacy is exactly 0 or 1 below
        self.controls = merge_request_controls(None, fields, sim.config.routing)
        if sim.oracle:
            from dataclasses import replace as _replace

            self.controls = _replace(self.controls, model_choice=sim.oracle_model_choice)
        self.predictor = _CachedAdequacy(predictor)
        self.pool = pool
        self.prompt_index = pool.draw(len(trace), sim.seed)
        # the oracle's adequacy per request: the small model answers as well as the large one
        self.oracle_adequacy = ((pool.weak_correct[self.prompt_index] > 0) | (pool.strong_correct[self.prompt_index] == 0)).astype(float) if sim.oracle else None
        # "energy" placement is route()'s own (the same rank_replicas); any other hook picks among the chosen model's replicas
        self.route_places = sim.placement is energy_place
        if isinstance(sim.placement, RoundRobin):
            self.hooks = {m: RoundRobin(start=sim.seed) for m in by_model}
        else:
            self.hooks = {m: sim.placement for m in by_model}
        if sim.strong_models is not None:
            self.strong = frozenset(sim.strong_models)
        else:
            self.strong = frozenset({self.models[-1].id}) if len(self.models) > 1 else None
        self.served_model = np.full(len(trace), -1, dtype=np.int16)
        self._outputs_seen, self._arrived = 0, 0  # output_lengths "running-mean"
        self.route_seconds: list[float] = []
        self.best_effort = 0
        self.spilled = 0
        self.rejections: dict[str, int] = {}

    def arrive(self, i: int) -> None:
        from scheduler.routing.select import RouteRequest, route

        sim = self.sim
        now = sim.clock.now
        target = self.trace.model[i] if self.trace.model is not None else sim.model or "auto"
        p, o = int(self.trace.prompt_tokens[i]), int(self.trace.output_tokens[i])
        if sim.output_lengths == "running-mean":
            estimate = round(self._outputs_seen / self._arrived) if self._arrived else FIRST_OUTPUT_ESTIMATE
            self._outputs_seen += o
            self._arrived += 1
        else:
            estimate = o
        wanted = self.by_model if target == "auto" else {target: self.by_model.get(target, [])}
        stats = {m: [sim.replicas[c].stats() for c in idx] for m, idx in wanted.items()}
        rreq = RouteRequest(kind=self.models[0].kind if target == "auto" else next((m.kind for m in self.models if m.id == target), "chat"),
                            model=target, prompt_text=self.pool.prompts[self.prompt_index[i]], prompt_tokens=p,
                            max_tokens=o, output_tokens_estimate=estimate)
        predictor = self.predictor if self.oracle_adequacy is None else _Known(float(self.oracle_adequacy[i]))
        decision = route(self.models, rreq, self.controls, predictor, stats, quality_budget=sim.quality_budget)
        self.route_seconds.append(decision.decision_seconds)
        if sim.pool_manager is not None:
            sim.pool_manager.observe(decision)
        if decision.error is not None or decision.model_id is None:
            code = decision.error.code if decision.error is not None else "no_model"
            self.rejections[code] = self.rejections.get(code, 0) + 1
            self.rejected[0] += 1
            return
        mid = decision.model_id
        if not decision.slo_met:
            self.best_effort += 1
        elif "spilling" in decision.reason:
            self.spilled += 1
        if self.route_places:
            choice = decision.replica_index
        else:
            request = GenerationRequest(request_id=f"trace-{i}", kind=ModelKind(rreq.kind), prompt_tokens_hint=p,
                                        params=SamplingParams(max_tokens=o, force_output_tokens=o))
            choice = self.hooks[mid](request, stats[mid])
        if choice is None:
            self.rejections["no_replica"] = self.rejections.get("no_replica", 0) + 1
            self.rejected[0] += 1
            return
        rep = sim.replicas[self.by_model[mid][choice]]
        if self.on_arrival_work is not None:
            for g in rep.core.gpus:
                self.on_arrival_work(g.device_id, now)
        self.served_model[i] = self.model_pos[mid]
        rep.submit(SimRequest(f"trace-{i}", p, o, now, model_id=mid))

    def summary(self) -> dict[str, Any]:
        served = self.served_model >= 0
        n_served = int(served.sum())
        pidx = self.prompt_index
        weak = self.pool.weak_correct[pidx].astype(np.float64)
        strong = self.pool.strong_correct[pidx].astype(np.float64)
        is_strong = np.array([m.id in (self.strong or ()) for m in self.models] + [False])
        correct = np.where(is_strong[self.served_model], strong, weak)
        labelled = self.strong is not None
        secs = np.asarray(self.route_seconds) if self.route_seconds else np.zeros(1)
        counts = {m.id: int((self.served_model == k).sum()) for k, m in enumerate(self.models)}
        largest = self.models[-1].id
        return {
            "selection": "scheduler.routing.select.route",
            "placement": "route (energy, scheduler.routing.placement.rank_replicas)" if self.route_places
            else f"{type(self.sim.placement).__name__ if isinstance(self.sim.placement, RoundRobin) else getattr(self.sim.placement, '__name__', repr(self.sim.placement))} among the chosen model's replicas",
            "min_quality": self.controls.min_quality,
            "slo": {"ttft_ms": self.controls.ttft_ms, "tpot_ms": self.controls.tpot_ms},
            "prompts": self.pool.source,
            "prompt_pool_size": len(self.pool),
            "label_model_map": None if not labelled else {"strong": sorted(self.strong), "weak": [m.id for m in self.models if m.id not in self.strong]},
            "requests_by_model": counts,
            "large_model_id": largest,
            "large_model_share": counts[largest] / n_served if n_served else None,
            "label_accuracy": float(correct[served].mean()) if n_served and labelled else None,
            "weak_accuracy_same_prompts": float(weak[served].mean()) if n_served else None,
            "strong_accuracy_same_prompts": float(strong[served].mean()) if n_served else None,
            "best_effort_requests": self.best_effort,
            "spilled_requests": self.spilled,
            "rejections": self.rejections,
            "route_seconds_mean": float(secs.mean()),
            "route_seconds_p99": float(np.percentile(secs, 99)),
            "oracle": self.oracle_adequacy is not None,
            "quality_budget": self.sim.quality_budget.state() if self.sim.quality_budget is not None else None,
            "served_model_index": self.served_model,
            "weak_correct": weak, "strong_correct": strong,
        }

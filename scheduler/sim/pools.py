"""Pools that follow the load: the fleet simulator moves a group of GPUs from a smaller model's pool to an extra
replica of the largest model when routing cannot place that model's requests within their SLO, and back when
the extra replica is no longer needed; every move costs a model load, in time and in energy.

A check runs every CHECK_SECONDS of virtual time. The largest model's pool is under **pressure** when, in the
last check interval, at least PRESSURE_SHARE of the routed requests saw its best replica's predicted queue
(the wait before their prefill starts) above QUEUE_SHARE of their TTFT target: load, not a long prompt, is
what another replica helps with. After PRESSURE_CHECKS such intervals in a row the
manager borrows the GPUs of the smallest model's replicas, enough for one replica of the large model (its
tensor-parallel width): those replicas leave routing at once (drain), finish what they run, and their GPUs
load the large model. The new replica joins routing after load_seconds(). With no pressure for
RELEASE_CHECKS intervals in a row and the large pool's requests fitting in its permanent replicas
(running + waiting at most RELEASE_BATCH_SHARE of one replica's max_num_seqs), the borrowed replica drains
and its GPUs load the smaller model's replicas again.

While the small pool is borrowed, routing sends every request to the large model (its predicted quality is
the highest, so it is always adequate): quality rises, energy per request too. The point of a move is SLO
attainment under overload, bought with energy.

Assumed, not measured (docs/benchmarks.md): a model load takes ENGINE_START_SECONDS plus the weights of one GPU
(2 bytes per parameter over the tensor-parallel width) at LOAD_BYTES_PER_SECOND, and the loading GPUs draw
their idle power meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.sim.fleet import FleetSimulator, SimReplica

#: how often the manager looks at the pools (virtual seconds)
CHECK_SECONDS = 10.0
#: share of the routed requests that must see the large model's best replica queue past QUEUE_SHARE x TTFT target
PRESSURE_SHARE = 0.05
QUEUE_SHARE = 0.25
#: intervals of pressure in a row before GPUs move to the large model: a minute, about what a move takes to
#: help (drain, then a 70B load of 34 s): pressure that ends sooner (a burst) is over before the move helps
PRESSURE_CHECKS = 6
#: intervals without pressure in a row before the borrowed GPUs go back
RELEASE_CHECKS = 6
#: the large pool's running + waiting requests must fit in this share of one permanent replica's max_num_seqs
RELEASE_BATCH_SHARE = 0.5
#: engine start (process, weights mapped, CUDA graphs, KV-cache profiling), assumed
ENGINE_START_SECONDS = 20.0
#: weights read into one GPU (local NVMe or page cache), assumed
LOAD_BYTES_PER_SECOND = 2.5e9


def load_seconds(params_b: float, tensor_parallel: int) -> float:
    """Time from a replica's start to its first request: engine start + fp16 weights per GPU / read rate."""
    return ENGINE_START_SECONDS + params_b * 1e9 * 2.0 / max(1, tensor_parallel) / LOAD_BYTES_PER_SECOND


@dataclass
class PoolMove:
    t_s: float
    to_model: str
    from_model: str
    devices: list[str]
    #: when the GPUs' old replicas were idle and the load began, and when the new replica(s) took requests
    load_start_s: float | None = None
    ready_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"t_s": self.t_s, "to_model": self.to_model, "from_model": self.from_model, "devices": self.devices,
                "load_start_s": self.load_start_s, "ready_s": self.ready_s}


@dataclass
class _Pending:
    """A move under way: its old replicas draining, then its GPUs loading."""

    move: PoolMove
    draining: list["SimReplica"]
    borrow: bool  # True: small -> large; False: large -> small (the release)
    loading: bool = False


@dataclass
class PoolManager:
    """Moves GPUs between the smallest and the largest model's pools of one FleetSimulator run."""

    sim: "FleetSimulator"
    by_model: dict[str, list[int]]
    small: str
    large: str
    moves: list[PoolMove] = field(default_factory=list)
    _routed: int = 0
    _queued_long: int = 0
    _pressure_run: int = 0
    _calm_run: int = 0
    _pending: _Pending | None = None
    #: the borrowed replica of the large model, while it exists (index in sim.replicas)
    _borrowed: int | None = None
    #: the small model's replicas the borrowed GPUs came from: rebuilt on release
    _lent: list[list[Any]] = field(default_factory=list)

    # --- what routing tells it -----------------------------------------------------------------
    def observe(self, decision: Any) -> None:
        """After each routed arrival: whether the large model's best replica would have queued it long."""
        if decision.model_id is None:
            return
        queue = next((c.predicted_queue_seconds for c in decision.candidates
                      if c.model_id == self.large and c.predicted_queue_seconds is not None), None)
        if queue is None:
            return
        self._routed += 1
        if queue > QUEUE_SHARE * self.sim.slo_ttft:
            self._queued_long += 1

    # --- the periodic check --------------------------------------------------------------------
    def check(self, now: float) -> None:
        pressure = self._routed > 0 and self._queued_long / self._routed >= PRESSURE_SHARE
        self._routed = self._queued_long = 0
        self._pressure_run = self._pressure_run + 1 if pressure else 0
        self._calm_run = 0 if pressure else self._calm_run + 1
        if self._pending is not None:
            self._advance(now)
            return
        if self._borrowed is None and self._pressure_run >= PRESSURE_CHECKS:
            self._start_borrow(now)
        elif self._borrowed is not None and self._calm_run >= RELEASE_CHECKS and self._large_fits_without_borrowed():
            self._start_release(now)

    def busy(self) -> bool:
        """A move is under way (the run must not end before its replicas are back in routing)."""
        return self._pending is not None

    def _large_fits_without_borrowed(self) -> bool:
        sim = self.sim
        permanent = [sim.replicas[i] for i in self.by_model.get(self.large, []) if i != self._borrowed]
        if not permanent:
            return False
        load = sum(r.core.num_running + r.core.num_waiting for r in (sim.replicas[i] for i in self.by_model[self.large]))
        return load <= RELEASE_BATCH_SHARE * permanent[0].core.max_num_seqs

    def _start_borrow(self, now: float) -> None:
        sim = self.sim
        tp = self._width(self.large)
        small_ids = list(self.by_model.get(self.small, []))
        gpus_per_small = self._width(self.small)
        need = -(-tp // gpus_per_small)  # replicas of the small model whose GPUs make one large replica
        if len(small_ids) < need:
            return
        taken = small_ids[-need:]
        for i in taken:
            self.by_model[self.small].remove(i)
        draining = [sim.replicas[i] for i in taken]
        devices = [g.device_id for r in draining for g in r.core.gpus][:tp]
        self._pending = _Pending(PoolMove(now, self.large, self.small, devices), draining, borrow=True)
        self._advance(now)

    def _start_release(self, now: float) -> None:
        sim = self.sim
        assert self._borrowed is not None
        self.by_model[self.large].remove(self._borrowed)
        rep = sim.replicas[self._borrowed]
        self._pending = _Pending(PoolMove(now, self.small, self.large, [g.device_id for g in rep.core.gpus]), [rep],
                                 borrow=False)
        self._advance(now)

    def _advance(self, now: float) -> None:
        """Start the load once the draining replicas are idle; the new replicas join routing when it is done."""
        p = self._pending
        if p is None or p.loading or not all(r.core.idle for r in p.draining):
            return
        sim = self.sim
        for r in p.draining:
            sim.retire_replica(r)
        p.loading = True
        p.move.load_start_s = now
        if p.borrow:
            self._lent = [list(r.core.gpus) for r in p.draining]
            gpus = [g for r in p.draining for g in r.core.gpus][: self._width(self.large)]
            groups, model = [gpus], self.large
        else:
            groups, model = self._lent, self.small
        ready = now + self._load_seconds(model)
        new = [sim.add_replica(model, g) for g in groups]

        def joined(_: Any) -> None:
            self.by_model.setdefault(model, []).extend(new)
            self._borrowed = new[0] if p.borrow else None
            p.move.ready_s = sim.clock.now
            self.moves.append(p.move)
            self._pending = None
            self._pressure_run = self._calm_run = 0

        sim.loop.at(ready, joined)

    def _width(self, model_id: str) -> int:
        return self.sim.replica_width(model_id)

    def _load_seconds(self, model_id: str) -> float:
        m = self.sim.config.model(model_id)
        return load_seconds(m.params_b if m is not None else 1.0, self._width(model_id))

    def summary(self, end_s: float) -> dict[str, Any]:
        loading = sum(len(m.devices) * ((m.ready_s or end_s) - (m.load_start_s or end_s)) for m in self.moves)
        return {"moves": [m.to_dict() for m in self.moves], "loading_gpu_seconds": loading,
                "borrowed_at_end": self._borrowed is not None,
                "assumptions": {"engine_start_seconds": ENGINE_START_SECONDS,
                                "load_bytes_per_second": LOAD_BYTES_PER_SECOND, "check_seconds": CHECK_SECONDS}}

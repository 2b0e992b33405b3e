"""Background metering of devices: read each energy counter at a fixed rate and emit the joules per interval.

A DeviceMeter owns one sampling thread for the devices given to it (the node agent can give it one
device or several). Every tick it reads each device's energy counter and emits an EnergyInterval
(device_id, t0_s, t1_s, energy_joules, ...) to the registered callbacks, where t0_s is the previous
interval's t1_s: a device's intervals tile time with no gap or overlap, and their joules add up to the
counter's movement. Timestamps are time.time() seconds, the clock engines stamp their events with, so
the attribution can line intervals up with request progress.

Failures: when a counter read raises (driver error) or goes backwards (driver reload), that interval's
joules are power x dt instead (the device's power reading, else the last interval's average power),
the counter is re-baselined, and the problem is logged once per device. If the wall clock steps back,
the tick is merged into the next one, so no interval is ever empty, reversed or negative.

A request's end need not wait for the next tick: sample_now(device_ids) reads those devices' counters at
once and emits the interval from the last tick to now, exactly as a tick would (the tiling and the sum
are unchanged; one interval is just split in two), so the attribution can close the request at once.

Readers (the request path, /v1/devices, Prometheus) get totals and the last power without waiting:
the state lock is held only to copy numbers, never while a device is being read. Callbacks run on the
sampling thread and must be quick (an append, a queue put); an exception in one is logged, not fatal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scheduler.devices.base import Device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnergyInterval:
    """Joules one device used between t0_s and t1_s (time.time() seconds), t1_s > t0_s."""

    device_id: str
    node: str
    t0_s: float
    t1_s: float
    energy_joules: float
    #: EnergyMethod value of the device: nvml-counter, rapl, cpu-estimate, simulated
    method: str
    #: EnergyScope value: gpu, cpu, cpu+dram
    scope: str
    #: "counter": the device's energy counter moved this much; "power": power x dt after a failed read
    source: str = "counter"

    @property
    def duration_seconds(self) -> float:
        return self.t1_s - self.t0_s

    @property
    def average_power_watts(self) -> float:
        return self.energy_joules / self.duration_seconds


@dataclass(frozen=True)
class MeterReading:
    """What a meter knows about one device right now (a copy; reading it never touches the device)."""

    device_id: str
    node: str
    method: str
    scope: str
    #: joules of all intervals emitted since start()
    total_energy_joules: float
    #: average power of the latest interval (None before the first one)
    last_power_watts: float | None
    #: end of the latest interval (start() time before the first one)
    covered_until_s: float
    intervals: int
    #: intervals whose joules came from power x dt after a failed or backward counter read
    fallback_intervals: int


class _DeviceState:
    __slots__ = ("device", "t_s", "mono_s", "counter_joules", "last_power_watts", "total_joules",
                 "intervals", "fallback_intervals", "warned")

    def __init__(self, device: Device, t_s: float, mono_s: float, counter_joules: float | None):
        self.device = device
        self.t_s = t_s
        self.mono_s = mono_s
        #: None when the last read failed: the next interval cannot be a counter difference
        self.counter_joules = counter_joules
        self.last_power_watts: float | None = None
        self.total_joules = 0.0
        self.intervals = 0
        self.fallback_intervals = 0
        self.warned = False


IntervalCallback = Callable[[EnergyInterval], None]


class DeviceMeter:
    """Samples devices on a background thread at interval_seconds; see the module docstring."""

    def __init__(
        self,
        devices: Sequence[Device],
        interval_seconds: float = 0.1,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        name: str = "wattlane-meter",
    ):
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        ids = [d.device_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"devices with the same id given to one meter: {ids}")
        self.devices = list(devices)
        self.interval_seconds = float(interval_seconds)
        self._clock = clock
        self._monotonic = monotonic
        self._name = name
        self._callbacks: tuple[IntervalCallback, ...] = ()
        self._failed_callbacks: set[int] = set()
        self._states: dict[str, _DeviceState] = {}
        self._state_lock = threading.Lock()  # guards the numbers readers copy; never held during a device read
        self._sample_lock = threading.Lock()  # one sampler at a time (the thread, or a test calling sample_once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_cpu_seconds = 0.0
        self.started_s: float | None = None

    # --- callbacks ---------------------------------------------------------------------------
    def add_callback(self, callback: IntervalCallback) -> None:
        with self._state_lock:
            self._callbacks = self._callbacks + (callback,)

    def remove_callback(self, callback: IntervalCallback) -> None:
        with self._state_lock:
            self._callbacks = tuple(c for c in self._callbacks if c != callback)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Take the baseline reading of every device and start the sampling thread."""
        if self._thread is not None:
            raise RuntimeError("meter already started")
        self.baseline()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def baseline(self) -> None:
        """Read every device once; intervals start here. start() calls it; tests may call it alone."""
        with self._sample_lock:
            states = {}
            for device in self.devices:
                counter = self._read_counter(device, None)
                states[device.device_id] = _DeviceState(device, self._clock(), self._monotonic(), counter)
            with self._state_lock:
                self._states = states
                self.started_s = min((s.t_s for s in states.values()), default=self._clock())

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop the thread and wait for it; it emits the final partial interval of every device first."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout_seconds)
        if thread.is_alive():
            log.warning("%s did not stop within %.1f s (a device read is hanging)", self._name, timeout_seconds)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        next_tick = self._monotonic() + self.interval_seconds
        try:
            while not self._stop.wait(max(0.0, next_tick - self._monotonic())):
                self.sample_once()
                self._thread_cpu_seconds = time.thread_time()
                next_tick += self.interval_seconds
                now = self._monotonic()
                if next_tick < now:  # a slow read or a stalled process: skip the missed ticks, do not burst
                    next_tick = now + self.interval_seconds
        finally:
            self.sample_once()
            self._thread_cpu_seconds = time.thread_time()

    # --- sampling ----------------------------------------------------------------------------
    def _read_counter(self, device: Device, state: _DeviceState | None) -> float | None:
        try:
            return float(device.energy_joules())
        except Exception as exc:  # any driver error: this interval falls back to power x dt
            self._warn_once(device, state, f"energy counter read failed ({type(exc).__name__}: {exc})")
            return None

    def _warn_once(self, device: Device, state: _DeviceState | None, problem: str) -> None:
        if state is not None and state.warned:
            log.debug("%s: %s", device.device_id, problem)
            return
        if state is not None:
            state.warned = True
        log.warning("%s: %s; using power x time for such intervals (logged once)", device.device_id, problem)

    def _fallback_power_watts(self, state: _DeviceState) -> float:
        try:
            watts = float(state.device.power_watts())
            if watts >= 0:
                return watts
        except Exception as exc:
            log.debug("%s: power read failed too (%s)", state.device.device_id, exc)
        return state.last_power_watts or 0.0

    def sample_once(self) -> list[EnergyInterval]:
        """Read every device once and emit one interval per device (the sampling thread calls this)."""
        emitted: list[EnergyInterval] = []
        with self._sample_lock:
            for state in list(self._states.values()):
                interval = self._sample_device(state)
                if interval is not None:
                    emitted.append(interval)
            self._emit(emitted)
        return emitted

    def sample_now(self, device_ids: Sequence[str]) -> list[EnergyInterval]:
        """Read these devices now, out of turn, and emit their intervals up to now (a request just ended).

        The thread's next tick starts where this one ends, so intervals still tile time and sum to the
        counter's movement. An unknown device id is ignored (it has no meter here).
        """
        emitted: list[EnergyInterval] = []
        with self._sample_lock:
            for device_id in device_ids:
                state = self._states.get(device_id)
                if state is not None:
                    interval = self._sample_device(state, on_demand=True)
                    if interval is not None:
                        emitted.append(interval)
            self._emit(emitted)  # under the lock: the attribution sees one device's intervals in time order
        return emitted

    def _emit(self, emitted: list[EnergyInterval]) -> None:
        callbacks = self._callbacks
        for interval in emitted:
            for callback in callbacks:
                try:
                    callback(interval)
                except Exception:
                    if id(callback) not in self._failed_callbacks:
                        self._failed_callbacks.add(id(callback))
                        log.exception("meter callback %r failed (logged once; it keeps being called)", callback)

    def _sample_device(self, state: _DeviceState, on_demand: bool = False) -> EnergyInterval | None:
        device = state.device
        counter = self._read_counter(device, state)
        t_s = self._clock()
        mono_s = self._monotonic()
        if t_s <= state.t_s:
            # the wall clock stepped back (or has not moved): fold this tick into the next one; keep the
            # old baseline so the counter difference then covers both
            return None
        dt_s = max(mono_s - state.mono_s, 0.0)
        source = "counter"
        if counter is not None and state.counter_joules is not None and counter >= state.counter_joules:
            energy = counter - state.counter_joules
        else:
            if counter is not None and state.counter_joules is not None:
                self._warn_once(device, state, f"energy counter went backwards ({state.counter_joules:.3f} -> {counter:.3f} J)")
            energy = self._fallback_power_watts(state) * dt_s
            source = "power"
        interval = EnergyInterval(
            device_id=device.device_id,
            node=device.node,
            t0_s=state.t_s,
            t1_s=t_s,
            energy_joules=energy,
            method=device.energy_method.value,
            scope=device.energy_scope.value,
            source=source,
        )
        power = energy / dt_s if dt_s > 0 else state.last_power_watts
        if on_demand and dt_s < self.interval_seconds / 2:
            # a counter's resolution makes a sliver's average power noise; keep the last tick's figure
            power = state.last_power_watts
        with self._state_lock:
            state.t_s, state.mono_s, state.counter_joules = t_s, mono_s, counter
            state.total_joules += energy
            state.intervals += 1
            state.fallback_intervals += source != "counter"
            if power is not None:
                state.last_power_watts = power
        return interval

    # --- readers (never touch a device) ------------------------------------------------------
    def reading(self, device_id: str) -> MeterReading:
        with self._state_lock:
            s = self._states[device_id]
            return MeterReading(
                device_id=device_id,
                node=s.device.node,
                method=s.device.energy_method.value,
                scope=s.device.energy_scope.value,
                total_energy_joules=s.total_joules,
                last_power_watts=s.last_power_watts,
                covered_until_s=s.t_s,
                intervals=s.intervals,
                fallback_intervals=s.fallback_intervals,
            )

    def readings(self) -> dict[str, MeterReading]:
        return {device_id: self.reading(device_id) for device_id in list(self._states)}

    def total_energy_joules(self, device_id: str) -> float:
        with self._state_lock:
            return self._states[device_id].total_joules

    def last_power_watts(self, device_id: str) -> float | None:
        with self._state_lock:
            return self._states[device_id].last_power_watts

    @property
    def thread_cpu_seconds(self) -> float:
        """CPU time the sampling thread has used (time.thread_time() inside it), for overhead checks."""
        return self._thread_cpu_seconds

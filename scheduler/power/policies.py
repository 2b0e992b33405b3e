"""Power policies: each turns a device group's live load into target power limits and clock locks.

A policy never touches a device. It returns DeviceTargets; the governor compares them with what
is in force and asks the actuator for the difference. Policies: static, slo-feedback, budget,
carbon-aware, parking (docs/power.md explains each and its options).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.optimize import nnls

from scheduler.devices.base import Device, DeviceError
from scheduler.power.options import (
    BudgetOptions,
    CarbonAwareOptions,
    ParkingOptions,
    SloFeedbackOptions,
    StaticOptions,
)


class PolicyError(ValueError):
    """A policy or its options cannot be applied to these devices; the message says why and how to fix."""


@dataclass
class DeviceLoad:
    """One device's load this step, folded from the ReplicaStats of the replicas on it."""

    running: int = 0
    waiting: int = 0
    ttft_p99_seconds: float | None = None
    tpot_p99_seconds: float | None = None
    decode_seconds_per_token: float | None = None
    power_watts: float | None = None
    sm_clock_mhz: float | None = None
    known: bool = False  # at least one replica reported on this device

    @property
    def demand(self) -> int:
        return self.running + self.waiting

    @property
    def busy(self) -> bool:
        return self.demand > 0


def fold_stats(stats: Sequence[Mapping[str, Any]] | None, device: Device | None = None) -> DeviceLoad:
    """Sum counts and take the worst p99 over the replicas on one device; power from the device itself."""
    load = DeviceLoad()
    for s in stats or ():
        load.known = True
        load.running += int(s.get("running", 0) or 0)
        load.waiting += int(s.get("waiting", 0) or 0)
        for key in ("ttft_p99_seconds", "tpot_p99_seconds", "decode_seconds_per_token"):
            v = s.get(key)
            if v is not None and not math.isnan(float(v)):
                cur = getattr(load, key)
                setattr(load, key, float(v) if cur is None else max(cur, float(v)))
        if s.get("power_watts") is not None and device is None:
            load.power_watts = (load.power_watts or 0.0) + float(s["power_watts"])
    if device is not None:
        try:
            load.power_watts = device.power_watts()
            load.sm_clock_mhz = device.sm_clock_mhz()
        except DeviceError:
            pass
    return load


@dataclass
class DeviceTarget:
    """What a policy wants for one device. None fields: leave that setting alone."""

    device_id: str
    #: a number: set this limit; "default": reset to the device default
    power_limit: float | str | None = None
    #: (min, max): lock; "reset": unlock
    locked_clocks: tuple[float, float] | str | None = None
    reason: str = ""


class GovernorView(Protocol):
    """What a policy may read besides the load: settings in force (or last recommended) and intensity."""

    def power_limit_watts(self, device_id: str) -> float | None: ...

    def locked_clocks_mhz(self, device_id: str) -> tuple[float, float] | None: ...

    def carbon_intensity(self, now_s: float) -> float | None: ...


class Policy:
    name = "none"

    def __init__(self, group: str, device_ids: Sequence[str], options: Any, devices: Mapping[str, Device]):
        self.group = group
        self.device_ids = list(device_ids)
        self.options = options
        self.devices = {d: devices[d] for d in device_ids}
        self.check()

    def check(self) -> None:
        """Raise PolicyError if the options cannot work on these devices."""

    def decide(self, now_s: float, loads: Mapping[str, DeviceLoad], view: GovernorView) -> list[DeviceTarget]:
        return []

    def state(self) -> dict[str, Any]:
        return {}

    def work_arrived(self, device_id: str, now_s: float) -> list[DeviceTarget]:
        return []


class NonePolicy(Policy):
    name = "none"


# --- static ------------------------------------------------------------------------------------------


class StaticPolicy(Policy):
    name = "static"
    options: StaticOptions

    def _setting(self, device_id: str) -> tuple[float | None, tuple[float, float] | None]:
        o = self.options
        per = o.devices.get(device_id)
        limit = per.power_limit_watts if per and per.power_limit_watts is not None else o.power_limit_watts
        lock = per.locked_clocks_mhz if per and per.locked_clocks_mhz is not None else o.locked_clocks_mhz
        return limit, lock

    def check(self) -> None:
        unknown = set(self.options.devices) - set(self.device_ids)
        if unknown:
            raise PolicyError(f"options.devices names {', '.join(sorted(unknown))}, not in this group")
        for d in self.device_ids:
            dev = self.devices[d]
            limit, lock = self._setting(d)
            try:
                if limit is not None:
                    if not dev.supports_power_limit():
                        raise PolicyError(f"{d} has no settable power limit")
                    dev.power_limit_constraints().check(limit)
                if lock is not None:
                    if not dev.supports_locked_clocks():
                        raise PolicyError(f"{d} has no lockable clocks")
                    dev.clock_constraints().check(*lock)
            except DeviceError as exc:
                raise PolicyError(f"{d}: {exc}") from None

    def decide(self, now_s, loads, view):
        out = []
        for d in self.device_ids:
            limit, lock = self._setting(d)
            out.append(DeviceTarget(d, power_limit=limit, locked_clocks=lock, reason="static: operator setting"))
        return out


# --- slo-feedback -------------------------------------------------------------------------------------


class OnlineProfile:
    """Iteration time and power as functions of the knob, refit from measurements (non-negative least squares).

    t(x, n) = a + b h/x + c n + d n h/x        (h = knob max; the h/x terms scale with 1/clock)
    P(x, n) = p0 + p1 u + p3 u^3 + p4 n u      (u = x / h)
    A prior shape (pseudo-samples, small weight) keeps the fit defined before the knob has moved.
    """

    def __init__(self, lo: float, hi: float, opts: SloFeedbackOptions):
        self.lo, self.hi, self.opts = lo, hi, opts
        self.samples: deque[tuple[float, float, float, float]] = deque(maxlen=opts.window_samples)
        self.t_coef: np.ndarray | None = None
        self.p_coef: np.ndarray | None = None

    def add(self, x: float, iteration_seconds: float, power_watts: float, batch: float) -> None:
        if x > 0 and iteration_seconds > 0 and power_watts > 0:
            self.samples.append((x, iteration_seconds, power_watts, max(batch, 1.0)))

    def _t_features(self, x, n):
        r = self.hi / np.asarray(x, dtype=float)
        n = np.broadcast_to(np.asarray(n, dtype=float), r.shape)
        return np.stack([np.ones_like(r), r, n, n * r], axis=-1)

    def _p_features(self, x, n):
        u = np.asarray(x, dtype=float) / self.hi
        n = np.broadcast_to(np.asarray(n, dtype=float), u.shape)
        return np.stack([np.ones_like(u), u, u**3, n * u], axis=-1)

    def refit(self) -> bool:
        if not self.samples:
            return False
        o = self.opts
        xs, ts, ps, ns = (np.array(c, dtype=float) for c in zip(*self.samples))
        # prior pseudo-samples anchored at the latest measurement, shaped by published behaviour
        x_ref, t_ref, p_ref, n_ref = xs[-1], ts[-1], ps[-1], ns[-1]
        cf, sf = o.prior_compute_fraction, o.prior_static_power_fraction

        def t_shape(x):
            return (1 - cf) + cf * self.hi / x

        def p_shape(x):
            u = x / self.hi
            return sf + (1 - sf) * (0.3 * u + 0.7 * u**3)

        grid = np.linspace(self.lo, self.hi, 8)
        t_prior = t_ref * t_shape(grid) / t_shape(x_ref)
        p_prior = p_ref * p_shape(grid) / p_shape(x_ref)
        w_real = np.ones_like(xs)
        w_prior = np.full_like(grid, o.prior_weight)
        X = np.concatenate([xs, grid])
        N = np.concatenate([ns, np.full_like(grid, n_ref)])
        W = np.sqrt(np.concatenate([w_real, w_prior]))
        T = np.concatenate([ts, t_prior])
        P = np.concatenate([ps, p_prior])
        # relative errors: scale rows by 1/target so small and large values weigh alike
        At = self._t_features(X, N) * (W / T)[:, None]
        Ap = self._p_features(X, N) * (W / P)[:, None]
        self.t_coef, _ = nnls(At, W, maxiter=200)
        self.p_coef, _ = nnls(Ap, W, maxiter=200)
        return True

    def iteration_seconds(self, x, n):
        return self._t_features(x, n) @ self.t_coef

    def power_watts(self, x, n):
        return self._p_features(x, n) @ self.p_coef


@dataclass
class _SloDeviceState:
    knob: str
    lo: float
    hi: float
    profile: OnlineProfile
    slack_steps: int = 0
    last_choice: float | None = None
    last_reason: str = ""
    predicted_optimum: float | None = None


class SloFeedbackPolicy(Policy):
    """Minimum predicted energy per token subject to the SLO, corrected by measured slack with hysteresis."""

    name = "slo-feedback"
    options: SloFeedbackOptions

    def check(self) -> None:
        self._state: dict[str, _SloDeviceState] = {}
        for d in self.device_ids:
            dev = self.devices[d]
            knob = self.options.knob
            if knob == "clock" and not dev.supports_locked_clocks():
                knob = "power-limit"  # a device without clock locks can still be steered by its limit
            if knob == "power-limit" and not dev.supports_power_limit():
                raise PolicyError(f"{d} has neither lockable clocks nor a settable power limit; slo-feedback cannot steer it")
            if knob == "clock":
                c = dev.clock_constraints()
                lo, hi = c.min_mhz, c.max_mhz
            else:
                c = dev.power_limit_constraints()
                lo, hi = c.min_watts, c.max_watts
            lo = lo + self.options.floor_fraction * (hi - lo)
            self._state[d] = _SloDeviceState(knob, lo, hi, OnlineProfile(lo, hi, self.options))

    def _current(self, d: str, st: _SloDeviceState, view: GovernorView) -> float:
        if st.knob == "clock":
            lock = view.locked_clocks_mhz(d)
            return float(lock[1]) if lock else st.hi
        limit = view.power_limit_watts(d)
        return float(limit) if limit is not None else st.hi

    def _candidates(self, d: str, st: _SloDeviceState) -> np.ndarray:
        grid = np.linspace(st.lo, st.hi, self.options.candidates)
        if st.knob == "clock":
            supported = [f for f in self.devices[d].clock_constraints().supported_mhz if st.lo <= f <= st.hi]
            if supported:
                grid = np.array(sorted(set(supported)), dtype=float)
        return grid

    def _snap(self, d: str, st: _SloDeviceState, x: float) -> float:
        grid = self._candidates(d, st)
        i = int(np.searchsorted(grid, x - 1e-9))  # the lowest candidate at or above x (never below what we asked)
        return float(grid[min(i, len(grid) - 1)])

    def decide(self, now_s, loads, view):
        out = []
        o = self.options
        for d in self.device_ids:
            st = self._state[d]
            load = loads.get(d, DeviceLoad())
            x_now = self._current(d, st, view)
            if not load.busy:
                st.slack_steps = 0
                continue  # nothing to learn from or protect; parking is a separate policy
            measured_x = x_now
            if st.knob == "clock" and load.sm_clock_mhz:
                measured_x = min(x_now, float(load.sm_clock_mhz))
            it = load.decode_seconds_per_token or load.tpot_p99_seconds
            if it is not None and load.power_watts is not None:
                st.profile.add(measured_x, it, load.power_watts, load.running)
            if not st.profile.refit():
                continue
            n = max(load.running, 1)
            grid = self._candidates(d, st)
            t = st.profile.iteration_seconds(grid, n)
            p = st.profile.power_watts(grid, n)
            energy = p * t  # per iteration; the batch is the same for every candidate
            t_now = float(st.profile.iteration_seconds(np.array([x_now]), n)[0])
            ok = np.ones_like(grid, dtype=bool)
            tpot_now = load.tpot_p99_seconds or load.decode_seconds_per_token
            if tpot_now is not None and t_now > 0:
                ok &= tpot_now * t / t_now <= o.tpot_slo_seconds * (1 - o.headroom_fraction)
            if load.ttft_p99_seconds is not None:
                # prefill is compute-bound: TTFT scales about as 1 / clock (1 / limit is pessimistic enough)
                ok &= load.ttft_p99_seconds * x_now / grid <= o.ttft_slo_seconds * (1 - o.headroom_fraction)
            x_opt = float(grid[ok][np.argmin(energy[ok])]) if ok.any() else st.hi
            e_opt = float(energy[grid == x_opt][0]) if ok.any() else float(energy[-1])
            e_now = float(st.profile.power_watts(np.array([x_now]), n)[0]) * t_now
            now_ok = True
            if tpot_now is not None:
                now_ok = tpot_now <= o.tpot_slo_seconds * (1 - o.headroom_fraction)
            if load.ttft_p99_seconds is not None:
                now_ok = now_ok and load.ttft_p99_seconds <= o.ttft_slo_seconds * (1 - o.headroom_fraction)
            st.predicted_optimum = x_opt
            span = st.hi - st.lo
            violated = (load.tpot_p99_seconds is not None and load.tpot_p99_seconds > o.tpot_slo_seconds) or (
                load.ttft_p99_seconds is not None and load.ttft_p99_seconds > o.ttft_slo_seconds
            )
            queued = load.waiting >= o.queue_threshold
            slack = (load.tpot_p99_seconds or 0.0) <= (1 - o.slack_fraction) * o.tpot_slo_seconds and (
                load.ttft_p99_seconds or 0.0
            ) <= (1 - o.slack_fraction) * o.ttft_slo_seconds
            x_new, reason = x_now, ""
            if violated or queued:
                st.slack_steps = 0
                x_new = min(st.hi, max(x_opt, x_now + o.up_step_fraction * span))
                why = "SLO violated" if violated else f"{load.waiting} waiting"
                reason = f"slo-feedback: {why}, step up"
            elif not now_ok and x_opt > x_now + 1e-9:
                st.slack_steps = 0
                x_new, reason = x_opt, "slo-feedback: predicted SLO miss at current setting, step up"
            elif now_ok and x_opt > x_now + 1e-9 and e_opt < (1 - o.min_gain_fraction) * e_now:
                # below the bottom of the U: a higher clock costs less energy per token
                st.slack_steps = 0
                x_new, reason = x_opt, f"slo-feedback: predicted optimum {x_opt:.0f} is above, step up"
            elif slack and x_opt < x_now - 1e-9 and e_opt < (1 - o.min_gain_fraction) * e_now:
                st.slack_steps += 1
                if st.slack_steps >= o.down_after_steps:
                    st.slack_steps = 0
                    x_new = max(x_opt, x_now - o.down_step_fraction * span)
                    reason = f"slo-feedback: sustained slack, step down toward predicted optimum {x_opt:.0f}"
            else:
                st.slack_steps = 0
            if reason:
                x_new = self._snap(d, st, x_new)
                st.last_choice, st.last_reason = x_new, reason
                out.append(self._target(d, st, x_new, reason))
        return out

    def _target(self, d: str, st: _SloDeviceState, x: float, reason: str) -> DeviceTarget:
        if st.knob == "clock":
            if x >= st.hi - 1e-9:
                return DeviceTarget(d, locked_clocks="reset", reason=reason)
            return DeviceTarget(d, locked_clocks=(x, x), reason=reason)
        if x >= st.hi - 1e-9:
            return DeviceTarget(d, power_limit="default", reason=reason)
        return DeviceTarget(d, power_limit=math.floor(x), reason=reason)

    def state(self) -> dict[str, Any]:
        return {
            d: {
                "knob": st.knob,
                "range": [st.lo, st.hi],
                "predicted_optimum": st.predicted_optimum,
                "last_choice": st.last_choice,
                "last_reason": st.last_reason,
                "slack_steps": st.slack_steps,
                "samples": len(st.profile.samples),
            }
            for d, st in self._state.items()
        }


# --- budget ---------------------------------------------------------------------------------------------


def share_budget(budget_watts: float, mins: Sequence[float], maxs: Sequence[float], demands: Sequence[float]) -> list[float]:
    """Split a power budget by demand (water-filling): each device gets at least its min, at most its max.

    Results are whole watts rounded down, so their sum never exceeds the budget.
    """
    n = len(mins)
    if budget_watts + 1e-9 < sum(mins):
        raise PolicyError(f"budget {budget_watts:g} W is below the sum of the devices' minimum limits ({sum(mins):g} W)")
    alloc = [float(m) for m in mins]
    remaining = budget_watts - sum(alloc)
    open_ = [i for i in range(n) if maxs[i] > alloc[i]]
    weights = [max(float(x), 0.0) for x in demands]
    if sum(weights[i] for i in open_) <= 0:
        weights = [1.0] * n
    while remaining > 1e-9 and open_:
        total_w = sum(weights[i] for i in open_)
        if total_w <= 0:  # only demand-less devices can still take watts: share the rest evenly
            for i in open_:
                weights[i] = 1.0
            total_w = float(len(open_))
        capped = []
        for i in open_:
            share = remaining * weights[i] / total_w
            if alloc[i] + share >= maxs[i]:
                capped.append(i)
        if not capped:
            for i in open_:
                alloc[i] += remaining * weights[i] / total_w
            remaining = 0.0
            break
        for i in capped:
            remaining -= maxs[i] - alloc[i]
            alloc[i] = float(maxs[i])
            open_.remove(i)
    return [max(float(mins[i]), float(math.floor(alloc[i] + 1e-6))) for i in range(n)]


class BudgetPolicy(Policy):
    """The sum of the group's limits stays <= the budget; the share follows running + waiting requests."""

    name = "budget"
    options: BudgetOptions

    def check(self) -> None:
        for d in self.device_ids:
            if not self.devices[d].supports_power_limit():
                raise PolicyError(f"{d} has no settable power limit; a budget group needs power-limited devices")
        self.last_budget_watts: float | None = None
        self._check_budget(self.budget_for(None))

    def _constraints(self):
        return [self.devices[d].power_limit_constraints() for d in self.device_ids]

    def _check_budget(self, budget: float) -> None:
        mins = sum(c.min_watts for c in self._constraints())
        if budget is not None and budget + 1e-9 < mins:
            raise PolicyError(
                f"budget {budget:g} W is below the sum of the group's minimum power limits ({mins:g} W); "
                f"raise the budget or remove devices from the group"
            )

    def budget_for(self, now_s: float | None, view: GovernorView | None = None) -> float:
        return self.options.budget_watts

    def decide(self, now_s, loads, view):
        budget = self.budget_for(now_s, view)
        self.last_budget_watts = budget
        cons = self._constraints()
        demands = [loads.get(d, DeviceLoad()).demand + self.options.idle_demand for d in self.device_ids]
        targets = share_budget(budget, [c.min_watts for c in cons], [c.max_watts for c in cons], demands)
        current = [view.power_limit_watts(d) for d in self.device_ids]
        chosen = [
            cur if cur is not None and abs(t - cur) < self.options.deadband_watts and c.min_watts <= cur <= c.max_watts else t
            for t, cur, c in zip(targets, current, cons)
        ]
        if sum(chosen) > budget + 1e-9:
            chosen = targets  # the deadband never costs the budget
        chosen = self._two_phase(chosen, current, cons, budget)
        reason = f"{self.name}: share of {budget:.0f} W by demand"
        return [DeviceTarget(d, power_limit=float(w), reason=reason) for d, w in zip(self.device_ids, chosen)]

    @staticmethod
    def _two_phase(chosen: list[float], current: list[float | None], cons, budget: float) -> list[float]:
        """Raise limits only with watts already freed: a lowered cap binds at the device's next iteration,
        so until then it still draws up to its old limit. Increases that would need the watts of this
        step's decreases wait for the next step (they are scaled down, never the decreases)."""
        cur = [c if c is not None else k.max_watts for c, k in zip(current, cons)]
        deltas = [max(new - old, 0.0) for new, old in zip(chosen, cur)]
        wanted = sum(deltas)
        if wanted <= 0:
            return chosen
        headroom = budget - sum(cur)
        if headroom >= wanted - 1e-9:
            return chosen
        scale = max(headroom, 0.0) / wanted
        return [
            (max(k.min_watts, float(math.floor(old + d * scale))) if d > 0 else new)
            for new, old, d, k in zip(chosen, cur, deltas, cons)
        ]

    def state(self) -> dict[str, Any]:
        return {"budget_watts": self.last_budget_watts}


class CarbonAwarePolicy(BudgetPolicy):
    """A budget that follows grid carbon intensity: tighter when dirty, looser when clean."""

    name = "carbon-aware"
    options: CarbonAwareOptions  # type: ignore[assignment]

    def check(self) -> None:
        for d in self.device_ids:
            if not self.devices[d].supports_power_limit():
                raise PolicyError(f"{d} has no settable power limit; a carbon-aware group needs power-limited devices")
        self.last_budget_watts = None
        self.last_intensity: float | None = None
        self._check_budget(self.options.budget_watts_dirty)

    def intensity(self, now_s: float | None, view: GovernorView | None) -> float | None:
        value = view.carbon_intensity(now_s) if (view is not None and now_s is not None) else None
        if value is None and self.options.hourly_intensity_gco2e_per_kwh and now_s is not None:
            value = self.options.hourly_intensity_gco2e_per_kwh[int(now_s // 3600) % 24]
        return value

    def budget_for(self, now_s, view=None) -> float:
        o = self.options
        g = self.intensity(now_s, view)
        self.last_intensity = g
        if g is None:
            return o.budget_watts_dirty  # unknown grid: assume the worst, as a cap should
        frac = (g - o.clean_intensity_gco2e_per_kwh) / (o.dirty_intensity_gco2e_per_kwh - o.clean_intensity_gco2e_per_kwh)
        frac = min(max(frac, 0.0), 1.0)
        return o.budget_watts_clean + frac * (o.budget_watts_dirty - o.budget_watts_clean)

    def state(self) -> dict[str, Any]:
        return {"budget_watts": self.last_budget_watts, "intensity_gco2e_per_kwh": self.last_intensity}


# --- parking ----------------------------------------------------------------------------------------------


@dataclass
class _ParkState:
    last_busy_s: float | None = None
    parked: bool = False


class ParkingPolicy(Policy):
    """Lock a device idle for idle_seconds to its lowest clock (or limit); release when work arrives."""

    name = "parking"
    options: ParkingOptions

    def check(self) -> None:
        self._park: dict[str, _ParkState] = {d: _ParkState() for d in self.device_ids}
        for d in self.device_ids:
            dev = self.devices[d]
            if dev.supports_locked_clocks():
                p = self._park_clock(dev)
                try:
                    dev.clock_constraints().check(p, p)
                except DeviceError as exc:
                    raise PolicyError(f"{d}: park_clock_mhz: {exc}") from None
            elif not dev.supports_power_limit():
                raise PolicyError(f"{d} has neither lockable clocks nor a settable power limit; it cannot be parked")

    def _park_clock(self, dev: Device) -> float:
        if self.options.park_clock_mhz is not None:
            return self.options.park_clock_mhz
        c = dev.clock_constraints()
        return min(c.supported_mhz) if c.supported_mhz else c.min_mhz

    def _park_target(self, d: str) -> DeviceTarget:
        dev = self.devices[d]
        reason = f"parking: idle for {self.options.idle_seconds:g} s"
        if dev.supports_locked_clocks():
            p = self._park_clock(dev)
            return DeviceTarget(d, locked_clocks=(p, p), reason=reason)
        return DeviceTarget(d, power_limit=dev.power_limit_constraints().min_watts, reason=reason)

    def _release_target(self, d: str) -> DeviceTarget:
        if self.devices[d].supports_locked_clocks():
            return DeviceTarget(d, locked_clocks="reset", reason="parking: work arrived, release")
        return DeviceTarget(d, power_limit="default", reason="parking: work arrived, release")

    def decide(self, now_s, loads, view):
        out = []
        for d in self.device_ids:
            st = self._park[d]
            load = loads.get(d, DeviceLoad())
            if st.last_busy_s is None:
                st.last_busy_s = now_s  # never park on the first look: idleness is measured from here
            if load.busy:
                st.last_busy_s = now_s
                if st.parked:
                    st.parked = False
                    out.append(self._release_target(d))
            elif not st.parked and now_s - st.last_busy_s >= self.options.idle_seconds:
                st.parked = True
                out.append(self._park_target(d))
        return out

    def work_arrived(self, device_id: str, now_s: float) -> list[DeviceTarget]:
        st = self._park.get(device_id)
        if st is None:
            return []
        st.last_busy_s = now_s
        if st.parked:
            st.parked = False
            return [self._release_target(device_id)]
        return []

    def state(self) -> dict[str, Any]:
        return {d: {"parked": st.parked, "last_busy_s": st.last_busy_s} for d, st in self._park.items()}


POLICY_CLASSES: dict[str, type[Policy]] = {
    "none": NonePolicy,
    "static": StaticPolicy,
    "slo-feedback": SloFeedbackPolicy,
    "budget": BudgetPolicy,
    "carbon-aware": CarbonAwarePolicy,
    "parking": ParkingPolicy,
}

IntensityProvider = Callable[[float], "float | None"]

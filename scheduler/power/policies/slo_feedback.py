"""Policy 'slo-feedback': the lowest predicted energy per token that still meets the SLO, corrected by measured slack."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.power.options import SloFeedbackOptions
from scheduler.power.policies.base import DeviceLoad, DeviceTarget, GovernorView, Policy, PolicyError, register_policy
from scheduler.power.policies.online_profile import OnlineProfile


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


@register_policy
class SloFeedbackPolicy(Policy):
    """Minimum predicted energy per token subject to the SLO, corrected by measured slack with hysteresis."""

    name = "slo-feedback"
    options_model = SloFeedbackOptions
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

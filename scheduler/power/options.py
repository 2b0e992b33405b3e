"""The options schema of each power policy (the `options` mapping of a power group).

Each policy names its model here as `options_model`; scheduler.power.policies.validate_options
parses a group's options with it. Kept free of device and governor imports.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

class PolicyOptionsError(ValueError):
    """Options that do not fit the policy; the message names the key and the fix."""


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoneOptions(_Options):
    """Policy 'none': Wattlane leaves the group's devices at their original settings."""


class StaticDeviceSetting(_Options):
    power_limit_watts: Annotated[float, Field(gt=0)] | None = None
    #: [min_mhz, max_mhz]
    locked_clocks_mhz: tuple[float, float] | None = None


class StaticOptions(_Options):
    """Policy 'static': operator-set limits and clocks, the same for every device unless overridden."""

    power_limit_watts: Annotated[float, Field(gt=0)] | None = None
    locked_clocks_mhz: tuple[float, float] | None = None
    #: per-device overrides, keyed by device id
    devices: dict[str, StaticDeviceSetting] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something_to_set(self) -> "StaticOptions":
        if self.power_limit_watts is None and self.locked_clocks_mhz is None and not self.devices:
            raise ValueError("static needs power_limit_watts, locked_clocks_mhz or per-device settings under 'devices'")
        return self


class SloFeedbackOptions(_Options):
    """Policy 'slo-feedback': lowest predicted energy per token that still meets the SLO."""

    #: what to turn: locked SM clocks (the efficient knob for decode) or the power limit
    knob: Literal["clock", "power-limit"] = "clock"
    tpot_slo_seconds: Annotated[float, Field(gt=0)] = 0.100
    ttft_slo_seconds: Annotated[float, Field(gt=0)] = 1.0
    #: predictions must leave this fraction of the SLO free (guards against model error)
    headroom_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.25
    #: measured p99 below (1 - slack_fraction) x SLO counts as slack
    slack_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3
    #: steps of sustained slack before one step down (the slow side of the hysteresis)
    down_after_steps: Annotated[int, Field(ge=1)] = 5
    #: size of one step down / up as a fraction of the knob's range
    down_step_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05
    up_step_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25
    #: requests waiting per device that count as a queue (step up at once)
    queue_threshold: Annotated[int, Field(ge=1)] = 1
    #: a move not forced by the SLO is made only if it is predicted to save at least this fraction
    min_gain_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.02
    #: number of candidate settings evaluated between the knob's min and max
    candidates: Annotated[int, Field(ge=3, le=256)] = 32
    #: online profile: samples kept per device, and the weight of the prior per grid point
    window_samples: Annotated[int, Field(ge=8)] = 256
    prior_weight: Annotated[float, Field(ge=0)] = 0.5
    #: prior shape when nothing is measured yet: fraction of iteration time that scales with
    #: 1/clock (decode is mostly memory-bound) and the fraction of board power that is static
    prior_compute_fraction: Annotated[float, Field(ge=0, le=1)] = 0.35
    prior_static_power_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.3
    #: lowest clock / limit the policy may choose, as a fraction of the knob's range above its min
    floor_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0


class BudgetOptions(_Options):
    """Policy 'budget': the sum of the group's power limits stays at or under budget_watts."""

    budget_watts: Annotated[float, Field(gt=0)]
    #: a change smaller than this is not made (avoids churn); never at the cost of the budget
    deadband_watts: Annotated[float, Field(ge=0)] = 10.0
    #: an idle device still counts as this much demand, so it is not starved the moment work arrives
    idle_demand: Annotated[float, Field(ge=0)] = 0.25


class CarbonAwareOptions(_Options):
    """Policy 'carbon-aware': a budget that tightens as grid carbon intensity rises."""

    #: budget at or below clean_intensity, and at or above dirty_intensity (linear between)
    budget_watts_clean: Annotated[float, Field(gt=0)]
    budget_watts_dirty: Annotated[float, Field(gt=0)]
    clean_intensity_gco2e_per_kwh: Annotated[float, Field(ge=0)] = 100.0
    dirty_intensity_gco2e_per_kwh: Annotated[float, Field(gt=0)] = 500.0
    #: used when no intensity provider is plugged in: 24 values, index = UTC hour of day
    hourly_intensity_gco2e_per_kwh: list[Annotated[float, Field(ge=0)]] | None = None
    deadband_watts: Annotated[float, Field(ge=0)] = 10.0
    idle_demand: Annotated[float, Field(ge=0)] = 0.25

    @model_validator(mode="after")
    def _ordered(self) -> "CarbonAwareOptions":
        if self.budget_watts_dirty > self.budget_watts_clean:
            raise ValueError("budget_watts_dirty must not exceed budget_watts_clean (dirty grid -> tighter budget)")
        if self.dirty_intensity_gco2e_per_kwh <= self.clean_intensity_gco2e_per_kwh:
            raise ValueError("dirty_intensity_gco2e_per_kwh must be above clean_intensity_gco2e_per_kwh")
        if self.hourly_intensity_gco2e_per_kwh is not None and len(self.hourly_intensity_gco2e_per_kwh) != 24:
            raise ValueError("hourly_intensity_gco2e_per_kwh needs 24 values (UTC hours 0..23)")
        return self


class ParkingOptions(_Options):
    """Policy 'parking': lock idle devices to their lowest clock; release when work arrives."""

    idle_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: the clock to park at; default the device's lowest supported clock
    park_clock_mhz: Annotated[float, Field(gt=0)] | None = None

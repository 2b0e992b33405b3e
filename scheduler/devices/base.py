"""One abstract interface for every device Wattlane meters or governs (GPU, CPU package, simulated GPU).

Modelled on Zeus's zeus/device/gpu/common.py: one abstract class, a vendor class behind it, the unit
in every name. The meter, the node agent and the power governor only ever talk to this class, so a
simulated GPU and a real NVML GPU are interchangeable except for `kind` and `energy_method`.

Conventions:
- energy_joules() is a monotonically increasing counter since an arbitrary epoch (the caller
  subtracts two readings). Implementations hide counter wrap and unit conversion.
- Settings methods raise DeviceSettingError for a value outside the device's constraints (never
  clamp silently) and DeviceNotSupportedError when the device has no such control.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import Enum


class DeviceKind(str, Enum):
    NVIDIA_GPU = "nvidia-gpu"
    CPU = "cpu"
    SIMULATED_GPU = "simulated-gpu"


class EnergyMethod(str, Enum):
    """How a device's joules were obtained; carried on every energy figure Wattlane reports."""

    NVML_COUNTER = "nvml-counter"
    RAPL = "rapl"
    CPU_ESTIMATE = "cpu-estimate"
    SIMULATED = "simulated"


class EnergyScope(str, Enum):
    """What hardware a device's joules cover."""

    GPU = "gpu"
    CPU = "cpu"
    CPU_DRAM = "cpu+dram"


class DeviceError(Exception):
    """Base class for device errors that callers can report to a user."""


class DeviceNotSupportedError(DeviceError):
    """The device has no such control (e.g. a CPU has no power limit through Wattlane)."""


class DeviceSettingError(DeviceError):
    """A requested setting lies outside the device's constraints; nothing was changed.

    param names the request field at fault (watts, min_mhz, max_mhz) for the API's error envelope; it is an
    attribute, which survives pickling across Ray (BaseException keeps its __dict__)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class DevicePermissionError(DeviceError):
    """The process lacks the privilege to change this setting (NVML needs root / CAP_SYS_ADMIN)."""


@dataclass(frozen=True)
class PowerLimitConstraints:
    min_watts: float
    max_watts: float
    default_watts: float

    def check(self, watts: float) -> None:
        if not (self.min_watts <= watts <= self.max_watts):
            raise DeviceSettingError(
                f"power limit {watts:g} W is outside the device's range "
                f"[{self.min_watts:g}, {self.max_watts:g}] W", param="watts"
            )


@dataclass(frozen=True)
class ClockConstraints:
    min_mhz: float
    max_mhz: float
    supported_mhz: tuple[float, ...] = ()

    def check(self, min_mhz: float, max_mhz: float) -> None:
        if min_mhz > max_mhz:
            raise DeviceSettingError(f"min_mhz {min_mhz:g} is above max_mhz {max_mhz:g}", param="min_mhz")
        for name, v in (("min_mhz", min_mhz), ("max_mhz", max_mhz)):
            if not (self.min_mhz <= v <= self.max_mhz):
                raise DeviceSettingError(
                    f"{name} {v:g} MHz is outside the device's range "
                    f"[{self.min_mhz:g}, {self.max_mhz:g}] MHz", param=name
                )


@dataclass
class DeviceSnapshot:
    """A point-in-time reading of a device, as served by GET /v1/devices and the metrics."""

    device_id: str
    node: str
    kind: str
    name: str
    energy_method: str
    energy_scope: str
    power_watts: float | None
    energy_joules: float | None
    power_limit_watts: float | None = None
    min_power_limit_watts: float | None = None
    max_power_limit_watts: float | None = None
    default_power_limit_watts: float | None = None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    locked_clocks_mhz: tuple[float, float] | None = None
    utilization_percent: float | None = None
    temperature_celsius: float | None = None
    throttle_reasons: list[str] = field(default_factory=list)
    uuid: str | None = None


class Device(abc.ABC):
    """A meterable (and maybe governable) device on one node."""

    #: stable id inside the cluster, e.g. "gpu0", "cpu0", "sim-h100-3"
    device_id: str
    node: str
    kind: DeviceKind
    name: str
    energy_method: EnergyMethod
    energy_scope: EnergyScope
    #: the GPU's NVML index on its node (nvidia-smi's numbering); None for devices NVML does not list
    nvml_index: int | None = None

    # --- readings ---------------------------------------------------------------------------
    @abc.abstractmethod
    def energy_joules(self) -> float:
        """Monotonic energy counter in joules since an arbitrary epoch."""

    @abc.abstractmethod
    def power_watts(self) -> float:
        """Current (or shortest-average available) power draw in watts."""

    def utilization_percent(self) -> float | None:
        return None

    def temperature_celsius(self) -> float | None:
        return None

    def sm_clock_mhz(self) -> float | None:
        return None

    def memory_clock_mhz(self) -> float | None:
        return None

    def throttle_reasons(self) -> list[str]:
        return []

    def uuid(self) -> str | None:
        return None

    # --- power limit ------------------------------------------------------------------------
    def supports_power_limit(self) -> bool:
        return False

    def power_limit_constraints(self) -> PowerLimitConstraints:
        raise DeviceNotSupportedError(f"{self.device_id} has no settable power limit")

    def power_limit_watts(self) -> float | None:
        """The enforced power limit in watts, or None where the device has none."""
        return None

    def set_power_limit_watts(self, watts: float) -> None:
        raise DeviceNotSupportedError(f"{self.device_id} has no settable power limit")

    def reset_power_limit(self) -> None:
        self.set_power_limit_watts(self.power_limit_constraints().default_watts)

    # --- locked clocks ----------------------------------------------------------------------
    def supports_locked_clocks(self) -> bool:
        return False

    def clock_constraints(self) -> ClockConstraints:
        raise DeviceNotSupportedError(f"{self.device_id} has no lockable clocks")

    def locked_clocks_mhz(self) -> tuple[float, float] | None:
        """The (min, max) SM clock lock in force, or None when unlocked."""
        return None

    def set_locked_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        raise DeviceNotSupportedError(f"{self.device_id} has no lockable clocks")

    def reset_locked_clocks(self) -> None:
        raise DeviceNotSupportedError(f"{self.device_id} has no lockable clocks")

    # --- summary ----------------------------------------------------------------------------
    def snapshot(self) -> DeviceSnapshot:
        """Read everything once; controls the device lacks come back as None."""
        limits = self.power_limit_constraints() if self.supports_power_limit() else None
        return DeviceSnapshot(
            device_id=self.device_id,
            node=self.node,
            kind=self.kind.value,
            name=self.name,
            energy_method=self.energy_method.value,
            energy_scope=self.energy_scope.value,
            power_watts=self.power_watts(),
            energy_joules=self.energy_joules(),
            power_limit_watts=self.power_limit_watts(),
            min_power_limit_watts=limits.min_watts if limits else None,
            max_power_limit_watts=limits.max_watts if limits else None,
            default_power_limit_watts=limits.default_watts if limits else None,
            sm_clock_mhz=self.sm_clock_mhz(),
            memory_clock_mhz=self.memory_clock_mhz(),
            locked_clocks_mhz=self.locked_clocks_mhz(),
            utilization_percent=self.utilization_percent(),
            temperature_celsius=self.temperature_celsius(),
            throttle_reasons=self.throttle_reasons(),
            uuid=self.uuid(),
        )

    def close(self) -> None:
        """Release handles (NVML shutdown, file descriptors). Does not restore settings."""

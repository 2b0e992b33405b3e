"""Test doubles for the Device interface: an in-memory GPU and one whose settings live in a JSON file.

The file-backed GPU stands in for a real board in the kill -9 test: its settings outlive the
process that changed them, exactly as a real GPU's do.
"""

from __future__ import annotations

import json
from pathlib import Path

from scheduler.devices.base import (
    ClockConstraints,
    Device,
    DeviceKind,
    DevicePermissionError,
    EnergyMethod,
    EnergyScope,
    PowerLimitConstraints,
)


class MemoryGpu(Device):
    kind = DeviceKind.SIMULATED_GPU
    energy_method = EnergyMethod.SIMULATED
    energy_scope = EnergyScope.GPU

    def __init__(self, device_id: str = "gpu0", node: str = "node0", *, min_watts=200.0, max_watts=700.0,
                 default_watts=700.0, min_mhz=210.0, max_mhz=1980.0, privileged: bool = True,
                 uuid: str | None = None, clocks: bool = True, power_limit: bool = True):
        self.device_id, self.node, self.name = device_id, node, "test-gpu"
        self._pl = PowerLimitConstraints(min_watts, max_watts, default_watts)
        self._cc = ClockConstraints(min_mhz, max_mhz)
        self.limit_watts = default_watts
        self.lock: tuple[float, float] | None = None
        self.privileged = privileged
        self._uuid = uuid or f"GPU-{device_id}"
        self._clocks, self._power_limit = clocks, power_limit
        self.power = 100.0
        self.calls: list[tuple] = []

    def energy_joules(self) -> float:
        return 0.0

    def power_watts(self) -> float:
        return self.power

    def uuid(self):
        return self._uuid

    def sm_clock_mhz(self):
        return self.lock[1] if self.lock else self._cc.max_mhz

    def supports_power_limit(self):
        return self._power_limit

    def power_limit_constraints(self):
        return self._pl

    def power_limit_watts(self):
        return self.limit_watts if self._power_limit else None

    def _need_root(self):
        if not self.privileged:
            raise DevicePermissionError("Insufficient Permissions (NVML_ERROR_NO_PERMISSION)")

    def set_power_limit_watts(self, watts):
        self._need_root()
        self._pl.check(watts)
        self.calls.append(("set_power_limit", watts))
        self.limit_watts = watts

    def supports_locked_clocks(self):
        return self._clocks

    def clock_constraints(self):
        return self._cc

    def locked_clocks_mhz(self):
        return self.lock

    def set_locked_clocks_mhz(self, min_mhz, max_mhz):
        self._need_root()
        self._cc.check(min_mhz, max_mhz)
        self.calls.append(("set_locked_clocks", min_mhz, max_mhz))
        self.lock = (min_mhz, max_mhz)

    def reset_locked_clocks(self):
        self._need_root()
        self.calls.append(("reset_locked_clocks",))
        self.lock = None


class FileGpu(Device):
    """A GPU whose power limit and clock lock are stored in a JSON file (they survive the process)."""

    kind = DeviceKind.SIMULATED_GPU
    energy_method = EnergyMethod.SIMULATED
    energy_scope = EnergyScope.GPU

    def __init__(self, path: str | Path, device_id: str = "gpu0", node: str = "node0"):
        self.path = Path(path)
        self.device_id, self.node, self.name = device_id, node, "file-gpu"
        if not self.path.exists():
            self._write({"limit_watts": 700.0, "lock": None})

    def _read(self) -> dict:
        return json.loads(self.path.read_text())

    def _write(self, data: dict) -> None:
        self.path.write_text(json.dumps(data))

    def energy_joules(self):
        return 0.0

    def power_watts(self):
        return 100.0

    def uuid(self):
        return "GPU-file-0"

    def supports_power_limit(self):
        return True

    def power_limit_constraints(self):
        return PowerLimitConstraints(200.0, 700.0, 700.0)

    def power_limit_watts(self):
        return self._read()["limit_watts"]

    def set_power_limit_watts(self, watts):
        self.power_limit_constraints().check(watts)
        self._write({**self._read(), "limit_watts": watts})

    def supports_locked_clocks(self):
        return True

    def clock_constraints(self):
        return ClockConstraints(210.0, 1980.0)

    def locked_clocks_mhz(self):
        lock = self._read()["lock"]
        return tuple(lock) if lock else None

    def set_locked_clocks_mhz(self, min_mhz, max_mhz):
        self.clock_constraints().check(min_mhz, max_mhz)
        self._write({**self._read(), "lock": [min_mhz, max_mhz]})

    def reset_locked_clocks(self):
        self._write({**self._read(), "lock": None})

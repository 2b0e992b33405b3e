"""NVIDIA GPUs through NVML (pynvml, package nvidia-ml-py): readings, power limit and locked clocks, discovery.

Units: NVML speaks milliwatts and millijoules; everything that leaves this module is watts and joules.
The energy counter (nvmlDeviceGetTotalEnergyConsumption, Volta and later) counts millijoules since the
driver was loaded, as an unsigned 64-bit value, so it never wraps in practice; a driver reload resets
it, which the meter sees as a negative delta and handles.

Discovery follows CUDA's view of the machine: under CUDA_VISIBLE_DEVICES (indices, or GPU-UUIDs and
their unique prefixes, as Ray and schedulers set it) the GPU that CUDA calls device k is given the
device_id "gpu<k>", and its NVML UUID is kept so the mapping can be checked (scripts/gpu/nvml_check.py).
Integer entries are taken as NVML (PCI bus) order, which is CUDA's order when CUDA_DEVICE_ORDER is
PCI_BUS_ID and, on machines with identical GPUs, also under CUDA's default FASTEST_FIRST.

A machine without the NVML library or driver is normal: discover_nvml_gpus() returns [].
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from scheduler.devices.base import (
    ClockConstraints,
    Device,
    DeviceError,
    DeviceKind,
    DeviceNotSupportedError,
    DevicePermissionError,
    DeviceSettingError,
    EnergyMethod,
    EnergyScope,
    PowerLimitConstraints,
)

log = logging.getLogger(__name__)

try:  # the package is a dependency, but keep import-time failures out of CPU-only code paths
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is in the dependencies
    pynvml = None  # type: ignore[assignment]


# Bit values of nvmlClocksEventReason* (formerly nvmlClocksThrottleReason*), from nvml.h. Kept here
# rather than read from pynvml so decoding works (and is tested) without the library loaded.
THROTTLE_REASON_BITS: dict[int, str] = {
    0x0001: "gpu_idle",
    0x0002: "applications_clocks_setting",
    0x0004: "sw_power_cap",
    0x0008: "hw_slowdown",
    0x0010: "sync_boost",
    0x0020: "sw_thermal_slowdown",
    0x0040: "hw_thermal_slowdown",
    0x0080: "hw_power_brake_slowdown",
    0x0100: "display_clock_setting",
    0x0200: "board_limit",
    0x0400: "reliability",
}


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the reasons set in an NVML clocks-event bitmask, low bit first; unknown bits as hex."""
    names: list[str] = []
    remaining = int(mask)
    for bit, name in THROTTLE_REASON_BITS.items():
        if remaining & bit:
            names.append(name)
            remaining &= ~bit
    bit = 1
    while remaining:
        if remaining & bit:
            names.append(f"unknown_0x{bit:x}")
            remaining &= ~bit
        bit <<= 1
    return names


def millijoules_to_joules(mj: int | float) -> float:
    return float(mj) / 1000.0


def milliwatts_to_watts(mw: int | float) -> float:
    return float(mw) / 1000.0


def parse_cuda_visible_devices(value: str | None) -> list[str] | None:
    """Entries of CUDA_VISIBLE_DEVICES as CUDA reads them; None when unset (every GPU is visible).

    CUDA stops at the first entry it cannot use, so does this: "0,2,-1,3" means GPUs 0 and 2, and an
    empty value hides every GPU. Entries are kept as strings: decimal indices, or UUIDs ("GPU-..."
    or "MIG-...", possibly abbreviated to a unique prefix).
    """
    if value is None:
        return None
    entries: list[str] = []
    for raw in value.split(","):
        token = raw.strip()
        if not token:
            break
        if token.lstrip("-").isdigit():
            if int(token) < 0:
                break
            entries.append(str(int(token)))
        elif token.upper().startswith(("GPU-", "MIG-")):
            entries.append(token)
        else:
            break
    return entries


def map_visible_gpus(cuda_visible_devices: str | None, nvml_uuids: Sequence[str]) -> list[tuple[int, int]]:
    """(CUDA visible index, NVML index) for each GPU this process can use.

    nvml_uuids lists every GPU's UUID in NVML index order. An entry that names no GPU, a repeated GPU
    or an ambiguous UUID prefix ends the list, as CUDA does. MIG instances are skipped with a warning:
    NVML's energy counter and power limit belong to the whole GPU, so they cannot be metered alone.
    """
    entries = parse_cuda_visible_devices(cuda_visible_devices)
    if entries is None:
        return [(i, i) for i in range(len(nvml_uuids))]
    mapping: list[tuple[int, int]] = []
    used: set[int] = set()
    for visible_index, entry in enumerate(entries):
        if entry.upper().startswith("MIG-"):
            log.warning("CUDA_VISIBLE_DEVICES entry %s is a MIG instance; Wattlane meters whole GPUs only, skipping it", entry)
            continue
        if entry.isdigit():
            nvml_index = int(entry)
            if nvml_index >= len(nvml_uuids):
                break
        else:
            matches = [i for i, u in enumerate(nvml_uuids) if u.lower().startswith(entry.lower())]
            if len(matches) != 1:
                break
            nvml_index = matches[0]
        if nvml_index in used:
            break
        used.add(nvml_index)
        mapping.append((visible_index, nvml_index))
    return mapping


def _text(value: str | bytes) -> str:
    # pynvml returned bytes before 11.x and str since; accept both
    return value.decode() if isinstance(value, bytes) else value


class _NvmlSession:
    """Reference-counted nvmlInit/nvmlShutdown shared by every NvmlGpu of this process."""

    _lock = threading.Lock()
    _users = 0

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                pynvml.nvmlInit()
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                return
            cls._users -= 1
            if cls._users == 0:
                try:
                    pynvml.nvmlShutdown()
                except pynvml.NVMLError as exc:  # shutting down must not raise from close()
                    log.debug("nvmlShutdown failed: %s", exc)


def nvml_unavailable_reason() -> str | None:
    """None when NVML can be initialised here, else why not (library missing, driver not loaded...)."""
    if pynvml is None:
        return "pynvml is not installed (package nvidia-ml-py)"
    try:
        _NvmlSession.acquire()
    except pynvml.NVMLError as exc:
        return f"{type(exc).__name__}: {exc}"
    _NvmlSession.release()
    return None


class NvmlGpu(Device):
    """One NVIDIA GPU; device_id is "gpu<CUDA visible index>"."""

    kind = DeviceKind.NVIDIA_GPU
    energy_method = EnergyMethod.NVML_COUNTER
    energy_scope = EnergyScope.GPU

    def __init__(self, nvml_index: int, *, device_id: str, node: str):
        _NvmlSession.acquire()
        self._closed = False
        self.nvml_index = nvml_index
        self.device_id = device_id
        self.node = node
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            self.name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self._uuid = _text(pynvml.nvmlDeviceGetUUID(self._handle))
        except BaseException:
            self.close()
            raise
        # Learned on first use: whether the driver answers the instant-power field (newer GPUs and
        # drivers) or only the older, averaged nvmlDeviceGetPowerUsage.
        self._instant_power_supported: bool | None = None
        self._power_constraints: PowerLimitConstraints | None = None
        self._clock_constraints: ClockConstraints | None = None
        # NVML has no getter for a clock lock, so this is the lock this process set (None: unlocked).
        self._locked_clocks: tuple[float, float] | None = None

    # --- errors ----------------------------------------------------------------------------
    def _call(self, fn, *args):
        """Call pynvml, turning NVML's errors into the Device error classes the callers handle."""
        try:
            return fn(self._handle, *args)
        except pynvml.NVMLError_NoPermission as exc:
            raise DevicePermissionError(
                f"{self.device_id}: {fn.__name__} needs root or CAP_SYS_ADMIN ({exc})"
            ) from exc
        except pynvml.NVMLError_NotSupported as exc:
            raise DeviceNotSupportedError(f"{self.device_id}: {fn.__name__} is not supported on {self.name}") from exc
        except pynvml.NVMLError_InvalidArgument as exc:
            raise DeviceSettingError(f"{self.device_id}: {fn.__name__}{args} was refused by the driver ({exc})") from exc
        except pynvml.NVMLError as exc:
            raise DeviceError(f"{self.device_id}: {fn.__name__} failed: {exc}") from exc

    # --- readings --------------------------------------------------------------------------
    def energy_joules(self) -> float:
        return millijoules_to_joules(self._call(pynvml.nvmlDeviceGetTotalEnergyConsumption))

    def power_watts(self) -> float:
        """Instantaneous power where the driver has it (NVML_FI_DEV_POWER_INSTANT), else NVML's average."""
        if self._instant_power_supported is not False:
            watts = self._field_watts(pynvml.NVML_FI_DEV_POWER_INSTANT)
            if watts is not None:
                self._instant_power_supported = True
                return watts
            if self._instant_power_supported is None:
                log.info("%s (%s): no instant power field; using nvmlDeviceGetPowerUsage", self.device_id, self.name)
            self._instant_power_supported = False
        return milliwatts_to_watts(self._call(pynvml.nvmlDeviceGetPowerUsage))

    def average_power_watts(self) -> float | None:
        """The driver's one-second average power (NVML_FI_DEV_POWER_AVERAGE), where available."""
        return self._field_watts(pynvml.NVML_FI_DEV_POWER_AVERAGE)

    def _field_watts(self, field_id: int) -> float | None:
        try:
            values = pynvml.nvmlDeviceGetFieldValues(self._handle, [field_id])
        except pynvml.NVMLError:
            return None
        value = values[0]
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        # power fields are reported in milliwatts as an unsigned int
        raw = value.value.uiVal if value.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT else value.value.ullVal
        return milliwatts_to_watts(raw)

    def _optional(self, fn, *args):
        """A reading some GPUs lack (utilization on some SKUs, clocks in some VMs): None, not an error."""
        try:
            return self._call(fn, *args)
        except DeviceNotSupportedError:
            return None

    def utilization_percent(self) -> float | None:
        rates = self._optional(pynvml.nvmlDeviceGetUtilizationRates)
        return None if rates is None else float(rates.gpu)

    def temperature_celsius(self) -> float | None:
        value = self._optional(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        return None if value is None else float(value)

    def sm_clock_mhz(self) -> float | None:
        value = self._optional(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        return None if value is None else float(value)

    def memory_clock_mhz(self) -> float | None:
        value = self._optional(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        return None if value is None else float(value)

    def throttle_reasons(self) -> list[str]:
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = self._optional(getter)
        return [] if mask is None else decode_throttle_reasons(mask)

    def uuid(self) -> str | None:
        return self._uuid

    # --- power limit -----------------------------------------------------------------------
    def supports_power_limit(self) -> bool:
        try:
            self.power_limit_constraints()
        except DeviceNotSupportedError:
            return False
        return True

    def power_limit_constraints(self) -> PowerLimitConstraints:
        if self._power_constraints is None:
            min_mw, max_mw = self._call(pynvml.nvmlDeviceGetPowerManagementLimitConstraints)
            default_mw = self._call(pynvml.nvmlDeviceGetPowerManagementDefaultLimit)
            self._power_constraints = PowerLimitConstraints(
                min_watts=milliwatts_to_watts(min_mw),
                max_watts=milliwatts_to_watts(max_mw),
                default_watts=milliwatts_to_watts(default_mw),
            )
        return self._power_constraints

    def power_limit_watts(self) -> float | None:
        """The limit the driver enforces (the lowest of the limits set by any means)."""
        try:
            return milliwatts_to_watts(self._call(pynvml.nvmlDeviceGetEnforcedPowerLimit))
        except DeviceNotSupportedError:
            return None

    def set_power_limit_watts(self, watts: float) -> None:
        self.power_limit_constraints().check(watts)
        self._call(pynvml.nvmlDeviceSetPowerManagementLimit, int(round(watts * 1000)))

    # --- locked clocks ---------------------------------------------------------------------
    def supports_locked_clocks(self) -> bool:
        try:
            self.clock_constraints()
        except DeviceNotSupportedError:
            return False
        return True

    def clock_constraints(self) -> ClockConstraints:
        """SM clocks the driver supports at the highest memory clock (the ones a lock can pick)."""
        if self._clock_constraints is None:
            memory_mhz = self._call(pynvml.nvmlDeviceGetSupportedMemoryClocks)
            if not memory_mhz:
                raise DeviceNotSupportedError(f"{self.device_id}: the driver lists no supported memory clocks")
            graphics_mhz = self._call(pynvml.nvmlDeviceGetSupportedGraphicsClocks, max(memory_mhz))
            if not graphics_mhz:
                raise DeviceNotSupportedError(f"{self.device_id}: the driver lists no supported SM clocks")
            supported = tuple(sorted(float(c) for c in set(graphics_mhz)))
            self._clock_constraints = ClockConstraints(min_mhz=supported[0], max_mhz=supported[-1], supported_mhz=supported)
        return self._clock_constraints

    def locked_clocks_mhz(self) -> tuple[float, float] | None:
        return self._locked_clocks

    def set_locked_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        self.clock_constraints().check(min_mhz, max_mhz)
        self._call(pynvml.nvmlDeviceSetGpuLockedClocks, int(round(min_mhz)), int(round(max_mhz)))
        self._locked_clocks = (float(min_mhz), float(max_mhz))

    def reset_locked_clocks(self) -> None:
        self._call(pynvml.nvmlDeviceResetGpuLockedClocks)
        self._locked_clocks = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _NvmlSession.release()


def discover_nvml_gpus(node: str, cuda_visible_devices: str | None = None, *, use_environment: bool = True) -> list[NvmlGpu]:
    """Every NVIDIA GPU this process may use, as CUDA numbers them; [] where there is no NVML/driver.

    cuda_visible_devices: the mask to apply; by default the process's CUDA_VISIBLE_DEVICES.
    """
    reason = nvml_unavailable_reason()
    if reason is not None:
        log.info("no NVIDIA GPUs: %s", reason)
        return []
    if cuda_visible_devices is None and use_environment:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    _NvmlSession.acquire()
    try:
        count = pynvml.nvmlDeviceGetCount()
        uuids = [_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
        mapping = map_visible_gpus(cuda_visible_devices, uuids)
        gpus = [NvmlGpu(nvml_index, device_id=f"gpu{visible}", node=node) for visible, nvml_index in mapping]
    except pynvml.NVMLError as exc:
        log.warning("NVML is loaded but listing GPUs failed (%s); continuing without GPUs", exc)
        gpus = []
    finally:
        _NvmlSession.release()
    return gpus

"""The CPU package as a device: RAPL energy counters where readable, else a labelled estimate from CPU load.

RaplCpu (method "rapl") reads /sys/class/powercap/intel-rapl:N/energy_uj for every package domain (the
same driver exposes AMD Zen packages), adds the dram subdomain where every package has a readable one
(scope "cpu+dram", else "cpu"), and unwraps each counter with its max_energy_range_uj. The files are
often root-only since the PLATYPUS side channel (CVE-2020-8694), so readability is tested, not assumed.

CpuEstimate (method "cpu-estimate") is what codecarbon does without RAPL, done incrementally so nothing
blocks: the system-wide busy fraction from psutil.cpu_times() deltas between two calls, turned into
watts with codecarbon's machine-mode load curve, max_watts * (0.1 + 0.9 * load**3), where max_watts is
a per-thread power times the logical CPU count. The per-thread power is the CPU model's TDP from
codecarbon's cpu_power.csv divided by the threads of one package, on bare metal; on a virtual machine
(or an unknown model) it is codecarbon's default of 4 W per thread, because a VM's few vCPUs are a
slice of a package whose size we cannot see and TDP / visible threads would overstate them many times.

Scope of the estimate: "cpu" by default. RAM can be added (include_ram=True, scope "cpu+dram") at
codecarbon's RAM figure for this machine (a constant per DIMM, 20 W on a small box); it is a constant
that measures nothing a request does and would only swell the idle pool, so it is off unless asked for.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from scheduler.devices.base import Device, DeviceError, DeviceKind, EnergyMethod, EnergyScope

log = logging.getLogger(__name__)

POWERCAP_ROOT = Path("/sys/class/powercap")
#: codecarbon's figure for a CPU model it does not know (codecarbon.core.cpu.DEFAULT_POWER_PER_CORE)
DEFAULT_WATTS_PER_THREAD = 4.0
#: below this gap a new power figure would be mostly noise (psutil's cpu_times tick is 10 ms)
_MIN_POWER_WINDOW_SECONDS = 0.05


# --- RAPL ----------------------------------------------------------------------------------------


@dataclass
class RaplDomain:
    """One RAPL energy counter file and its unwrapping state."""

    name: str
    energy_path: Path
    max_energy_range_uj: int
    last_raw_uj: int | None = None
    accumulated_uj: int = 0

    def read_raw_uj(self) -> int:
        return int(self.energy_path.read_text().strip())

    def advance(self) -> int:
        """Read the counter and add what it moved since the last read, across at most one wrap."""
        raw = self.read_raw_uj()
        if self.last_raw_uj is not None:
            delta = raw - self.last_raw_uj
            if delta < 0:
                delta += self.max_energy_range_uj
            self.accumulated_uj += delta
        self.last_raw_uj = raw
        return self.accumulated_uj


def _readable_domain(directory: Path) -> RaplDomain | None:
    try:
        name = (directory / "name").read_text().strip()
        max_uj = int((directory / "max_energy_range_uj").read_text().strip())
        domain = RaplDomain(name=name, energy_path=directory / "energy_uj", max_energy_range_uj=max_uj)
        domain.read_raw_uj()
    except (OSError, ValueError):
        return None
    return domain


def find_rapl_domains(root: Path = POWERCAP_ROOT) -> tuple[list[RaplDomain], list[RaplDomain]]:
    """(package domains, dram domains) that this process can read; ([], []) where RAPL is unreadable.

    Only top-level intel-rapl:N zones named package-* count (psys overlaps them); a dram subzone is
    returned only when every package has a readable one, so the scope is the same for the whole CPU.
    """
    packages: list[RaplDomain] = []
    drams: list[RaplDomain] = []
    try:
        zones = sorted(p for p in root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
    except OSError:
        return [], []
    for zone in zones:
        package = _readable_domain(zone)
        if package is None or not package.name.startswith("package"):
            continue
        packages.append(package)
        for sub in sorted(zone.glob(f"{zone.name}:*")):
            domain = _readable_domain(sub)
            if domain is not None and domain.name == "dram":
                drams.append(domain)
                break
    if len(drams) != len(packages):
        drams = []
    return packages, drams


class _PowerFromEnergy:
    """Average power between the two latest energy readings at least _MIN_POWER_WINDOW_SECONDS apart."""

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None  # (monotonic s, joules)
        self.watts: float | None = None

    def update(self, now_s: float, energy_joules: float) -> None:
        if self._anchor is None:
            self._anchor = (now_s, energy_joules)
            return
        dt = now_s - self._anchor[0]
        if dt >= _MIN_POWER_WINDOW_SECONDS:
            self.watts = max(0.0, (energy_joules - self._anchor[1]) / dt)
            self._anchor = (now_s, energy_joules)


class RaplCpu(Device):
    """The CPU packages (and DRAM where every package exposes it) through RAPL counters."""

    kind = DeviceKind.CPU
    energy_method = EnergyMethod.RAPL

    def __init__(self, *, device_id: str = "cpu0", node: str, root: Path = POWERCAP_ROOT):
        packages, drams = find_rapl_domains(root)
        if not packages:
            raise DeviceError(f"no readable RAPL package counters under {root}")
        self.device_id = device_id
        self.node = node
        self.name = _cpu_model_name() or "cpu"
        self.domains = packages + drams
        self.energy_scope = EnergyScope.CPU_DRAM if drams else EnergyScope.CPU
        self._lock = threading.Lock()
        self._power = _PowerFromEnergy()
        self._load = _SystemLoad()
        self.energy_joules()

    def energy_joules(self) -> float:
        with self._lock:
            total_uj = sum(d.advance() for d in self.domains)
            joules = total_uj / 1e6
            self._power.update(time.monotonic(), joules)
        return joules

    def power_watts(self) -> float:
        """Average power since the previous reading (the meter reads every 0.1 s by default)."""
        self.energy_joules()
        return self._power.watts if self._power.watts is not None else 0.0

    def utilization_percent(self) -> float | None:
        """System-wide busy percent since the previous call."""
        return self._load.fraction() * 100.0


# --- estimate ------------------------------------------------------------------------------------


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model_name() -> str | None:
    return _cpuinfo_fields().get("model name")


def is_virtual_machine(cpuinfo: dict[str, str] | None = None) -> bool:
    """True when the CPU reports the hypervisor flag (KVM, Xen, VMware, cloud instances)."""
    fields = _cpuinfo_fields() if cpuinfo is None else cpuinfo
    return "hypervisor" in fields.get("flags", "").split()


def lookup_tdp_watts(model_name: str) -> tuple[str, float] | None:
    """(matched name, TDP watts) from codecarbon's cpu_power.csv with codecarbon's own matching rules."""
    try:
        from codecarbon.core.cpu import TDP
        from codecarbon.input import DataSource

        table = DataSource().get_cpu_power_data()
        # TDP() would probe the machine on construction; only its matcher is wanted here
        matched = TDP._get_matching_cpu(TDP.__new__(TDP), model_name, table)
        if not matched:
            return None
        return matched, float(table[table["Name"] == matched]["TDP"].values[0])
    except Exception as exc:  # codecarbon internals moved: fall back to the default, loudly
        log.warning("codecarbon's CPU power table could not be used (%s); using %g W per thread", exc, DEFAULT_WATTS_PER_THREAD)
        return None


@dataclass(frozen=True)
class CpuPowerModel:
    """How CpuEstimate turns load into watts, and where its numbers came from."""

    model_name: str
    threads: int
    watts_per_thread: float
    #: "codecarbon-tdp:<matched name>" or "codecarbon-default"
    source: str
    ram_watts: float = 0.0

    @property
    def max_cpu_watts(self) -> float:
        return self.watts_per_thread * self.threads

    def cpu_watts(self, load_fraction: float) -> float:
        """codecarbon 3.3's machine-mode curve: 10% of the maximum at idle, cubic in load."""
        load = min(max(load_fraction, 0.0), 1.0)
        return self.max_cpu_watts * (0.1 + 0.9 * load**3)

    def watts(self, load_fraction: float) -> float:
        return self.cpu_watts(load_fraction) + self.ram_watts


def build_cpu_power_model(
    model_name: str | None = None,
    *,
    threads: int | None = None,
    threads_per_package: int | None = None,
    virtual_machine: bool | None = None,
    ram_watts: float = 0.0,
) -> CpuPowerModel:
    """The power model for this machine; every argument can be given to describe another machine."""
    cpuinfo = _cpuinfo_fields()
    model_name = model_name or cpuinfo.get("model name") or "unknown CPU"
    threads = threads or psutil.cpu_count(logical=True) or 1
    if threads_per_package is None:
        siblings = cpuinfo.get("siblings", "")
        threads_per_package = int(siblings) if siblings.isdigit() else threads
    if virtual_machine is None:
        virtual_machine = is_virtual_machine(cpuinfo)
    found = None if virtual_machine else lookup_tdp_watts(model_name)
    if found is not None:
        matched, tdp_watts = found
        return CpuPowerModel(model_name, threads, tdp_watts / max(threads_per_package, 1), f"codecarbon-tdp:{matched}", ram_watts)
    return CpuPowerModel(model_name, threads, DEFAULT_WATTS_PER_THREAD, "codecarbon-default", ram_watts)


def codecarbon_ram_watts() -> float:
    """codecarbon's RAM power for this machine (a fixed figure per estimated DIMM)."""
    from codecarbon.external.ram import RAM

    return float(RAM(tracking_mode="machine").total_power().W)


class _SystemLoad:
    """System-wide busy fraction between successive calls, from psutil.cpu_times (never sleeps)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = psutil.cpu_times()
        self._last_fraction = 0.0

    @staticmethod
    def _busy_total(times) -> tuple[float, float]:
        # as codecarbon's SystemCPULoadMeter: guest time is already inside user/nice on Linux
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)
        return total - idle, total

    def fraction(self) -> float:
        with self._lock:
            now = psutil.cpu_times()
            busy1, total1 = self._busy_total(now)
            busy0, total0 = self._busy_total(self._last)
            if total1 - total0 > 0:
                self._last_fraction = min(max((busy1 - busy0) / (total1 - total0), 0.0), 1.0)
                self._last = now
            return self._last_fraction

    def peek_percent(self) -> float:
        return self._last_fraction * 100.0


class CpuEstimate(Device):
    """CPU energy estimated from load where no RAPL counter is readable; labelled cpu-estimate."""

    kind = DeviceKind.CPU
    energy_method = EnergyMethod.CPU_ESTIMATE

    def __init__(self, *, device_id: str = "cpu0", node: str, include_ram: bool = False, power_model: CpuPowerModel | None = None):
        self.device_id = device_id
        self.node = node
        ram_watts = codecarbon_ram_watts() if include_ram else 0.0
        self.power_model = power_model or build_cpu_power_model(ram_watts=ram_watts)
        self.name = self.power_model.model_name
        self.energy_scope = EnergyScope.CPU_DRAM if self.power_model.ram_watts > 0 else EnergyScope.CPU
        self._load = _SystemLoad()
        self._lock = threading.Lock()
        self._last_s = time.monotonic()
        self._energy_joules = 0.0
        self._watts = self.power_model.watts(0.0)
        log.info(
            "cpu0: no readable RAPL; estimating from load: %s, %d threads x %.2f W (%s)%s",
            self.name, self.power_model.threads, self.power_model.watts_per_thread, self.power_model.source,
            f" + RAM {self.power_model.ram_watts:g} W" if self.power_model.ram_watts else "",
        )

    def _advance(self) -> float:
        """Integrate power over the time since the last call, at the load measured over that time."""
        with self._lock:
            now = time.monotonic()
            dt = now - self._last_s
            if dt > 0:
                self._watts = self.power_model.watts(self._load.fraction())
                self._energy_joules += self._watts * dt
                self._last_s = now
            return self._energy_joules

    def energy_joules(self) -> float:
        return self._advance()

    def power_watts(self) -> float:
        """Estimated power over the time since the previous reading (refreshed if that is stale)."""
        with self._lock:
            fresh = time.monotonic() - self._last_s < _MIN_POWER_WINDOW_SECONDS
        if not fresh:
            self._advance()
        return self._watts

    def utilization_percent(self) -> float | None:
        return self._load.peek_percent()


def rapl_readable(root: Path = POWERCAP_ROOT) -> bool:
    return bool(find_rapl_domains(root)[0])


def make_cpu_device(node: str, *, device_id: str = "cpu0", include_ram: bool = False, root: Path = POWERCAP_ROOT) -> Device:
    """RaplCpu where the counters are readable, else CpuEstimate (saying why once, in the log)."""
    if rapl_readable(root):
        return RaplCpu(device_id=device_id, node=node, root=root)
    why = "not present" if not root.exists() else "not readable by this user (often root-only)"
    log.info("RAPL counters under %s are %s; the CPU figure will be an estimate (cpu-estimate)", root, why)
    return CpuEstimate(device_id=device_id, node=node, include_ram=include_ram)

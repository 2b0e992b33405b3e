"""CPU devices: RAPL counters (wrap, dram scope, readability) on a sysfs-shaped tree, and the load estimate."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from scheduler.devices.base import DeviceError, EnergyScope
from scheduler.devices.cpu import (
    DEFAULT_WATTS_PER_THREAD,
    CpuEstimate,
    CpuPowerModel,
    RaplCpu,
    build_cpu_power_model,
    find_rapl_domains,
    is_virtual_machine,
    make_cpu_device,
)

MAX_UJ = 262_143_328_850


def zone(directory: Path, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    """A powercap zone laid out as the kernel's intel-rapl driver lays it out."""
    directory.mkdir(parents=True)
    (directory / "name").write_text(name + "\n")
    (directory / "energy_uj").write_text(f"{energy_uj}\n")
    (directory / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return directory


def set_uj(directory: Path, energy_uj: int) -> None:
    (directory / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_and_unwraps_each_counter(tmp_path):
    p0 = zone(tmp_path / "intel-rapl:0", "package-0", MAX_UJ - 1_000_000)
    p1 = zone(tmp_path / "intel-rapl:1", "package-1", 5_000_000)
    zone(tmp_path / "intel-rapl:2", "psys", 0)  # platform domain overlaps the packages: ignored
    cpu = RaplCpu(node="n0", root=tmp_path)
    assert cpu.energy_scope is EnergyScope.CPU and cpu.energy_method.value == "rapl"
    e0 = cpu.energy_joules()
    set_uj(p0, 2_000_000)  # wrapped: moved 1 J to the top and 2 J after it
    set_uj(p1, 9_000_000)
    assert cpu.energy_joules() - e0 == pytest.approx(3.0 + 4.0)
    set_uj(p0, 2_500_000)
    assert cpu.energy_joules() - e0 == pytest.approx(7.5)


def test_rapl_includes_dram_only_when_every_package_has_it(tmp_path):
    p0 = zone(tmp_path / "intel-rapl:0", "package-0", 0)
    d0 = zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:0", "dram", 0)
    zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:1", "core", 0)
    cpu = RaplCpu(node="n0", root=tmp_path)
    assert cpu.energy_scope is EnergyScope.CPU_DRAM
    set_uj(p0, 3_000_000)
    set_uj(d0, 1_000_000)
    assert cpu.energy_joules() == pytest.approx(4.0)

    zone(tmp_path / "intel-rapl:1", "package-1", 0)  # a second package without dram
    packages, drams = find_rapl_domains(tmp_path)
    assert len(packages) == 2 and drams == []


def test_rapl_power_is_the_average_between_readings(tmp_path):
    p0 = zone(tmp_path / "intel-rapl:0", "package-0", 0)
    cpu = RaplCpu(node="n0", root=tmp_path)
    time.sleep(0.06)
    set_uj(p0, 6_000_000)
    cpu.energy_joules()
    assert cpu._power.watts == pytest.approx(6.0 / 0.06, rel=0.5)


def test_unreadable_or_missing_rapl_falls_back_to_the_estimate(tmp_path):
    assert find_rapl_domains(tmp_path / "absent") == ([], [])
    broken = tmp_path / "intel-rapl:0"
    broken.mkdir()
    (broken / "name").write_text("package-0\n")
    (broken / "max_energy_range_uj").write_text(f"{MAX_UJ}\n")
    (broken / "energy_uj").mkdir()  # reading it raises, as a root-only file does for a user
    assert find_rapl_domains(tmp_path) == ([], [])
    with pytest.raises(DeviceError):
        RaplCpu(node="n0", root=tmp_path)
    device = make_cpu_device("n0", root=tmp_path)
    assert isinstance(device, CpuEstimate) and device.energy_method.value == "cpu-estimate"


def test_power_model_uses_tdp_per_package_thread_on_bare_metal():
    model = build_cpu_power_model("AMD EPYC 7763 64-Core Processor", threads=256, threads_per_package=128, virtual_machine=False)
    assert model.source == "codecarbon-tdp:AMD EPYC 7763"
    assert model.watts_per_thread == pytest.approx(280.0 / 128)
    assert model.max_cpu_watts == pytest.approx(560.0)


def test_power_model_uses_codecarbon_default_on_a_vm_or_unknown_cpu():
    vm = build_cpu_power_model("AMD EPYC 7763 64-Core Processor", threads=8, threads_per_package=8, virtual_machine=True)
    unknown = build_cpu_power_model("AMD EPYC", threads=2, threads_per_package=2, virtual_machine=False)
    for model in (vm, unknown):
        assert model.source == "codecarbon-default"
        assert model.watts_per_thread == DEFAULT_WATTS_PER_THREAD
    assert vm.max_cpu_watts == 32.0


def test_load_curve_matches_codecarbon_machine_mode():
    model = CpuPowerModel("x", threads=10, watts_per_thread=4.0, source="codecarbon-default")
    assert model.cpu_watts(0.0) == pytest.approx(4.0)  # 10% of 40 W at idle
    assert model.cpu_watts(1.0) == pytest.approx(40.0)
    assert model.cpu_watts(0.5) == pytest.approx(40.0 * (0.1 + 0.9 * 0.125))
    with_ram = CpuPowerModel("x", threads=10, watts_per_thread=4.0, source="codecarbon-default", ram_watts=20.0)
    assert with_ram.watts(0.0) == pytest.approx(24.0)


def test_vm_detection_reads_the_hypervisor_flag():
    assert is_virtual_machine({"flags": "fpu vme hypervisor avx2"})
    assert not is_virtual_machine({"flags": "fpu vme avx2"})


def test_estimate_integrates_power_and_is_monotonic_under_concurrent_readers():
    model = CpuPowerModel("test cpu", threads=2, watts_per_thread=4.0, source="codecarbon-default")
    cpu = CpuEstimate(node="n0", power_model=model)
    assert cpu.energy_scope is EnergyScope.CPU and cpu.device_id == "cpu0"
    readings: list[list[float]] = [[] for _ in range(4)]

    def reader(out: list[float]) -> None:
        for _ in range(200):
            out.append(cpu.energy_joules())

    t0 = time.monotonic()
    e0 = cpu.energy_joules()
    threads = [threading.Thread(target=reader, args=(r,)) for r in readings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.05)
    e1 = cpu.energy_joules()
    elapsed = time.monotonic() - t0
    for series in readings:
        assert all(b >= a for a, b in zip(series, series[1:]))
    # between 10% and 100% of 8 W over the elapsed time (small slack for the first call's time)
    assert 0.8 * elapsed * 0.9 <= e1 - e0 <= 8.0 * elapsed * 1.05
    assert 0.8 <= cpu.power_watts() <= 8.0


def test_estimate_with_ram_names_scope_cpu_plus_dram():
    cpu = CpuEstimate(node="n0", include_ram=True)
    assert cpu.energy_scope is EnergyScope.CPU_DRAM
    assert cpu.power_model.ram_watts > 0
    assert cpu.power_watts() >= cpu.power_model.ram_watts

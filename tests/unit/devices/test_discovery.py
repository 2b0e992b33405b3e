"""discover_devices on this machine (no GPU, no readable RAPL) and with simulated GPUs configured."""

from __future__ import annotations


import pytest

from scheduler.config import ConfigError, DevicesConfig, SimulatedGpuConfig
from scheduler.devices.discovery import discover_devices


def test_this_machine_gives_one_cpu_device_and_no_gpu():
    devices = discover_devices(DevicesConfig(), "n0")
    cpu = [d for d in devices if d.device_id == "cpu0"]
    assert len(cpu) == 1
    assert cpu[0].energy_method.value in ("rapl", "cpu-estimate")
    assert cpu[0].node == "n0"
    assert all(d.kind.value != "simulated-gpu" for d in devices)


def test_everything_off_gives_nothing():
    assert discover_devices(DevicesConfig(nvml=False, cpu=False), "n0") == []


def test_include_ram_changes_the_estimate_scope(monkeypatch):
    from scheduler.devices import cpu as cpu_module

    # the estimate is what a machine without readable RAPL gets; force that path whatever this machine has
    monkeypatch.setattr(cpu_module, "rapl_readable", lambda root=None: False)
    (with_ram,) = discover_devices(DevicesConfig(nvml=False, cpu_estimate_include_ram=True), "n0")
    (cpu_only,) = discover_devices(DevicesConfig(nvml=False, cpu_estimate_include_ram=False), "n0")
    assert with_ram.energy_method.value == cpu_only.energy_method.value == "cpu-estimate"
    assert with_ram.energy_scope.value == "cpu+dram" and cpu_only.energy_scope.value == "cpu"
    # the RAM share is added power, at any load
    assert with_ram.power_model.ram_watts > 0 and cpu_only.power_model.ram_watts == 0
    assert with_ram.power_model.watts(0.5) > cpu_only.power_model.watts(0.5)


def test_simulated_gpus_are_created_and_ids_must_be_unique():
    config = DevicesConfig(nvml=False, cpu=True, simulated=[SimulatedGpuConfig(id="sim-0", profile="h100-sxm")])
    devices = discover_devices(config, "n0")
    assert [d.device_id for d in devices] == ["cpu0", "sim-0"]
    assert devices[1].energy_method.value == "simulated"
    clash = DevicesConfig(nvml=False, cpu=True, simulated=[SimulatedGpuConfig(id="cpu0", profile="h100-sxm")])
    with pytest.raises(ConfigError, match="share the id 'cpu0'"):
        discover_devices(clash, "n0")

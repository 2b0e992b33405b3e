"""Find the devices of this node that the config asks for: NVML GPUs, the CPU package, simulated GPUs.

Absent hardware is normal: no NVIDIA driver gives no GPUs, unreadable RAPL gives a labelled CPU
estimate. Only a configuration that cannot be honoured (two devices with one id) is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from scheduler.config import ConfigError, DevicesConfig
from scheduler.devices.base import Device

log = logging.getLogger(__name__)


def discover_devices(
    devices_config: DevicesConfig, node: str, *, include_simulated: bool | Collection[str] = True,
    state_dir: str | Path | None = None
) -> list[Device]:
    """The devices this node meters, GPUs first ("gpu0"...), then "cpu0", then simulated GPUs.

    Simulated GPUs are not hardware of any node: each keeps the node named in its config, and in a
    cluster each is created by one node agent only: include_simulated is True (all), False (none) or
    the ids this node owns (cluster.runtime.simulated_owners). With a
    state_dir their settings persist in <state_dir>/simulated-gpus/<id>.json across restarts, as a
    real GPU's do across a process crash.
    """
    devices: list[Device] = []
    if devices_config.nvml:
        from scheduler.devices.nvml import discover_nvml_gpus

        devices.extend(discover_nvml_gpus(node))
    if devices_config.cpu:
        from scheduler.devices.cpu import make_cpu_device

        devices.append(make_cpu_device(node, include_ram=devices_config.cpu_estimate_include_ram))
    if devices_config.simulated and include_simulated:
        from scheduler.devices.simulated import SimulatedGpu

        for sim in devices_config.simulated:
            if include_simulated is not True and sim.id not in include_simulated:
                continue
            settings = Path(state_dir) / "simulated-gpus" / f"{sim.id}.json" if state_dir is not None else None
            devices.append(SimulatedGpu(device_id=sim.id, profile=sim.profile, node=sim.node, settings_path=settings))
    seen: dict[str, Device] = {}
    for device in devices:
        if device.device_id in seen:
            for d in devices:
                d.close()
            raise ConfigError(
                f"two devices share the id '{device.device_id}' ({seen[device.device_id].kind.value} and {device.kind.value})",
                key="devices.simulated",
                fix="give simulated GPUs ids that do not collide with discovered ones (gpuN, cpu0), e.g. sim-h100-0",
            )
        seen[device.device_id] = device
    log.info("node %s devices: %s", node, ", ".join(f"{d.device_id} ({d.kind.value}, {d.energy_method.value})" for d in devices) or "none")
    return devices

"""The devices' original power settings, written durably before the first change so a crash can restore them.

<state_dir>/power/saved_settings.json holds one entry per device the actuator has changed (atomic
replace + fsync of the file and its directory). An unreadable file is moved aside, never dropped,
so a person can still restore from it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from scheduler.devices.base import Device

log = logging.getLogger(__name__)

SAVED_SETTINGS_VERSION = 1


def device_key(device: Device) -> str:
    return f"{device.node}/{device.device_id}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SavedSettingsStore:
    """Original settings by device key ("node/device_id"), mirrored to a file on every change."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "saved_settings.json"
        #: device key -> {"node", "device_id", "uuid", "power_limit_watts", "locked_clocks_mhz", ...}
        self.entries: dict[str, dict[str, Any]] = {}

    def load(self) -> list[str]:
        """Read the file into entries; return the problems found (the file is then kept aside)."""
        self.entries.clear()
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries.update(dict(data.get("devices", {})))
            return []
        except (OSError, ValueError) as exc:
            # An unreadable file must not silently lose the originals: keep it aside for a person.
            aside = self.path.with_suffix(f".corrupt-{int(time.time())}")
            self.path.replace(aside)
            log.error("could not read %s (%s); moved it to %s", self.path, exc, aside)
            return [f"saved settings file unreadable, kept at {aside}: {exc}"]

    def write(self) -> None:
        """Make the file match entries (removed when empty), durably."""
        if not self.entries:
            if self.path.exists():
                self.path.unlink()
                _fsync_dir(self.directory)
            return
        tmp = self.path.with_suffix(".json.tmp")
        body = json.dumps({"version": SAVED_SETTINGS_VERSION, "devices": self.entries}, indent=2, sort_keys=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)

    def save_original(self, dev: Device) -> None:
        """Record `dev`'s current settings, unless already recorded, and write them durably."""
        key = device_key(dev)
        if key in self.entries:
            return
        entry: dict[str, Any] = {
            "node": dev.node,
            "device_id": dev.device_id,
            "uuid": dev.uuid(),
            "saved_at_s": time.time(),
            "power_limit_watts": None,
            "locked_clocks_mhz": None,
            "has_power_limit": dev.supports_power_limit(),
            "has_locked_clocks": dev.supports_locked_clocks(),
        }
        if entry["has_power_limit"]:
            entry["power_limit_watts"] = dev.power_limit_watts()
        if entry["has_locked_clocks"]:
            lock = dev.locked_clocks_mhz()
            entry["locked_clocks_mhz"] = list(lock) if lock is not None else None
        self.entries[key] = entry
        self.write()

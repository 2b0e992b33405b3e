"""The pure parts of the NVML device: CUDA_VISIBLE_DEVICES mapping, throttle reasons, units, no-GPU path."""

from __future__ import annotations

import pytest

from scheduler.devices import nvml
from scheduler.devices.nvml import (
    decode_throttle_reasons,
    discover_nvml_gpus,
    map_visible_gpus,
    millijoules_to_joules,
    milliwatts_to_watts,
    parse_cuda_visible_devices,
)

UUIDS = [
    "GPU-0aa1b2c3-0000-1111-2222-333344445555",
    "GPU-0ab9f8e7-aaaa-bbbb-cccc-ddddeeeeffff",
    "GPU-77e6d5c4-1234-5678-9abc-def012345678",
    "GPU-c0ffee00-9999-8888-7777-666655554444",
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", []),
        ("0,1", ["0", "1"]),
        (" 2 , 0 ", ["2", "0"]),
        ("0,2,-1,3", ["0", "2"]),  # CUDA stops at the first invalid entry
        ("1,foo,2", ["1"]),
        ("GPU-77e6d5c4,0", ["GPU-77e6d5c4", "0"]),
        ("01", ["1"]),
    ],
)
def test_parse_cuda_visible_devices(value, expected):
    assert parse_cuda_visible_devices(value) == expected


def test_unset_mask_shows_every_gpu_in_nvml_order():
    assert map_visible_gpus(None, UUIDS) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_indices_as_ray_sets_them_renumber_from_zero():
    # Ray gives a replica GPUs 2 and 3: CUDA calls them 0 and 1, so do we (gpu0 -> NVML 2)
    assert map_visible_gpus("2,3", UUIDS) == [(0, 2), (1, 3)]
    assert map_visible_gpus("3,1", UUIDS) == [(0, 3), (1, 1)]


def test_uuids_and_unique_prefixes_resolve_to_their_gpus():
    assert map_visible_gpus(f"{UUIDS[3]},{UUIDS[0]}", UUIDS) == [(0, 3), (1, 0)]
    assert map_visible_gpus("GPU-77e6,gpu-c0ffee", UUIDS) == [(0, 2), (1, 3)]


def test_ambiguous_unknown_repeated_or_out_of_range_entries_end_the_list():
    assert map_visible_gpus("1,GPU-0a", UUIDS) == [(0, 1)]  # GPU-0a matches two GPUs
    assert map_visible_gpus("0,GPU-deadbeef,1", UUIDS) == [(0, 0)]
    assert map_visible_gpus("1,1,2", UUIDS) == [(0, 1)]
    assert map_visible_gpus("2,7,0", UUIDS) == [(0, 2)]
    assert map_visible_gpus("", UUIDS) == []


def test_mig_instances_are_skipped_but_keep_their_cuda_index():
    assert map_visible_gpus("MIG-1234abcd-0000-0000-0000-000000000000,1", UUIDS) == [(1, 1)]


def test_throttle_reasons_decode_to_names():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x1) == ["gpu_idle"]
    assert decode_throttle_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x8 | 0x80 | 0x100) == ["hw_slowdown", "hw_power_brake_slowdown", "display_clock_setting"]
    assert decode_throttle_reasons(0x1000 | 0x4) == ["sw_power_cap", "unknown_0x1000"]


def test_throttle_reason_bits_agree_with_pynvml():
    import pynvml

    assert nvml.THROTTLE_REASON_BITS[pynvml.nvmlClocksThrottleReasonSwPowerCap] == "sw_power_cap"
    assert nvml.THROTTLE_REASON_BITS[pynvml.nvmlClocksThrottleReasonHwThermalSlowdown] == "hw_thermal_slowdown"
    assert nvml.THROTTLE_REASON_BITS[pynvml.nvmlClocksThrottleReasonSyncBoost] == "sync_boost"
    assert nvml.THROTTLE_REASON_BITS[pynvml.nvmlClocksThrottleReasonGpuIdle] == "gpu_idle"


def test_units_leave_the_module_as_joules_and_watts():
    assert millijoules_to_joules(123_456_789) == pytest.approx(123_456.789)
    assert milliwatts_to_watts(350_000) == pytest.approx(350.0)


def test_no_gpu_machine_discovers_nothing_without_error(monkeypatch):
    """Where the NVIDIA library or driver is missing, nvmlInit fails: that is no GPUs, not an error."""
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(nvml._NvmlSession, "_users", 0)
    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    reason = nvml.nvml_unavailable_reason()
    assert reason is not None and "LibraryNotFound" in reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert discover_nvml_gpus("n0") == []


class TestErrorTranslationWithStubbedLibrary:
    """Only how NvmlGpu turns limits and NVML errors into Device errors; NVML itself is stubbed, so no
    reading here says anything about real GPUs (scripts/gpu/nvml_check.py checks those)."""

    @pytest.fixture
    def gpu(self, monkeypatch):
        import pynvml

        calls: list[tuple] = []
        stubs = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
            "nvmlDeviceGetName": lambda h: "stub",
            "nvmlDeviceGetUUID": lambda h: UUIDS[h[1]],
            "nvmlDeviceGetPowerManagementLimitConstraints": lambda h: [100_000, 400_000],
            "nvmlDeviceGetPowerManagementDefaultLimit": lambda h: 350_000,
            "nvmlDeviceSetPowerManagementLimit": lambda h, mw: calls.append(("set", mw)),
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: 1_234_567,
        }
        for name, fn in stubs.items():
            monkeypatch.setattr(pynvml, name, fn)
        device = nvml.NvmlGpu(2, device_id="gpu0", node="n0")
        device.calls = calls
        yield device
        device.close()

    def test_out_of_range_limit_is_refused_before_nvml_is_called(self, gpu):
        from scheduler.devices.base import DeviceSettingError

        with pytest.raises(DeviceSettingError, match="outside"):
            gpu.set_power_limit_watts(450.0)
        assert gpu.calls == []
        gpu.set_power_limit_watts(250.5)
        gpu.reset_power_limit()
        assert gpu.calls == [("set", 250_500), ("set", 350_000)]

    def test_no_permission_becomes_device_permission_error(self, gpu, monkeypatch):
        import pynvml

        from scheduler.devices.base import DevicePermissionError

        def refuse(h, mw):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

        monkeypatch.setattr(pynvml, "nvmlDeviceSetPowerManagementLimit", refuse)
        with pytest.raises(DevicePermissionError, match="root"):
            gpu.set_power_limit_watts(300.0)

    def test_counter_is_reported_in_joules_and_uuid_kept(self, gpu):
        assert gpu.energy_joules() == pytest.approx(1234.567)
        assert gpu.uuid() == UUIDS[2] and gpu.nvml_index == 2

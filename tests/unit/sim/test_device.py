"""SimulatedGpu behaves like an NVML device: counters, constraints, locks, throttle reasons."""

import pytest

from scheduler.devices.base import DeviceKind, DeviceNotSupportedError, DeviceSettingError
from scheduler.devices.simulated import SimulatedGpu


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_energy_integrates_piecewise_power():
    c = Clock()
    g = SimulatedGpu("g0", "h100-sxm", clock=c)
    g.attach_model(True)
    e0 = g.energy_joules()
    c.t += 10
    g.set_busy(power_watts=500, clock_mhz=1980, capped=False)
    c.t += 2
    g.set_idle()
    c.t += 1
    assert g.energy_joules() - e0 == pytest.approx(122 * 10 + 500 * 2 + 122 * 1)
    assert g.kind == DeviceKind.SIMULATED_GPU and g.snapshot().energy_method == "simulated"


def test_power_limit_constraints_and_reset():
    g = SimulatedGpu("g0", "h100-sxm", clock=Clock())
    c = g.power_limit_constraints()
    assert (c.min_watts, c.max_watts, c.default_watts) == (200, 700, 700)
    g.set_power_limit_watts(350)
    assert g.power_limit_watts() == 350
    with pytest.raises(DeviceSettingError):
        g.set_power_limit_watts(150)
    with pytest.raises(DeviceSettingError):
        g.set_power_limit_watts(701)
    assert g.power_limit_watts() == 350
    g.reset_power_limit()
    assert g.power_limit_watts() == 700


def test_locked_clocks_lower_idle_power_and_reset():
    g = SimulatedGpu("g0", "h100-sxm", clock=Clock())
    g.attach_model(True)
    with pytest.raises(DeviceSettingError):
        g.set_locked_clocks_mhz(100, 500)
    g.set_locked_clocks_mhz(210, 210)
    assert g.locked_clocks_mhz() == (210, 210)
    assert g.power_watts() == pytest.approx(61)
    g.reset_locked_clocks()
    assert g.locked_clocks_mhz() is None and g.power_watts() == pytest.approx(122)


def test_throttle_reasons_and_listener():
    g = SimulatedGpu("g0", "h100-sxm", clock=Clock())
    seen = []
    g.add_settings_listener(lambda d: seen.append(d.power_limit_watts()))
    assert g.throttle_reasons() == ["gpu_idle"]
    g.set_busy(power_watts=300, clock_mhz=1200, capped=True)
    assert g.throttle_reasons() == ["sw_power_cap"] and g.utilization_percent() == 100
    g.set_power_limit_watts(300)
    assert seen == [300]


def test_l40s_has_no_settable_limit():
    g = SimulatedGpu("g0", "l40s", clock=Clock())
    assert not g.supports_power_limit()
    with pytest.raises(DeviceNotSupportedError):
        g.set_power_limit_watts(300)


def test_settings_outlive_the_object_like_a_real_gpus_do(tmp_path):
    path = tmp_path / "simulated-gpus" / "g0.json"
    first = SimulatedGpu("g0", "h100-sxm", settings_path=path)
    first.set_power_limit_watts(300)
    first.set_locked_clocks_mhz(800, 1000)
    # a new process (the agent after kill -9) finds the device as the crash left it
    again = SimulatedGpu("g0", "h100-sxm", settings_path=path)
    assert again.power_limit_watts() == 300 and again.locked_clocks_mhz() == (800, 1000)
    again.reset_power_limit()
    again.reset_locked_clocks()
    after_reset = SimulatedGpu("g0", "h100-sxm", settings_path=path)
    assert after_reset.power_limit_watts() == 700 and after_reset.locked_clocks_mhz() is None
    # without a path nothing persists (replays and calibration)
    SimulatedGpu("g1", "h100-sxm").set_power_limit_watts(300)
    assert SimulatedGpu("g1", "h100-sxm").power_limit_watts() == 700


def test_unusable_saved_settings_start_at_the_defaults(tmp_path):
    path = tmp_path / "g0.json"
    for text in ("not json", '{"power_limit_watts": 5000}', '{"power_limit_watts": 300, "locked_clocks_mhz": [1000, 800]}'):
        path.write_text(text)
        gpu = SimulatedGpu("g0", "h100-sxm", settings_path=path)
        assert gpu.power_limit_watts() == 700 and gpu.locked_clocks_mhz() is None, text

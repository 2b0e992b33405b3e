"""DeviceMeter: intervals tile time, add up to the counter, survive failed reads, and stop with a flush."""

from __future__ import annotations

import threading
import time

import pytest

from scheduler.devices.base import Device, DeviceError, DeviceKind, EnergyMethod, EnergyScope
from scheduler.devices.cpu import CpuEstimate
from scheduler.energy.meter import DeviceMeter, EnergyInterval


class ScriptedDevice(Device):
    """Test double for the meter: a counter the test moves by hand, and can make fail."""

    kind = DeviceKind.SIMULATED_GPU
    energy_method = EnergyMethod.SIMULATED
    energy_scope = EnergyScope.GPU
    name = "scripted"

    def __init__(self, device_id: str = "dev0", power_watts: float = 100.0):
        self.device_id = device_id
        self.node = "n0"
        self.counter_joules = 1000.0
        self.fail_counter = False
        self.fail_power = False
        self.power = power_watts
        self.reads = 0

    def energy_joules(self) -> float:
        self.reads += 1
        if self.fail_counter:
            raise DeviceError("driver went away")
        return self.counter_joules

    def power_watts(self) -> float:
        if self.fail_power:
            raise DeviceError("driver went away")
        return self.power


class FakeClocks:
    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 50.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_meter(*devices: Device) -> tuple[DeviceMeter, FakeClocks, list[EnergyInterval]]:
    clocks = FakeClocks()
    meter = DeviceMeter(devices, 0.1, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    got: list[EnergyInterval] = []
    meter.add_callback(got.append)
    meter.baseline()
    return meter, clocks, got


def test_intervals_tile_time_and_sum_to_counter_delta():
    dev = ScriptedDevice()
    meter, clocks, got = make_meter(dev)
    start_counter, start_t = dev.counter_joules, clocks.wall
    for step in range(50):
        clocks.advance(0.1 + 0.013 * (step % 3))
        dev.counter_joules += 7.5 + step
        meter.sample_once()
    assert len(got) == 50
    assert got[0].t0_s == start_t
    for a, b in zip(got, got[1:]):
        assert b.t0_s == a.t1_s  # no gap, no overlap
    assert all(iv.t1_s > iv.t0_s and iv.energy_joules >= 0 for iv in got)
    assert sum(iv.energy_joules for iv in got) == pytest.approx(dev.counter_joules - start_counter)
    assert meter.total_energy_joules("dev0") == pytest.approx(dev.counter_joules - start_counter)
    assert all(iv.source == "counter" and iv.method == "simulated" and iv.scope == "gpu" for iv in got)


def test_failed_counter_read_falls_back_to_power_and_rebaselines(caplog):
    dev = ScriptedDevice(power_watts=200.0)
    meter, clocks, got = make_meter(dev)
    clocks.advance(0.1)
    dev.counter_joules += 10.0
    meter.sample_once()
    dev.fail_counter = True
    for _ in range(3):
        clocks.advance(0.1)
        dev.counter_joules += 99.0  # moves, but cannot be read
        meter.sample_once()
    dev.fail_counter = False
    clocks.advance(0.1)
    dev.counter_joules += 50.0  # read again, but the baseline is gone: still power x dt
    meter.sample_once()
    clocks.advance(0.1)
    dev.counter_joules += 12.0
    meter.sample_once()
    assert [iv.source for iv in got] == ["counter", "power", "power", "power", "power", "counter"]
    assert [iv.energy_joules for iv in got] == pytest.approx([10.0, 20.0, 20.0, 20.0, 20.0, 12.0])
    assert meter.reading("dev0").fallback_intervals == 4
    assert sum("logged once" in r.getMessage() for r in caplog.records) == 1


def test_counter_going_backwards_uses_power_and_when_power_fails_the_last_power():
    dev = ScriptedDevice(power_watts=300.0)
    meter, clocks, got = make_meter(dev)
    clocks.advance(0.5)
    dev.counter_joules += 40.0  # 80 W average
    meter.sample_once()
    dev.counter_joules = 3.0  # driver reload reset the counter
    dev.fail_power = True
    clocks.advance(0.5)
    meter.sample_once()
    assert got[1].source == "power"
    assert got[1].energy_joules == pytest.approx(80.0 * 0.5)
    clocks.advance(0.5)
    dev.counter_joules += 5.0
    meter.sample_once()
    assert got[2].source == "counter" and got[2].energy_joules == pytest.approx(5.0)


def test_wall_clock_stepping_back_never_gives_an_empty_or_negative_interval():
    dev = ScriptedDevice()
    meter, clocks, got = make_meter(dev)
    clocks.advance(0.1)
    dev.counter_joules += 1.0
    meter.sample_once()
    clocks.wall -= 5.0  # NTP step backwards
    clocks.mono += 0.1
    dev.counter_joules += 2.0
    meter.sample_once()
    assert len(got) == 1
    clocks.advance(5.2)
    dev.counter_joules += 3.0
    meter.sample_once()
    assert len(got) == 2 and got[1].t0_s == got[0].t1_s and got[1].t1_s > got[1].t0_s
    assert got[1].energy_joules == pytest.approx(5.0)  # the folded tick's joules are not lost


def test_several_devices_each_tile_their_own_time():
    a, b = ScriptedDevice("a"), ScriptedDevice("b")
    meter, clocks, got = make_meter(a, b)
    for _ in range(5):
        clocks.advance(0.1)
        a.counter_joules += 1.0
        b.counter_joules += 3.0
        meter.sample_once()
    assert meter.total_energy_joules("a") == pytest.approx(5.0)
    assert meter.total_energy_joules("b") == pytest.approx(15.0)
    assert meter.last_power_watts("b") == pytest.approx(30.0)


def test_a_failing_callback_does_not_stop_the_others():
    dev = ScriptedDevice()
    meter, clocks, got = make_meter(dev)

    def broken(_interval):
        raise RuntimeError("consumer bug")

    meter.remove_callback(got.append)
    meter.add_callback(broken)
    meter.add_callback(got.append)
    for _ in range(3):
        clocks.advance(0.1)
        dev.counter_joules += 1.0
        meter.sample_once()
    assert len(got) == 3


def test_thread_samples_at_the_configured_rate_and_conserves_the_counter():
    dev = ScriptedDevice()
    meter = DeviceMeter([dev], 0.05)
    got: list[EnergyInterval] = []
    meter.add_callback(got.append)
    baseline_counter = dev.counter_joules
    meter.start()
    stop_moving = threading.Event()

    def move():  # a device drawing ~1 kW in 1 J steps
        while not stop_moving.is_set():
            dev.counter_joules += 1.0
            time.sleep(0.001)

    mover = threading.Thread(target=move)
    mover.start()
    time.sleep(0.32)
    stop_moving.set()
    mover.join()
    meter.stop()
    assert not meter.running
    # 0.32 s at 0.05 s: about 6 ticks plus the final flush (a loaded machine may drop some)
    assert 3 <= len(got) <= 9
    for a, b in zip(got, got[1:]):
        assert b.t0_s == a.t1_s
    assert sum(iv.energy_joules for iv in got) == pytest.approx(dev.counter_joules - baseline_counter)
    assert meter.total_energy_joules("dev0") == pytest.approx(dev.counter_joules - baseline_counter)


def test_stop_emits_the_final_partial_interval():
    dev = ScriptedDevice()
    meter = DeviceMeter([dev], 30.0)  # no regular tick can happen during the test
    got: list[EnergyInterval] = []
    meter.add_callback(got.append)
    t_start = time.time()
    meter.start()
    dev.counter_joules += 500.0
    meter.stop()
    assert len(got) == 1
    assert got[0].energy_joules == pytest.approx(500.0)
    assert t_start <= got[0].t0_s < got[0].t1_s <= time.time()
    meter.stop()  # stopping twice is harmless and emits nothing more
    assert len(got) == 1


def test_readers_do_not_wait_for_a_hanging_device_read():
    dev = ScriptedDevice()
    release = threading.Event()
    original = dev.energy_joules

    def slow_counter() -> float:
        if not release.is_set() and dev.reads > 0:
            release.wait(2.0)
        return original()

    meter = DeviceMeter([dev], 0.01)
    meter.baseline()
    dev.energy_joules = slow_counter  # type: ignore[method-assign]
    sampler = threading.Thread(target=meter.sample_once)
    sampler.start()
    time.sleep(0.05)  # the sampler is now stuck inside the device read
    t0 = time.perf_counter()
    meter.total_energy_joules("dev0")
    meter.reading("dev0")
    elapsed = time.perf_counter() - t0
    release.set()
    sampler.join()
    assert elapsed < 0.05


def test_meter_on_the_cpu_estimate_device_counts_up():
    cpu = CpuEstimate(node="n0")
    meter = DeviceMeter([cpu], 0.02)
    got: list[EnergyInterval] = []
    meter.add_callback(got.append)
    meter.start()
    time.sleep(0.15)
    meter.stop()
    assert got and all(iv.method == "cpu-estimate" and iv.scope == "cpu" for iv in got)
    duration = got[-1].t1_s - got[0].t0_s
    total = sum(iv.energy_joules for iv in got)
    # the estimate lies between 10% and 100% of the model's maximum CPU power
    assert 0.1 * cpu.power_model.max_cpu_watts * duration * 0.9 <= total <= cpu.power_model.max_cpu_watts * duration * 1.1


def test_sample_now_splits_an_interval_and_keeps_the_tiling_and_the_sum():
    """A request's end reads the counter out of turn: the tick's interval is split in two, nothing lost."""
    dev, other = ScriptedDevice("dev0"), ScriptedDevice("dev1")
    meter, clocks, got = make_meter(dev, other)
    start_counter, start_t = dev.counter_joules, clocks.wall
    clocks.advance(0.1)
    dev.counter_joules += 10.0
    meter.sample_once()
    clocks.advance(0.03)
    dev.counter_joules += 3.0
    out = meter.sample_now(["dev0", "not-here"])
    assert [(iv.device_id, iv.energy_joules) for iv in out] == [("dev0", pytest.approx(3.0))]
    assert out[0].t1_s == clocks.wall and meter.reading("dev0").covered_until_s == clocks.wall
    assert meter.reading("dev1").covered_until_s < clocks.wall  # only the devices asked for are read
    assert meter.last_power_watts("dev0") == pytest.approx(100.0)  # a 30 ms sliver does not set the power
    clocks.advance(0.07)
    dev.counter_joules += 7.0
    meter.sample_once()
    mine = [iv for iv in got if iv.device_id == "dev0"]
    assert [iv.t0_s for iv in mine] == [start_t] + [iv.t1_s for iv in mine[:-1]]  # no gap, no overlap
    assert sum(iv.energy_joules for iv in mine) == pytest.approx(dev.counter_joules - start_counter)

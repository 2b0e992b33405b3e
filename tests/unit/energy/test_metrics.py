"""Prometheus metrics: DESIGN.md names and labels, values from observe_request, scrape-time device gauges."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from scheduler.devices.base import DeviceSnapshot
from scheduler.energy.metrics import WattlaneMetrics


def samples(m: WattlaneMetrics) -> dict[tuple[str, frozenset], float]:
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return (name, frozenset(labels.items()))


def test_observe_request_feeds_every_request_series() -> None:
    m = WattlaneMetrics()
    m.observe_request(model="small", status="ok", prompt_tokens=10, completion_tokens=30, ttft_seconds=0.2,
                      tpot_seconds=0.03, joules=12.0, dynamic_joules=9.0, idle_joules=3.0, gco2e=0.5)
    m.observe_request(model="small", status="ok", prompt_tokens=5, completion_tokens=5, ttft_seconds=0.1,
                      tpot_seconds=0.01, joules=4.0, dynamic_joules=4.0, idle_joules=0.0, gco2e=0.25)
    m.observe_request(model="small", status="error")
    s = samples(m)
    assert s[key("wattlane_requests_total", model="small", status="ok")] == 2
    assert s[key("wattlane_requests_total", model="small", status="error")] == 1
    assert s[key("wattlane_tokens_total", model="small", kind="prompt")] == 15
    assert s[key("wattlane_tokens_total", model="small", kind="completion")] == 35
    assert s[key("wattlane_energy_joules_total", model="small", part="dynamic")] == 13.0
    assert s[key("wattlane_energy_joules_total", model="small", part="idle")] == 3.0
    assert s[key("wattlane_carbon_grams_total", model="small")] == 0.75
    # the error request had no energy: it is not in the histogram as a zero
    assert s[key("wattlane_request_energy_joules_count", model="small")] == 2
    assert s[key("wattlane_request_energy_joules_sum", model="small")] == 16.0
    assert s[key("wattlane_request_energy_joules_bucket", model="small", le="5.0")] == 1
    assert s[key("wattlane_request_ttft_seconds_count", model="small")] == 2
    assert s[key("wattlane_request_tpot_seconds_bucket", model="small", le="0.01")] == 1


def test_queue_power_and_intensity_series() -> None:
    m = WattlaneMetrics()
    m.set_replica_queue(model="small", replica="r0", running=3, waiting=7)
    m.power_action(device="gpu0", action="set_power_limit")
    m.power_action(device="gpu0", action="set_power_limit")
    m.set_grid_intensity(region="FRA", gco2e_per_kwh=56.0)
    s = samples(m)
    assert s[key("wattlane_num_requests_running", model="small", replica="r0")] == 3
    assert s[key("wattlane_num_requests_waiting", model="small", replica="r0")] == 7
    assert s[key("wattlane_power_actions_total", device="gpu0", action="set_power_limit")] == 2
    assert s[key("wattlane_grid_intensity_gco2e_per_kwh", region="FRA")] == 56.0
    m.remove_replica(model="small", replica="r0")
    assert key("wattlane_num_requests_running", model="small", replica="r0") not in samples(m)


def test_device_gauges_are_read_at_scrape_time() -> None:
    m = WattlaneMetrics()
    power = [100.0]
    snap = DeviceSnapshot(device_id="gpu0", node="n0", kind="nvidia-gpu", name="H100", energy_method="nvml-counter",
                          energy_scope="gpu", power_watts=100.0, energy_joules=5000.0, power_limit_watts=300.0, sm_clock_mhz=1410.0)

    def source():
        snap.power_watts = power[0]
        return [snap, {"device_id": "cpu0", "node": "n0", "kind": "cpu", "power_watts": 20.0, "energy_joules": 7.5}]

    m.set_device_source(source)
    s = samples(m)
    lab = dict(device="gpu0", node="n0", kind="nvidia-gpu")
    assert s[key("wattlane_device_power_watts", **lab)] == 100.0
    assert s[key("wattlane_device_energy_joules_total", **lab)] == 5000.0
    assert s[key("wattlane_device_power_limit_watts", **lab)] == 300.0
    assert s[key("wattlane_device_sm_clock_mhz", **lab)] == 1410.0
    cpu = dict(device="cpu0", node="n0", kind="cpu")
    assert s[key("wattlane_device_power_watts", **cpu)] == 20.0
    assert key("wattlane_device_power_limit_watts", **cpu) not in s  # unknown stays absent
    power[0] = 250.0
    assert samples(m)[key("wattlane_device_power_watts", **lab)] == 250.0


def test_failing_device_source_does_not_break_the_scrape() -> None:
    m = WattlaneMetrics()
    m.observe_request(model="x", status="ok")

    def broken():
        raise RuntimeError("node agent gone")

    m.set_device_source(broken)
    s = samples(m)
    assert s[key("wattlane_requests_total", model="x", status="ok")] == 1


def test_own_registry_and_two_instances_do_not_clash() -> None:
    a, b = WattlaneMetrics(), WattlaneMetrics()
    a.observe_request(model="x", status="ok")
    assert key("wattlane_requests_total", model="x", status="ok") not in samples(b)
    assert REGISTRY.get_sample_value("wattlane_requests_total", {"model": "x", "status": "ok"}) is None


@pytest.mark.parametrize(
    "name",
    [
        "wattlane_request_energy_joules histogram", "wattlane_energy_joules_total counter",
        "wattlane_carbon_grams_total counter", "wattlane_requests_total counter", "wattlane_tokens_total counter",
        "wattlane_request_ttft_seconds histogram", "wattlane_request_tpot_seconds histogram",
        "wattlane_num_requests_running gauge", "wattlane_num_requests_waiting gauge",
        "wattlane_power_actions_total counter", "wattlane_grid_intensity_gco2e_per_kwh gauge",
        "wattlane_device_power_watts gauge", "wattlane_device_energy_joules_total counter",
        "wattlane_device_power_limit_watts gauge", "wattlane_device_sm_clock_mhz gauge",
    ],
)
def test_every_design_metric_is_declared(name: str) -> None:
    body, _ = WattlaneMetrics().render()
    assert f"# TYPE {name}\n" in body.decode()

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


# one gateway replica, as its own process: counts requests, sees the shared state, and scrapes if asked
_REPLICA = """
import sys
from scheduler.energy.metrics import WattlaneMetrics
requests, budget_ratio, scrape = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "scrape"
m = WattlaneMetrics()
for _ in range(requests):
    m.observe_request(model="small", status="ok", prompt_tokens=10, completion_tokens=5, ttft_seconds=0.2,
                      joules=2.0, dynamic_joules=1.5, idle_joules=0.5, gco2e=0.1)
# every replica reads the same node agents: one device, one power action, one queue, one intensity
m.set_device_source(lambda: [{"device_id": "gpu0", "node": "n0", "kind": "nvidia-gpu", "power_watts": 100.0,
                              "energy_joules": 5000.0}])
m.power_action(device="gpu0", action="set_power_limit")
m.set_replica_queue(model="small", replica="r0", running=1, waiting=2)
m.set_grid_intensity(region="FRA", gco2e_per_kwh=56.0)
m.set_budget_used(scope="team", name="research", kind="energy", used_ratio=budget_ratio)
if scrape:
    sys.stdout.write(m.render()[0].decode())
"""


def _run_replica(tmp_path, *args: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _REPLICA, *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_scrape_of_one_replica_sums_every_replicas_requests_and_shows_shared_state_once(tmp_path) -> None:
    _run_replica(tmp_path, "3", "0.2", "quiet")  # this replica has exited: its requests still count
    body = _run_replica(tmp_path, "2", "0.4", "scrape")
    got: dict[str, list] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            got.setdefault(s.name, []).append(s)

    def only(name: str) -> float:
        assert len(got.get(name, [])) == 1, (name, got.get(name))
        return got[name][0].value

    assert only("wattlane_requests_total") == 5
    assert {s.labels["kind"]: s.value for s in got["wattlane_tokens_total"]} == {"prompt": 50, "completion": 25}
    assert {s.labels["part"]: s.value for s in got["wattlane_energy_joules_total"]} == {"dynamic": 7.5, "idle": 2.5}
    assert only("wattlane_carbon_grams_total") == pytest.approx(0.5)
    assert only("wattlane_request_energy_joules_count") == 5
    assert only("wattlane_request_ttft_seconds_count") == 5
    # what both replicas saw alike appears once, not summed
    assert only("wattlane_device_power_watts") == 100.0
    assert only("wattlane_device_energy_joules_total") == 5000.0
    assert only("wattlane_power_actions_total") == 1
    assert only("wattlane_num_requests_waiting") == 2
    assert only("wattlane_grid_intensity_gco2e_per_kwh") == 56.0
    assert only("wattlane_budget_used_ratio") == 0.4  # the latest reading of the shared budget


def test_multiprocess_folder_is_wiped_only_for_another_cluster(tmp_path) -> None:
    from scheduler.energy.metrics import multiprocess_dir

    path = multiprocess_dir(tmp_path, "head-a")
    (path / "counter_123.db").write_bytes(b"x")
    assert (multiprocess_dir(tmp_path, "head-a") / "counter_123.db").exists()  # a redeploy keeps live files
    assert not (multiprocess_dir(tmp_path, "head-b") / "counter_123.db").exists()  # a new cluster starts at 0


def test_multiprocess_variable_set_after_import_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="imported before"):
        WattlaneMetrics()


def test_the_quality_budgets_shed_counter_follows_its_running_count_and_an_infinite_threshold_is_left_out():
    """QualityBudget.state() carries a running shed count: the counter grows by what is new, not by the count
    each time; a threshold of inf (a target of 1: nothing may go small) is no gauge value."""
    from scheduler.energy.metrics import WattlaneMetrics

    m = WattlaneMetrics()
    m.set_quality_budget({"target": 1.0, "served_mean": None, "threshold": float("inf"), "window": 3, "shed": 2})
    m.set_quality_budget({"target": 1.0, "served_mean": 0.99, "threshold": float("inf"), "window": 4, "shed": 2})
    m.set_quality_budget({"target": 1.0, "served_mean": 0.98, "threshold": float("inf"), "window": 5, "shed": 5})
    text = m.render()[0].decode()
    assert "wattlane_quality_budget_shed_total 5.0" in text
    assert 'wattlane_quality_budget{figure="served_mean"} 0.98' in text
    assert 'wattlane_quality_budget{figure="window"} 5.0' in text
    assert 'figure="threshold"' not in text

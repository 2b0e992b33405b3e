"""GET /metrics as a real Prometheus server sees it: DESIGN.md series, labels and values after scraping."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import start_http_server

from tests.support.prometheus import PrometheusServer, require_prometheus

from scheduler.energy.metrics import WattlaneMetrics


@pytest.fixture
def exporter():
    metrics = WattlaneMetrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    yield metrics, f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_real_prometheus_scrapes_design_series(exporter, tmp_path: Path) -> None:
    binary = require_prometheus()
    metrics, target = exporter
    metrics.observe_request(model="smollm2-135m", status="ok", prompt_tokens=12, completion_tokens=40, ttft_seconds=0.15,
                            tpot_seconds=0.013, joules=21.0, dynamic_joules=18.0, idle_joules=3.0, gco2e=0.0021)
    metrics.observe_request(model="smollm2-135m", status="ok", prompt_tokens=8, completion_tokens=20, ttft_seconds=0.4,
                            tpot_seconds=0.02, joules=9.0, dynamic_joules=9.0, idle_joules=0.0, gco2e=0.0009)
    metrics.observe_request(model="smollm2-135m", status="error")
    metrics.set_replica_queue(model="smollm2-135m", replica="replica-0", running=2, waiting=5)
    metrics.power_action(device="gpu0", action="set_power_limit")
    metrics.set_grid_intensity(region="FRA", gco2e_per_kwh=56.0)
    metrics.set_device_source(lambda: [
        {"device_id": "cpu0", "node": "node0", "kind": "cpu", "power_watts": 18.5, "energy_joules": 1234.0},
        {"device_id": "gpu0", "node": "node0", "kind": "nvidia-gpu", "power_watts": 250.0, "energy_joules": 9.0e5,
         "power_limit_watts": 300.0, "sm_clock_mhz": 1755.0},
    ])

    with PrometheusServer(binary, target=target, work_dir=tmp_path / "prom") as prom:
        prom.wait_for('up{job="wattlane"} == 1')
        prom.wait_for("wattlane_requests_total")
        m = 'model="smollm2-135m"'
        assert prom.value(f'wattlane_requests_total{{{m},status="ok"}}') == 2
        assert prom.value(f'wattlane_requests_total{{{m},status="error"}}') == 1
        assert prom.value(f'wattlane_tokens_total{{{m},kind="prompt"}}') == 20
        assert prom.value(f'wattlane_tokens_total{{{m},kind="completion"}}') == 60
        assert prom.value(f'wattlane_energy_joules_total{{{m},part="dynamic"}}') == 27.0
        assert prom.value(f'wattlane_energy_joules_total{{{m},part="idle"}}') == 3.0
        assert prom.value(f"wattlane_carbon_grams_total{{{m}}}") == pytest.approx(0.003)
        assert prom.value(f"wattlane_request_energy_joules_sum{{{m}}}") == 30.0
        assert prom.value(f"wattlane_request_energy_joules_count{{{m}}}") == 2
        assert prom.value(f'wattlane_request_ttft_seconds_bucket{{{m},le="0.2"}}') == 1
        assert prom.value(f"wattlane_request_tpot_seconds_count{{{m}}}") == 2
        assert prom.value(f'wattlane_num_requests_running{{{m},replica="replica-0"}}') == 2
        assert prom.value(f'wattlane_num_requests_waiting{{{m},replica="replica-0"}}') == 5
        assert prom.value('wattlane_power_actions_total{device="gpu0",action="set_power_limit"}') == 1
        assert prom.value('wattlane_grid_intensity_gco2e_per_kwh{region="FRA"}') == 56.0
        gpu = 'device="gpu0",node="node0",kind="nvidia-gpu"'
        assert prom.value(f"wattlane_device_power_watts{{{gpu}}}") == 250.0
        assert prom.value(f"wattlane_device_energy_joules_total{{{gpu}}}") == 9.0e5
        assert prom.value(f"wattlane_device_power_limit_watts{{{gpu}}}") == 300.0
        assert prom.value(f"wattlane_device_sm_clock_mhz{{{gpu}}}") == 1755.0
        assert prom.value('wattlane_device_power_watts{device="cpu0",kind="cpu"}') == 18.5
        # Prometheus itself agrees the metric types are what DESIGN.md says
        meta = prom._client.get(f"{prom.url}/api/v1/metadata").json()["data"]
        assert meta["wattlane_request_ttft_seconds"][0]["type"] == "histogram"
        assert meta["wattlane_device_power_watts"][0]["type"] == "gauge"

"""A real Prometheus server scrapes the gateway's /metrics: the DESIGN.md series exist with the right values."""

from __future__ import annotations

import httpx
import pytest

from tests.support.prometheus import PrometheusServer, require_prometheus

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_prometheus_scrapes_gateway(server, tmp_path):
    binary = require_prometheus()
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=120,
                   json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200
    target = server.url.removeprefix("http://")
    with PrometheusServer(binary, target=target, work_dir=tmp_path) as prom:
        prom.wait_for('up{job="wattlane"} == 1')
        ok = prom.wait_for('wattlane_requests_total{model="smollm2-135m-instruct",status="ok"} > 0')
        assert ok
        direct = httpx.get(server.url + "/metrics").text
        for name in ("wattlane_request_energy_joules_bucket", "wattlane_energy_joules_total", "wattlane_carbon_grams_total",
                     "wattlane_tokens_total", "wattlane_request_ttft_seconds_bucket", "wattlane_request_tpot_seconds_bucket",
                     "wattlane_device_power_watts", "wattlane_device_energy_joules_total",
                     "wattlane_grid_intensity_gco2e_per_kwh"):
            assert name in direct, name
            assert prom.wait_for(f'count({name.removesuffix("_bucket")}{"_bucket" if name.endswith("_bucket") else ""}) > 0')
        dynamic = prom.value('sum(wattlane_energy_joules_total{part="dynamic"})')
        assert dynamic is not None and dynamic > 0
        power = prom.wait_for('wattlane_device_power_watts{device="cpu0",kind="cpu"} >= 0')
        assert power[0]["metric"]["node"]
        completion = prom.value('sum(wattlane_tokens_total{kind="completion",model="smollm2-135m-instruct"})')
        assert completion is not None and completion >= 1
        queue = prom.wait_for('wattlane_num_requests_waiting{model="smollm2-135m-instruct",replica="smollm2-135m-instruct#0"} >= 0')
        assert queue and prom.wait_for('wattlane_num_requests_running{model="gemma-3-270m"} >= 0')

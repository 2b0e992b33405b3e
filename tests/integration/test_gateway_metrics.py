"""A real Prometheus server scrapes the gateway's /metrics: after known requests its figures equal the gateway's and the ledger's."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.prometheus import PrometheusServer, require_prometheus

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
REQUESTS = 3


def gateway_samples(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample the gateway's /metrics shows now, keyed by (name, labels)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def wait_equal(read, expected: float, timeout_seconds: float = 30.0, rel: float = 1e-9) -> float:
    """Poll read() until it equals expected (counters may lag one scrape); return the last value."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        got = read()
        if got is not None and got == pytest.approx(expected, rel=rel, abs=1e-9):
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def test_prometheus_scrapes_what_the_gateway_and_ledger_hold(server, tmp_path):
    binary = require_prometheus()
    before = gateway_samples(server.url)
    usages, nodes = [], set()
    for word in ("one", "two", "three")[:REQUESTS]:
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=120,
                       json={"model": MODEL, "messages": [{"role": "user", "content": f"Say {word}."}], "max_tokens": 6})
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
        nodes.add(r.json()["routing"]["node"])
    after = gateway_samples(server.url)

    # the gateway counted exactly the requests, tokens and energy it answered with
    ok = dict(model=MODEL, status="ok")
    assert sample(after, "wattlane_requests_total", **ok) - sample(before, "wattlane_requests_total", **ok) == REQUESTS
    for kind in ("prompt", "completion"):
        delta = sample(after, "wattlane_tokens_total", model=MODEL, kind=kind) - sample(before, "wattlane_tokens_total", model=MODEL, kind=kind)
        assert delta == sum(u[f"{kind}_tokens"] for u in usages), kind
    energy_delta = sample(after, "wattlane_energy_joules_total", model=MODEL) - sample(before, "wattlane_energy_joules_total", model=MODEL)
    answered_joules = sum(u["energy"]["joules"] for u in usages)
    assert answered_joules > 0
    assert energy_delta == pytest.approx(answered_joules, rel=1e-3)
    assert (sample(after, "wattlane_request_energy_joules_count", model=MODEL)
            - sample(before, "wattlane_request_energy_joules_count", model=MODEL)) == REQUESTS

    # the ledger's totals for the model (every request of this server so far) are the counters' totals
    ledger = httpx.get(server.url + "/v1/energy/summary", params={"group_by": "model", "model": MODEL},
                       headers=server.headers("reader"), timeout=30).json()["data"]
    (row,) = ledger
    assert row["requests"] == sample(after, "wattlane_requests_total", model=MODEL)
    assert row["joules"] == pytest.approx(sample(after, "wattlane_energy_joules_total", model=MODEL), rel=1e-6)
    assert row["completion_tokens"] == sample(after, "wattlane_tokens_total", model=MODEL, kind="completion")

    target = server.url.removeprefix("http://")
    with PrometheusServer(binary, target=target, work_dir=tmp_path) as prom:
        prom.wait_for('up{job="wattlane"} == 1')
        # what Prometheus stored is what the gateway exposes and the ledger holds
        requests = wait_equal(lambda: prom.value(f'sum(wattlane_requests_total{{model="{MODEL}"}})'), row["requests"])
        assert requests == row["requests"]
        joules = wait_equal(lambda: prom.value(f'sum(wattlane_energy_joules_total{{model="{MODEL}"}})'), row["joules"], rel=1e-6)
        assert joules == pytest.approx(row["joules"], rel=1e-6)
        completion = prom.value(f'sum(wattlane_tokens_total{{model="{MODEL}",kind="completion"}})')
        assert completion == row["completion_tokens"]
        assert prom.value(f'sum(wattlane_request_energy_joules_count{{model="{MODEL}"}})') == sample(
            after, "wattlane_request_energy_joules_count", model=MODEL)
        # nothing is left running or queued once every request has been answered
        replica = f'model="{MODEL}",replica="{MODEL}#0"'
        assert wait_equal(lambda: prom.value(f"wattlane_num_requests_running{{{replica}}}"), 0) == 0
        assert wait_equal(lambda: prom.value(f"wattlane_num_requests_waiting{{{replica}}}"), 0) == 0
        # the CPU that served them draws power, on the node the responses named, and has used at
        # least the energy the ledger attributes to requests on it
        (cpu,) = prom.wait_for('wattlane_device_power_watts{device="cpu0",kind="cpu"}')
        assert cpu["metric"]["node"] in nodes and float(cpu["value"][1]) > 0
        attributed = httpx.get(server.url + "/v1/energy/summary", params={"group_by": "device", "device": "cpu0"},
                               headers=server.headers("reader"), timeout=30).json()["data"][0]["joules"]
        device_joules = prom.value('wattlane_device_energy_joules_total{device="cpu0",kind="cpu"}')
        assert device_joules is not None and device_joules >= attributed > 0

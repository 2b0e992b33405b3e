"""Conservation against the device's own counter: what 8 concurrent responses and the idle pool add up to
equals the energy counter's delta over the same window, read from the devices and not from the attributor."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.support.energy_books import counters_and_books

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT = "smollm2-135m-instruct"
CONCURRENCY = 8


def test_responses_plus_idle_pool_match_the_device_counter_at_8_concurrent_requests(server):
    agent = server.agent()
    time.sleep(1.5)  # let earlier tests' intervals settle
    counter_before, balance_before, devices_before = counters_and_books(agent)

    barrier = threading.Barrier(CONCURRENCY)
    spans: list[tuple[float, float]] = []

    def send(i: int) -> dict:
        body = {"model": CHAT, "messages": [{"role": "user", "content": f"Write two sentences about the number {i}."}],
                "max_tokens": 24, "temperature": 0}
        barrier.wait()
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), json=body, timeout=180)
        spans.append((t0, time.monotonic()))
        assert r.status_code == 200, r.text
        return r.json()

    with concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        bodies = list(pool.map(send, range(CONCURRENCY)))
    # truly concurrent: every request was sent before any answer came back
    assert max(s for s, _ in spans) < min(e for _, e in spans)

    time.sleep(1.0)  # the last intervals settle (what has not is counted as unsettled below)
    counter_after, balance_after, devices_after = counters_and_books(agent)
    assert devices_after == devices_before

    responses_joules = sum(b["usage"]["energy"]["joules"] for b in bodies)
    assert all(b["usage"]["energy"]["joules"] > 0 for b in bodies)
    pools = sum(balance_after[k] - balance_before[k] for k in ("idle_pool_joules", "unsettled_joules"))
    counter_joules = counter_after - counter_before
    assert counter_joules > 0
    metered = balance_after["metered_joules"] - balance_before["metered_joules"]
    assert abs(responses_joules + pools - counter_joules) <= 0.01 * counter_joules, (responses_joules, pools, counter_joules, metered)

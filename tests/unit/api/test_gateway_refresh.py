"""The gateway's once-a-second refresh of its node agents' views must not hold up requests: the lookups
of the agents are blocking calls to Ray's GCS, which on a busy machine take milliseconds or more."""

from __future__ import annotations

import asyncio
import time

from scheduler.api.gateway import Gateway
from scheduler.cluster import runtime

#: how long the stand-in GCS takes to list the nodes
SLOW_GCS_SECONDS = 0.3


class RefreshOnly(Gateway):
    """The real Gateway's refresh, on an object built without Ray or models."""

    def __del__(self) -> None:  # Serve's shutdown hook closes what __init__ opened; nothing was
        pass


def test_a_slow_gcs_lookup_does_not_block_the_gateways_event_loop(monkeypatch) -> None:
    def slow_cluster_nodes() -> list:
        time.sleep(SLOW_GCS_SECONDS)  # what a blocking GCS call does to the thread it runs on
        return []

    monkeypatch.setattr(runtime, "cluster_nodes", slow_cluster_nodes)
    gateway = object.__new__(RefreshOnly)
    gateway.device_snapshots, gateway.replica_stats, gateway._startups_recorded = [], {}, set()

    async def refresh_while_serving() -> tuple[int, float]:
        ticks, longest_gap_s = 0, 0.0

        async def other_requests() -> None:  # stands in for requests in flight: each needs the loop briefly
            nonlocal ticks, longest_gap_s
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                ticks, longest_gap_s = ticks + 1, max(longest_gap_s, now - last)
                last = now

        serving = asyncio.create_task(other_requests())
        await asyncio.sleep(0.02)
        assert await gateway.refresh_devices() == []
        serving.cancel()
        return ticks, longest_gap_s

    ticks, longest_gap_s = asyncio.run(refresh_while_serving())
    assert longest_gap_s < SLOW_GCS_SECONDS / 3, f"the event loop stalled {longest_gap_s * 1000:.0f} ms"
    assert ticks >= 20

"""Limits per key and per team: requests and tokens per minute, concurrent requests; 429 naming the limit, with Retry-After.

The real TeamGuard on a real SQLite file; only routing is a stand-in (a decision with token counts).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from scheduler.api.errors import ApiError
from scheduler.config import RateLimitsConfig
from scheduler.teams.guard import TeamGuard
from scheduler.teams.quotas import Quota, Subject
from scheduler.teams.store import TeamsStore
from tests.support.teams_replica import routed


def key(name: str, **limits) -> Subject:
    return Subject(f"key:{name}", f"key '{name}'", RateLimitsConfig(**limits), ())


def team(name: str, **limits) -> Subject:
    return Subject(f"team:{name}", f"team '{name}'", RateLimitsConfig(**limits), ())


async def admit(guard: TeamGuard, *subjects: Subject) -> SimpleNamespace:
    job = SimpleNamespace(request_id="r", quota=Quota(tuple(subjects)), admission=None)
    await guard.admit(job, lambda _: routed(1.0))  # 10 prompt + 20 max_tokens = 30 tokens
    return job


async def refused(guard: TeamGuard, *subjects: Subject) -> ApiError:
    with pytest.raises(ApiError) as exc:
        await admit(guard, *subjects)
    e = exc.value
    assert e.status == 429 and e.type == "rate_limit_error"
    assert e.body()["error"]["message"] == e.message and e.code
    return e


def test_requests_per_minute(tmp_path):
    async def main():
        guard = TeamGuard(TeamsStore(tmp_path))
        k = key("bot", requests_per_minute=3)
        for _ in range(3):
            job = await admit(guard, k)
            await job.admission.settle(1.0, 0.0, 30)
        e = await refused(guard, k)
        assert "key 'bot'" in e.message and "requests_per_minute=3" in e.message
        assert 55 <= int(e.headers["Retry-After"]) <= 60  # when the first of the three leaves the minute
        assert e.code == "rate_limit_exceeded"
    asyncio.run(main())


def test_tokens_per_minute_count_max_tokens_while_running_then_real_tokens(tmp_path):
    async def main():
        guard = TeamGuard(TeamsStore(tmp_path))
        k = key("bot", tokens_per_minute=100)
        jobs = [await admit(guard, k) for _ in range(3)]  # 3 x 30 reserved
        e = await refused(guard, k)
        assert "tokens_per_minute=100" in e.message and int(e.headers["Retry-After"]) >= 1
        for job in jobs:  # each used 5 tokens in the end: 15 of 100
            await job.admission.settle(1.0, 0.0, 5)
        await admit(guard, k)
        with pytest.raises(ApiError) as exc:  # one request larger than the whole limit says so
            job = SimpleNamespace(request_id="big", quota=Quota((key("tiny", tokens_per_minute=10),)), admission=None)
            await guard.admit(job, lambda _: routed(1.0))
        assert "lower max_tokens" in exc.value.message
    asyncio.run(main())


def test_concurrent_requests(tmp_path):
    async def main():
        guard = TeamGuard(TeamsStore(tmp_path))
        k = key("bot", concurrent_requests=2)
        first, _ = await admit(guard, k), await admit(guard, k)
        e = await refused(guard, k)
        assert "concurrent_requests=2" in e.message and e.headers["Retry-After"] == "1"
        await first.admission.settle(1.0, 0.0, 30)
        await admit(guard, k)
        await refused(guard, k)
    asyncio.run(main())


def test_a_released_request_frees_its_place(tmp_path):
    async def main():
        guard = TeamGuard(TeamsStore(tmp_path))
        k = key("bot", concurrent_requests=1)
        job = await admit(guard, k)
        job.admission.release()
        for _ in range(100):
            try:
                return await admit(guard, k)
            except ApiError:
                await asyncio.sleep(0.01)
        raise AssertionError("the released reservation was never freed")
    asyncio.run(main())


def test_a_team_limit_counts_every_key_of_the_team_on_every_replica(tmp_path):
    async def main():
        replica_a, replica_b = TeamGuard(TeamsStore(tmp_path), holder="a"), TeamGuard(TeamsStore(tmp_path), holder="b")
        t = team("search", requests_per_minute=2)
        await admit(replica_a, key("alice"), t)
        await admit(replica_b, key("bob"), t)
        e = await refused(replica_a, key("alice"), t)
        assert "team 'search'" in e.message and "requests_per_minute=2" in e.message
        await admit(replica_b, key("carol"))  # a key outside the team is not limited by it
    asyncio.run(main())

"""Wattlane in front of real OpenAI-compatible servers: `wattlane serve` (real Ray) fronting llama-cpp-python's
own server on the installed GGUF models, reached with the official `openai` client.

One Wattlane and three upstream servers for the module (two serving SmolLM2, one Gemma): `auto`
routing, streaming and not, responses that name the endpoint's model, node and device and carry the
CPU's estimated energy shared among the upstream's requests; a client that leaves a stream on a
server whose host has no Wattlane agent, charged the joules-per-token estimate of its work; then a
crash of one SmolLM2 server under a bounded load (it is ejected, traffic goes on, every request
completes or gets a clear error, the ledger has every completed one) and its restart (it is re-admitted).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from tests.support.llama_server import GEMMA_ID, SMOL_ID, LlamaServer, model_file
from tests.support.served import served

pytestmark = pytest.mark.slow

SMOL, GEMMA = "smol-up", "gemma-up"
#: the Gemma server again, declared on a host where no Wattlane agent runs: its energy is an estimate
FAR, FAR_HOST = "gemma-far", "gpu-host-without-agent"


def wattlane_config(smol: list[LlamaServer], gemma: LlamaServer) -> dict[str, Any]:
    def endpoint(s: LlamaServer) -> dict[str, Any]:
        # generic: llama-cpp-python's server publishes no load metrics (llama.cpp's own server does)
        return {"base_url": s.base_url, "served_model_name": s.alias, "devices": ["cpu0"],
                "server": "generic"}

    # health checked often so the test is short; a generous timeout, the machine is shared and slow
    fast_health = {"health_check_period_seconds": 0.5, "health_check_timeout_seconds": 5.0,
                   "ejection_base_seconds": 1.0, "ejection_max_seconds": 4.0, "read_timeout_seconds": 30.0}
    return {
        "models": [
            # 4 at a time per endpoint: the load below (8 at a time) keeps both endpoints busy
            {"id": SMOL, "kind": "chat", "engine": "openai", "params_b": 0.135, "quality": 0.5,
             "max_ongoing_requests": 4, "endpoints": [endpoint(s) for s in smol], "upstream": fast_health},
            {"id": GEMMA, "kind": "completion", "engine": "openai", "params_b": 0.27, "quality": 0.9,
             "max_ongoing_requests": 8, "endpoints": [endpoint(gemma)], "upstream": fast_health},
            # larger than Gemma: `auto` never picks it before Gemma (smallest adequate model first)
            {"id": FAR, "kind": "completion", "engine": "openai", "params_b": 8.0, "quality": 0.9,
             "endpoints": [{**endpoint(gemma), "node": FAR_HOST}], "upstream": fast_health},
        ],
        "devices": {"nvml": False, "cpu": True},
        "energy": {"carbon": {"provider": "fixed", "intensity_gco2e_per_kwh": 400.0, "region": "FRA"}},
        "routing": {"default_min_quality": 0.0, "replica_timeout_seconds": 60.0},
    }


def explain(url: str) -> str:
    """The gateway's routing decision for a small-model completion, with every replica's reason, as text."""
    r = httpx.post(url + "/v1/route/explain", json={"model": SMOL, "prompt": "Hi", "max_tokens": 1}, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


def wait_for(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("upstream")
    smol_path, gemma_path = model_file(SMOL_ID, work / "models"), model_file(GEMMA_ID, work / "models")
    servers = [LlamaServer(smol_path, "smol", work / "smol-a.log"), LlamaServer(smol_path, "smol", work / "smol-b.log"),
               LlamaServer(gemma_path, "gemma", work / "gemma.log")]
    try:
        for s in servers:
            s.start()
        with served(wattlane_config(servers[:2], servers[2]), work, log_path=work / "wattlane.log") as wl:
            yield wl, servers
    finally:
        for s in servers:
            s.stop()


def test_auto_routes_to_upstream_servers_streaming_and_not(stack):
    wl, servers = stack
    client = openai.OpenAI(base_url=wl.url + "/v1", api_key="none", max_retries=0, timeout=120)
    host = socket.gethostname()

    chat = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0)
    body = chat.parse()
    assert body.choices[0].message.content
    extra = body.model_extra
    assert extra["routing"]["model"] == SMOL and extra["routing"]["node"] == host
    assert extra["routing"]["device"] == "cpu0" and chat.headers["x-wattlane-device"] == "cpu0"
    energy = body.usage.model_extra["energy"]
    # the host's CPU, estimated (no RAPL here), shared among the upstream's requests by the node agent
    assert energy["method"] in ("cpu-estimate", "rapl") and energy["joules"] > 0 and energy["device"] == "cpu0"
    assert body.usage.completion_tokens >= 1 and body.usage.prompt_tokens >= 1
    # llama-cpp-python's server streams no usage (0.3.x): the counts are estimates, and the answer says so
    methods = (body.usage.prompt_tokens_method, body.usage.completion_tokens_method)
    assert methods in (("server", "server"), ("utf8-bytes-estimate", "stream-chunk-estimate")), methods

    # completions, streamed: min_quality 1.0 leaves only the larger model (Gemma's server) adequate
    stream = client.completions.create(model="auto", prompt="The capital of France is", max_tokens=6, stream=True,
                                       temperature=0,
                                       stream_options={"include_usage": True}, extra_body={"min_quality": 1.0})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2  # token by token
    last = chunks[-1]
    assert last.model_extra["routing"]["model"] == GEMMA
    assert last.usage.model_extra["energy"]["method"] in ("cpu-estimate", "rapl")
    assert last.usage.completion_tokens >= 1

    # a request over the server's context is the client's error, in the envelope, not a 5xx
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=GEMMA, prompt="word " * 3000, max_tokens=4)
    assert exc.value.status_code == 400 and exc.value.body["code"]


def test_a_client_that_leaves_a_server_no_agent_meters_is_charged_the_estimate_of_its_work(stack):
    wl, _ = stack
    rid = "far-abandoned-1"
    body = {"model": FAR, "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    texts = 0
    with httpx.stream("POST", wl.url + "/v1/completions", json=body, headers={"X-Request-Id": rid},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                texts += 1
            if texts == 3:
                break  # the client leaves: the connection closes with this block
    assert texts == 3

    def row() -> dict[str, Any] | None:
        data = httpx.get(wl.url + "/v1/energy/requests", params={"id": rid}, timeout=30).json()["data"]
        return data[0] if data else None

    assert wait_for(lambda: row() is not None), "the abandoned request has no ledger row"
    r = row()
    assert r["status"] == "cancelled" and r["node"] == FAR_HOST and r["completion_tokens"] >= 3
    # no agent on the server's host: the replica's own node agent kept the estimate for the gateway
    assert r["energy_method"] == "upstream-jpt-estimate" and r["joules"] > 0, r
    # cut off before the server's usage report: the counts are the estimates, named so; the server is on a CPU
    assert (r["prompt_tokens_method"], r["completion_tokens_method"]) == ("utf8-bytes-estimate",
                                                                          "stream-chunk-estimate"), r
    assert r["energy_scope"] == "cpu", r


def test_a_crashed_endpoint_is_ejected_traffic_continues_and_it_is_readmitted(stack):
    wl, servers = stack
    a, b = servers[0], servers[1]
    n_requests, concurrency = 200, 8
    outcomes: dict[str, Any] = {}

    async def load() -> None:
        client = openai.AsyncOpenAI(base_url=wl.url + "/v1", api_key="none", max_retries=0, timeout=120)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n_requests):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                if i == 40:
                    b.kill()  # one upstream dies mid-load
                try:
                    r = await client.completions.with_raw_response.create(model=SMOL, prompt="Hi", max_tokens=2)
                    outcomes[f"{i}"] = ("ok", r.headers["x-request-id"])
                except openai.APIStatusError as exc:
                    outcomes[f"{i}"] = (exc.status_code, exc.body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()

    asyncio.run(load())
    assert len(outcomes) == n_requests
    errors = [v for v in outcomes.values() if v[0] != "ok"]
    # a request that failed before its first token was retried on the other endpoint; an error is clear
    for status, body in errors:
        assert status == 503 and body["message"], body
    assert len(errors) <= 8, errors  # at most the requests in flight on the crashed server
    ok_ids = [v[1] for v in outcomes.values() if v[0] == "ok"]
    assert len(ok_ids) >= n_requests - 8

    rows = httpx.get(wl.url + "/v1/energy/requests", params={"limit": 5000}, timeout=30).json()["data"]
    ledger_ok = {r["request_id"] for r in rows if r["status"] == "ok"}
    assert set(ok_ids) <= ledger_ok

    assert b.requests_served() > 0  # the crashed endpoint was taking its share before it died
    # ejected: the last requests all went to the live server, none failed
    tail = [outcomes[f"{i}"] for i in range(n_requests - 40, n_requests)]
    assert all(v[0] == "ok" for v in tail)

    # the gateway's routing sees the crashed endpoint ejected
    assert wait_for(lambda: "endpoint ejected" in explain(wl.url)), "the crashed endpoint was never shown ejected"

    # restart it on its port: its health checks re-admit it. Then the other one dies: every request
    # still succeeds, so the restarted endpoint takes traffic (an ejected one would fail at once)
    b.start()
    assert wait_for(lambda: "endpoint ejected" not in explain(wl.url), 60), "the restarted endpoint was not re-admitted"
    before = b.requests_served()
    a.kill()
    client = openai.OpenAI(base_url=wl.url + "/v1", api_key="none", max_retries=0, timeout=60)
    for _ in range(6):
        assert client.completions.create(model=SMOL, prompt="Hi", max_tokens=1).choices[0].text is not None
    assert b.requests_served() >= before + 6

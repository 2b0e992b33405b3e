"""A non-streaming answer says where its time went (Server-Timing), stage by stage, and the stages fit
inside one another as the request passed them."""

from __future__ import annotations

from benchmarks.gateway_overhead import parse_server_timing as stages
from tests.support.gateway_app import bearer

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


def test_a_chat_answer_times_its_stages_in_milliseconds(client):
    r = client.post("/v1/chat/completions", json=CHAT, headers=bearer("client"))
    assert r.status_code == 200, r.text
    ms = stages(r.headers["server-timing"])
    assert list(ms) == ["route", "replica", "engine", "energy", "accounting", "total"]
    assert all(v >= 0 for v in ms.values()), ms
    # the replica's own stages happen within the gateway's wait for it, and everything within the total
    assert ms["engine"] + ms["energy"] <= ms["replica"], ms
    assert ms["route"] + ms["replica"] + ms["accounting"] <= ms["total"], ms
    assert ms["engine"] > 0 and ms["accounting"] > 0, ms


def test_a_completion_answer_has_them_too_and_a_stream_does_not(client):
    r = client.post("/v1/completions", json={"model": "auto", "prompt": "Once", "max_tokens": 2},
                    headers=bearer("client"))
    assert r.status_code == 200, r.text
    assert "energy" in stages(r.headers["server-timing"])
    # a stream's headers leave before any of the work: its stages are unknown then
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer("client")) as s:
        assert s.status_code == 200
        assert "server-timing" not in s.headers
        s.read()

"""model "auto" on the embedded default: the predictor chooses between the two local models and says why."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL, LARGE = "smollm2-135m-instruct", "gemma-3-270m"


def complete(server, role="client", **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", headers=server.headers(role), timeout=120,
                      json={"model": "auto", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                            **body})


def explain(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/route/explain", headers=server.headers(), timeout=30,
                   json={"model": "auto", "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_auto_completion_follows_the_predictor_and_quality_target(server):
    prompt = "The capital of France is"
    d = explain(server, prompt=prompt)
    adequacy = d["adequacy"]
    assert 0.0 <= adequacy <= 1.0
    assert {c["model_id"] for c in d["candidates"]} == {SMALL, LARGE}
    # below the predicted adequacy the small model is enough; above it only the larger one is
    low = complete(server, prompt=prompt, min_quality=max(0.0, adequacy - 0.05)).json()
    high = complete(server, prompt=prompt, min_quality=min(1.0, adequacy + 0.05)).json()
    assert low["model"] == SMALL and high["model"] == LARGE
    for body in (low, high):
        assert f"P(small model adequate)={adequacy:.2f}" in body["routing"]["reason"]
        assert body["routing"]["device"] == "cpu0"


def test_explain_lists_every_candidate_with_reasons(server):
    complete(server, model=SMALL)
    deadline = time.time() + 10  # the gateway refreshes replica stats every second
    while True:
        d = explain(server, messages=[{"role": "user", "content": "Solve 12*17 step by step."}], min_quality=0.5)
        small = next(c for c in d["candidates"] if c["model_id"] == SMALL)
        if small["energy_source"] == "replica-stats" or time.time() > deadline:
            break
        time.sleep(0.5)
    assert d["object"] == "route.decision" and d["model"] == SMALL  # the only chat model
    by_id = {c["model_id"]: c for c in d["candidates"]}
    assert by_id[LARGE]["kept"] is False and "cannot serve a chat request" in by_id[LARGE]["reason"]
    assert by_id[SMALL]["kept"] is True and by_id[SMALL]["predicted_energy_joules"] > 0
    # after requests have run, the prediction comes from the replica's measured joules per token
    assert by_id[SMALL]["energy_source"] == "replica-stats", by_id[SMALL]
    assert d["controls"]["min_quality"] == 0.5 and d["controls"]["slo"] == {"ttft_ms": 1000.0, "tpot_ms": 100.0}


def test_api_key_defaults_apply_and_requests_can_override(server):
    assert complete(server, role="client-hq").json()["model"] == LARGE  # the key asks for quality 1.0
    assert complete(server, role="client-hq", min_quality=0.0).json()["model"] == SMALL


def test_energy_budget_too_small_is_refused_before_running(server):
    r = complete(server, max_energy_joules=1e-6)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "energy_budget_exceeded" and err["param"] == "max_energy_joules"
    assert "J" in err["message"]


def test_bad_controls_are_400(server):
    r = complete(server, slo={"ttft_ms": -5})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("slo")
    r = complete(server, priority="urgent")
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def test_batch_cascade_escalates_an_unsure_small_model_and_charges_both(server):
    # a fixed seed: the escalation depends on the sampled tokens' log-probabilities, which must not vary by run
    # a generous SLO: the escalation target is a fallback only while it is predicted to meet the SLO, and on a
    # loaded 2-core machine the replicas' live latency figures can miss the default one (then no cascade)
    body = dict(prompt="Qwxz plorf zzt vrrk", max_tokens=6, min_quality=0.0, seed=11,
                slo={"ttft_ms": 600_000, "tpot_ms": 600_000})
    interactive = complete(server, **body).json()
    assert interactive["model"] == SMALL and "cascade" not in interactive["routing"]["reason"]
    batch = complete(server, priority="batch", **body).json()
    reason = batch["routing"]["reason"]
    assert batch["model"] == LARGE and f"cascade: escalated from {SMALL} to {LARGE}" in reason, reason
    assert "mean token log-probability" in reason and "< threshold -0.30" in reason
    # both attempts are charged: more than the small model's attempt alone
    assert batch["usage"]["energy"]["joules"] > interactive["usage"]["energy"]["joules"] * 0.5
    assert batch["usage"]["completion_tokens"] > 6
    rows = httpx.get(server.url + "/v1/energy/requests", headers=server.headers("reader"),
                     params={"limit": 20}).json()["data"]
    # the ledger keeps one row per attempt (nothing counted twice); together they make the response's figure
    attempts = {r["request_id"]: r for r in rows if r["request_id"] in (batch["id"], batch["id"] + "-cascade")}
    assert attempts[batch["id"]]["model"] == SMALL and attempts[batch["id"] + "-cascade"]["model"] == LARGE
    assert sum(r["joules"] for r in attempts.values()) == pytest.approx(batch["usage"]["energy"]["joules"], rel=1e-9)

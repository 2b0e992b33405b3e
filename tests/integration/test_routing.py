"""model "auto" on the embedded default: the predictor chooses between the two local models and says why."""

from __future__ import annotations

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
    d = explain(server, messages=[{"role": "user", "content": "Solve 12*17 step by step."}], min_quality=0.5)
    assert d["object"] == "route.decision" and d["model"] == SMALL  # the only chat model
    by_id = {c["model_id"]: c for c in d["candidates"]}
    assert by_id[LARGE]["kept"] is False and "cannot serve a chat request" in by_id[LARGE]["reason"]
    assert by_id[SMALL]["kept"] is True and by_id[SMALL]["predicted_energy_joules"] > 0
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

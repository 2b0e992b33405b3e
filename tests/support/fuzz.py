"""Schema-driven fuzzing of a running gateway: schemathesis cases from its own OpenAPI document, steered to real models.

Schemathesis generates valid and invalid requests for every operation from /openapi.json; a hypothesis
strategy swaps in the server's real model ids for most of them (random strings would only ever reach the
404 path) and keeps generations short so that the successful path runs many times. Each response must
not be a 5xx (503 no-capacity refusals excepted), must use a documented status and content type, must
match its documented schema, and every error must be in the OpenAI envelope.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

#: operations that change server-wide state are fuzzed with a key that may not change it (403 expected)
MUTATING = ("PUT", "DELETE", "POST")
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/route/explain")
#: the most output tokens a fuzzed generation may ask for (keeps real CPU models fast)
MAX_FUZZ_TOKENS = 2


@dataclass
class FuzzStats:
    cases: int = 0
    ok_by_path: Counter = field(default_factory=Counter)
    by_path_status: Counter = field(default_factory=Counter)
    #: one error message per (path, status), to see what the fuzz mostly hits
    messages: dict = field(default_factory=dict)


def _steer(case, model: str | None, tokens: int) -> None:
    """Point a generated inference body at a real model and keep its generation short."""
    body = case.body
    if not isinstance(body, dict):
        return
    if model is not None and "model" in body:
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > tokens:
            body[key] = tokens
    if body.get("max_tokens") == 0 and body.get("echo") is not True:
        body["max_tokens"] = tokens  # the schema allows 0, but only with echo: keep it on the successful path
    if case.path in INFERENCE_PATHS and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = tokens
    if isinstance(body.get("n"), int) and body["n"] > 1:
        body["n"] = 1


def _headers_for(case, keys: dict[str, str]) -> dict[str, str]:
    if case.path in INFERENCE_PATHS:
        role = "client"
    elif case.method.upper() in MUTATING:
        role = "client"  # must be refused with 403, never applied
    elif case.path.startswith("/v1/energy") or case.path == "/dashboard":
        role = "reader"
    else:
        role = "operator"
    return {"Authorization": f"Bearer {keys[role]}"} if role in keys else {}


#: share of the cases that go to each inference operation; the rest is split evenly over the others
INFERENCE_SHARE = {"/v1/chat/completions": 0.25, "/v1/completions": 0.20, "/v1/route/explain": 0.10}


def fuzz(url: str, keys: dict[str, str], *, max_examples: int) -> FuzzStats:
    """Run max_examples schemathesis cases, spread over every operation, against the server at url.

    Raises on the first failing check. Valid (positive) and invalid (negative) requests are mixed: mostly
    valid ones on the inference routes, where the interesting failures are on the successful path. An
    operation with few distinct inputs (GET /healthz) runs out of new cases early; the inference routes,
    fuzzed last, take up what it left, so the total is max_examples."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30,
                                           headers=_role_header(keys, "client")).json()["data"]]
    operations = [result.ok() for result in schema.get_all_operations()]
    others = [op for op in operations if op.path not in INFERENCE_SHARE]
    inference = [op for op in operations if op.path in INFERENCE_SHARE]
    stats = FuzzStats()
    per_other = int(max_examples * (1 - sum(INFERENCE_SHARE.values()))) // max(len(others), 1)
    for operation in others:
        _fuzz_operation(url, keys, models, st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                                     operation.as_strategy(GenerationMode.NEGATIVE)),
                        per_other, stats)
    left = max_examples - stats.cases
    weights = [INFERENCE_SHARE[op.path] for op in inference]
    for k, operation in enumerate(inference):
        last = k == len(inference) - 1
        n = max_examples - stats.cases if last else round(left * weights[k] / sum(weights))
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        # about three valid requests in four: the successful path is where serving bugs live
        cases = st.one_of(positive, positive, positive, operation.as_strategy(GenerationMode.NEGATIVE))
        _fuzz_operation(url, keys, models, cases, n, stats)
    return stats


def _fuzz_operation(url: str, keys: dict[str, str], models: list[str], cases, n: int, stats: FuzzStats) -> None:
    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases, model=st.one_of(st.sampled_from(models), st.sampled_from(models), st.none()))
    def run(case, model) -> None:
        _steer(case, model, MAX_FUZZ_TOKENS)
        response = case.call(base_url=url, headers=_headers_for(case, keys), timeout=120)
        stats.cases += 1
        stats.by_path_status[(case.path, response.status_code)] += 1
        if response.status_code == 200:
            stats.ok_by_path[case.path] += 1
        elif case.path in INFERENCE_PATHS:
            seen = stats.messages.setdefault((case.path, response.status_code), [])
            if len(seen) < 5:
                seen.append((response.text[:200], repr(case.body)[:400]))
        if response.status_code == 503:
            _assert_envelope(response, case)
            return  # a no-capacity refusal is an answer, not a crash
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])
        if response.status_code >= 400:
            _assert_envelope(response, case)

    run()


def _role_header(keys: dict[str, str], role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[role]}"} if role in keys else {}


def _assert_envelope(response, case) -> None:
    if response.status_code == 405 or case.path == "/dashboard":
        return
    body = response.json()
    assert set(body) == {"error"}, (case.method, case.path, body)
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body

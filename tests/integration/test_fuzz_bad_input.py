"""Whatever JSON a client sends, the gateway answers in the error envelope, never with a 500."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.ray, pytest.mark.slow]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
# bodies that look almost right: the real field names with values of any shape
near_miss = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.sampled_from(["auto", "smollm2-135m-instruct", "gemma-3-270m", ""]),
        "messages": json_values | st.lists(st.fixed_dictionaries({"role": json_values, "content": json_values}), max_size=2),
        "prompt": json_values,
        "max_tokens": json_values | st.integers(-5, 10**9),
        "temperature": json_values,
        "stop": json_values,
        "stream": json_values,
        "slo": json_values,
        "min_quality": json_values,
        "max_energy_joules": json_values,
        "priority": json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values | near_miss, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/route/explain"]))
def test_no_body_gets_a_500(server, body, path):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body.get("max_tokens", 0) > 8:
        body["max_tokens"] = 8  # keep the few valid requests short on the CPU
    r = httpx.post(server.url + path, json=body, headers=server.headers(), timeout=120)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]

"""Bad input gets the OpenAI error envelope with the right status, never a 500 or a traceback."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.server import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def post(server, path, body=None, role="client", content=None, headers=None):
    h = {**server.headers(role), **(headers or {})}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers={**h, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(server.url + path, json=body, headers=h, timeout=60)


def assert_envelope(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


def test_unknown_model_is_404(server):
    err = assert_envelope(post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-17"}), 404, "model_not_found", "model")
    assert "smollm2-135m-instruct" in err["message"]


def test_malformed_json_is_400(server):
    assert_envelope(post(server, "/v1/chat/completions", content=b'{"model": "x", "messages": ['), 400)


@pytest.mark.parametrize("body, param", [
    ({"model": "auto"}, "messages"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "temperature": 5}, "temperature"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({**CHAT, "min_quality": 1.5}, "min_quality"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_invalid_fields_are_400_naming_the_param(server, body, param):
    assert_envelope(post(server, "/v1/chat/completions", body), 400, param=param)


def test_image_content_is_refused_clearly(server):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    err = assert_envelope(post(server, "/v1/chat/completions", body), 400, "unsupported_content")
    assert "image_url" in err["message"]


def test_prompt_longer_than_context_is_400(server):
    long_prompt = "word " * 2600
    err = assert_envelope(post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long_prompt}]}),
                          400, "context_length_exceeded")
    assert "2048" in err["message"]
    err = assert_envelope(post(server, "/v1/completions", {"model": "gemma-3-270m", "prompt": "hi", "max_tokens": 5000}),
                          400, "context_length_exceeded")
    assert "max_tokens" in err["message"]


def test_chat_to_completion_model_is_400(server):
    err = assert_envelope(post(server, "/v1/chat/completions", {**CHAT, "model": "gemma-3-270m"}), 400,
                          "unsupported_capability")
    assert "/v1/completions" in err["message"]


def test_stream_error_before_first_byte_is_a_real_status(server):
    r = post(server, "/v1/chat/completions", {**CHAT, "stream": True, "messages": [{"role": "user", "content": "w " * 3000}]})
    assert_envelope(r, 400, "context_length_exceeded")


def test_body_too_large_is_413(server):
    big = b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}]}'
    assert_envelope(post(server, "/v1/chat/completions", content=big), 413, "body_too_large")


def test_missing_and_bad_key_are_401(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert_envelope(r, 401, "missing_api_key")
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert_envelope(r, 401, "invalid_api_key")


def test_roles_are_enforced(server):
    assert_envelope(post(server, "/v1/chat/completions", CHAT, role="reader"), 403, "forbidden")
    r = httpx.get(server.url + "/v1/energy/summary", headers=server.headers("client"))
    assert_envelope(r, 403, "forbidden")
    r = httpx.get(server.url + "/v1/devices", headers=server.headers("reader"))
    assert_envelope(r, 403, "forbidden")
    # a client key can change nothing on the power side, whatever the route
    for method, path, body in [("PUT", "/v1/devices/cpu0/power-limit", {"watts": 10}),
                               ("DELETE", "/v1/devices/cpu0/power-limit", None),
                               ("PUT", "/v1/devices/cpu0/locked-clocks", {"min_mhz": 500, "max_mhz": 900}),
                               ("DELETE", "/v1/devices/cpu0/locked-clocks", None),
                               ("PUT", "/v1/power/policy", {"mode": "enforce"}),
                               ("GET", "/v1/power/audit", None)]:
        for role in ("client", "reader"):
            r = httpx.request(method, server.url + path, json=body, headers=server.headers(role))
            assert_envelope(r, 403, "forbidden")
    assert httpx.get(server.url + "/v1/energy/summary", headers=server.headers("reader")).status_code == 200
    assert httpx.get(server.url + "/v1/devices", headers=server.headers("operator")).status_code == 200


def test_unknown_route_and_method(server):
    assert_envelope(httpx.get(server.url + "/v1/nothing", headers=server.headers()), 404)
    assert_envelope(httpx.get(server.url + "/v1/chat/completions", headers=server.headers()), 405)


def test_openai_client_raises_typed_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["client"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "x"}])

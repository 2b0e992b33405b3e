"""A lone UTF-16 surrogate in any text the engine would see is a 400 naming the field, on the real llama.cpp models."""

from __future__ import annotations

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT = '{"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": CONTENT}]STOP}'
COMPLETION = '{"model": "gemma-3-270m", "max_tokens": 2, "prompt": PROMPT}'


def post_raw(server, path: str, raw: str) -> httpx.Response:
    # raw text, not json=: the body must carry the \\ud800 escape itself, as a hostile client sends it
    return httpx.post(server.url + path, content=raw.encode("ascii"), timeout=120,
                      headers={**server.headers(), "Content-Type": "application/json"})


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", CHAT.replace("CONTENT", r'"a\ud800b"').replace("STOP", ""), "messages[0].content"),
    ("/v1/chat/completions", CHAT.replace("CONTENT", r'[{"type": "text", "text": "\udc00"}]').replace("STOP", ""),
     "messages[0].content[0].text"),
    ("/v1/chat/completions", CHAT.replace("CONTENT", '"Hi"').replace("STOP", r', "stop": ["\ud800"]'), "stop[0]"),
    ("/v1/completions", COMPLETION.replace("PROMPT", r'"a\ud800b"'), "prompt"),
    ("/v1/completions", COMPLETION.replace("PROMPT", r'["a\ud800b"]'), "prompt[0]"),
    ("/v1/route/explain", r'{"model": "auto", "prompt": "a\ud800b"}', "prompt"),
])
def test_lone_surrogate_is_400_naming_the_field(server, path, raw, param):
    r = post_raw(server, path, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    assert "not valid Unicode" in err["message"]


def test_a_surrogate_pair_is_valid_text(server):
    r = post_raw(server, "/v1/chat/completions", CHAT.replace("CONTENT", r'"Say hi \ud83d\ude00"').replace("STOP", ""))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 0

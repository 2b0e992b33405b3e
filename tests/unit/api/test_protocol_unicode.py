"""Text that is not valid Unicode (a lone UTF-16 surrogate sent as a JSON escape) is a 400 naming the field."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from scheduler.api.errors import install_error_handlers
from scheduler.api.protocol import ChatCompletionRequest, CompletionRequest, RouteExplainRequest

CHAT = '{"model": "auto", "messages": [{"role": "user", "content": CONTENT}], "max_tokens": 2, "stop": STOP}'

CASES = [
    (ChatCompletionRequest, CHAT.replace("CONTENT", r'"a\ud800b"').replace("STOP", "null"), "messages[0].content", 1),
    (ChatCompletionRequest, CHAT.replace("CONTENT", r'[{"type": "text", "text": "ok"}, {"type": "text", "text": "\udc00"}]')
     .replace("STOP", "null"), "messages[0].content[1].text", 0),
    (ChatCompletionRequest, CHAT.replace("CONTENT", '"fine"').replace("STOP", r'"end\udfff"'), "stop", 3),
    (ChatCompletionRequest, CHAT.replace("CONTENT", '"fine"').replace("STOP", r'["x", "\ud800"]'), "stop[1]", 0),
    (CompletionRequest, r'{"model": "auto", "prompt": "x\ud800"}', "prompt", 1),
    (CompletionRequest, r'{"model": "auto", "prompt": ["\ud800"]}', "prompt[0]", 0),
    (CompletionRequest, r'{"model": "auto", "prompt": "x", "user": "\ud800"}', "user", 0),
    (RouteExplainRequest, r'{"prompt": "\udbff"}', "prompt", 0),
]


@pytest.mark.parametrize("cls, raw, param, index", CASES)
def test_lone_surrogate_is_rejected_at_the_field(cls, raw, param, index):
    body = json.loads(raw)  # the stdlib decoder, as FastAPI's, keeps the lone surrogate
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == (param,)
    assert errors[0]["type"] == "invalid_unicode"
    assert f"at character {index}" in errors[0]["msg"]


def test_surrogate_pairs_and_plain_text_stay_valid():
    body = json.loads(CHAT.replace("CONTENT", r'"smile \ud83d\ude00"').replace("STOP", r'["\u00e9"]'))
    req = ChatCompletionRequest.model_validate(body)
    assert req.messages[0].content == "smile \U0001F600" and req.stop == ["\u00e9"]


def test_envelope_is_400_with_param():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        return {"ok": True}

    client = TestClient(app)
    r = client.post("/v1/chat/completions", content=CHAT.replace("CONTENT", r'"a\ud800b"').replace("STOP", "null").encode(),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content"
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"
    assert "not valid Unicode" in err["message"] and "U+D800" in err["message"]

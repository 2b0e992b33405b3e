"""Fields that constrain the answer are honoured or refused with a clear 400, never ignored.

A client that asks for JSON (response_format), tool calls, a completion's suffix or best_of and gets plain
text back takes it for what it asked for. JSON mode routes to a model that can follow it (llama.cpp's grammar,
or an upstream server marked supports_json); with none configured it is a 400 that names each model's reason.
The rest are refused in the envelope. (Real app in-process, simulated models, no Ray.)
"""

from __future__ import annotations

import pytest

from scheduler.config import ConfigError, WattlaneConfig, validate_config_mapping
from tests.support.gateway_app import bearer

ASK = [{"role": "user", "content": "Name a colour."}]


def error(r, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    return err


def test_json_mode_without_a_model_that_can_follow_it_is_a_400_naming_why(client):
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}):
        r = client.post("/v1/chat/completions", headers=bearer("client"),
                        json={"model": "auto", "messages": ASK, "max_tokens": 4, "response_format": fmt})
        err = error(r)
        assert err["code"] == "unsupported_capability"
        assert "has no JSON mode for response_format" in err["message"] and "simulated" in err["message"]
    # free text ("text") constrains nothing and is served
    r = client.post("/v1/chat/completions", headers=bearer("client"),
                    json={"model": "auto", "messages": ASK, "max_tokens": 4, "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    # /v1/models says which models follow response_format
    models = client.get("/v1/models", headers=bearer("client")).json()["data"]
    assert models[1:] and all(m["wattlane"]["supports_json"] is False for m in models[1:])  # simulated models
    # route-explain shows the same reason without running anything
    r = client.post("/v1/route/explain", headers=bearer("client"),
                    json={"messages": ASK, "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and "has no JSON mode" in r.text


@pytest.mark.parametrize("path, fields, param, words", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools (function calling)"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "tools (function calling)"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "'json_schema' is required"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "'json_object'"),
    ("/v1/chat/completions", {"logit_bias": {"hello": 5}}, "logit_bias", "token ids"),
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias.5", "100"),
    ("/v1/chat/completions", {"frequency_penalty": 2.5}, "frequency_penalty", "2"),
    ("/v1/completions", {"suffix": " the end"}, "suffix", "suffix (text insertion)"),
    ("/v1/completions", {"best_of": 3}, "best_of", "1"),
    # token ids are one model's vocabulary: routing cannot pick a model for them
    ("/v1/completions", {"prompt": [1, 2, 3]}, "model", "a token-id prompt is in one model's vocabulary"),
    ("/v1/completions", {"model": "llama-3.1-8b", "prompt": [[1, 2], [3]]}, "prompt", "exactly one prompt per request"),
    ("/v1/completions", {"model": "llama-3.1-8b", "prompt": [1, True]}, "prompt", "token ids (a list of integers"),
    ("/v1/completions", {"model": "llama-3.1-8b", "prompt": [5, -1]}, "prompt", "token ids are 0 to 2^31 - 1"),
    ("/v1/completions", {"model": "llama-3.1-8b", "prompt": [[2.0, 2**31]]}, "prompt", "got 2147483648"),
    ("/v1/completions", {"model": "llama-3.1-8b", "prompt": [[]]}, "prompt", "the token-id prompt is empty"),
    ("/v1/completions", {"model": "llama-3.1-8b", "prompt": [1, 2], "echo": True}, "echo", "needs logprobs"),
    ("/v1/route/explain", {"prompt": [1, 2, 3]}, "prompt", "route explain reads the prompt as text"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    # the simulator's placeholder tokens have no log-probabilities: refused, not answered with null
    ("/v1/chat/completions", {"logprobs": True}, "logprobs", "simulated"),
    ("/v1/completions", {"logprobs": 2}, "logprobs", "simulated"),
    ("/v1/completions", {"logprobs": 1, "echo": True, "max_tokens": 0}, "logprobs", "simulated"),
    # max_tokens 0 scores a prompt; without echo there would be nothing to answer
    ("/v1/completions", {"max_tokens": 0}, "echo", "max_tokens 0 generates nothing"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
])
def test_what_cannot_be_honoured_is_refused_in_the_envelope(client, path, fields, param, words):
    body = {"model": "auto", "max_tokens": 4, **({"messages": ASK} if "chat" in path else {"prompt": "Once"}), **fields}
    err = error(client.post(path, headers=bearer("client"), json=body), param)
    assert words in err["message"], err


def test_an_empty_tools_list_or_best_of_1_asks_for_nothing_and_is_served(client):
    r = client.post("/v1/chat/completions", headers=bearer("client"),
                    json={"model": "auto", "messages": ASK, "max_tokens": 4, "tools": [], "frequency_penalty": 0.5})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", headers=bearer("client"),
                    json={"model": "auto", "prompt": "Once", "max_tokens": 4, "best_of": 1, "suffix": None})
    assert r.status_code == 200, r.text


def model(**fields) -> dict:
    return {"models": [{"id": "m", "kind": "chat", **fields}]}


def test_supports_json_defaults_to_what_the_engine_can_do():
    def supports_json(cfg: dict) -> bool:
        return WattlaneConfig.model_validate(cfg).models[0].supports_json

    assert supports_json(model(engine="llamacpp", weights={"path": "m.gguf"})) is True
    assert supports_json(model(engine="simulated", devices=[])) is False
    endpoint = {"base_url": "http://127.0.0.1:1/v1", "served_model_name": "m", "devices": ["cpu0"]}
    assert supports_json(model(engine="openai", endpoints=[endpoint])) is False  # until the operator says it can
    assert supports_json(model(engine="openai", endpoints=[endpoint], supports_json=True)) is True
    with pytest.raises(ConfigError) as info:
        validate_config_mapping(model(engine="simulated", devices=[], supports_json=True), "wattlane.yaml")
    msg = str(info.value)
    assert "wattlane.yaml" in msg and "models[0]" in msg and "supports_json: engine 'simulated' cannot constrain its output" in msg


def test_a_check_across_body_fields_keeps_its_own_words():
    from fastapi.exceptions import RequestValidationError

    from scheduler.api.errors import _validation_message

    # a model-level check has the whole body as its location; it used to read "must be a JSON object"
    err = RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": "Value error, a needs b"}])
    assert _validation_message(err) == ("a needs b", None)
    err = RequestValidationError([{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be an object"}])
    assert _validation_message(err) == ("request body must be a JSON object", None)


def test_a_prompt_of_token_ids_goes_to_the_model_it_names(client):
    r = client.post("/v1/completions", headers=bearer("client"),
                    json={"model": "llama-3.1-8b", "prompt": [[101, 7, 2045, 13]], "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "llama-3.1-8b" and body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 3
    # JSON's integer includes 7.0 (a schema-driven client may send it)
    r = client.post("/v1/completions", headers=bearer("client"),
                    json={"model": "llama-3.1-8b", "prompt": [101.0, 7.0], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2, r.text


def test_max_tokens_0_with_echo_returns_the_prompt_and_its_row(client):
    """OpenAI's legacy completions allowed max_tokens 0 with echo: the prompt alone, nothing generated."""
    r = client.post("/v1/completions", headers=bearer("client"),
                    json={"model": "auto", "prompt": "Once upon a time", "max_tokens": 0, "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "Once upon a time" and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0
    rows = [row for row in client.app.state.gateway.ledger.requests(limit=None) if row["request_id"] == body["id"]]
    assert [(row["completion_tokens"], row["status"]) for row in rows] == [(0, "ok")]

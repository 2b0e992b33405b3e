"""The embedded default end to end: real SmolLM2 and Gemma through Ray Serve, via the official openai client."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.support.server import KEYS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT_MODEL = "smollm2-135m-instruct"
COMPLETION_MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["client"], timeout=120, max_retries=0)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{2,}", text)


def test_chat_completion_is_coherent_with_usage_and_routing(client):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=32, temperature=0, seed=1,
    )
    resp = raw.parse()
    text = resp.choices[0].message.content
    assert "paris" in text.lower(), text
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 5 and 0 < resp.usage.completion_tokens <= 32
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    routing = resp.model_extra["routing"]
    assert routing["model"] == CHAT_MODEL and routing["device"] == "cpu0" and routing["node"] and routing["reason"]
    assert raw.headers["x-wattlane-model"] == CHAT_MODEL
    assert raw.headers["x-wattlane-device"] == "cpu0"
    # Serve's proxy sets X-Request-Id (a client's own is kept); the body id is the ledger key
    assert raw.headers["x-request-id"] and "," not in raw.headers["x-request-id"]
    assert resp.id.startswith("chatcmpl-")


SEEDED = dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12,
              temperature=0.9, seed=42)
#: what other clients send to the same (only) chat replica between two seeded runs
INTERLEAVED = [
    dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0),
    dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Name a colour. Then another."}], max_tokens=10,
         temperature=0.7, seed=7),
    dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=1.2),
    dict(model=CHAT_MODEL, messages=[{"role": "system", "content": "Answer in French."},
                                     {"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0.5),
    dict(model=CHAT_MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=20, temperature=0,
         stream=True),
]


@pytest.fixture(scope="module")
def seeded_first(client):
    """The first seeded answer: every later run must repeat it, and it must depend on the seed."""
    resp = client.chat.completions.create(**SEEDED)
    others = {client.chat.completions.create(**{**SEEDED, "seed": s}).choices[0].message.content for s in (1, 2, 3)}
    assert others - {resp.choices[0].message.content}, "temperature 0.9 gave one text for every seed: the test proves nothing"
    return resp


@pytest.mark.parametrize("run", range(5))
def test_same_seed_same_text_at_temperature(client, seeded_first, run):
    other = client.chat.completions.create(**INTERLEAVED[run])
    if INTERLEAVED[run].get("stream"):
        list(other)
    resp = client.chat.completions.create(**SEEDED)
    assert resp.choices[0].message.content == seeded_first.choices[0].message.content
    # the fingerprint says the promise holds here, and is the same for the same model and build
    assert resp.system_fingerprint and resp.system_fingerprint.startswith("fp_")
    assert resp.system_fingerprint == seeded_first.system_fingerprint


def test_chat_stream_through_openai_client(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(_words(text)) >= 2, text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    usage = usage_chunks[0].usage
    assert 0 < usage.completion_tokens <= 24
    assert usage.model_extra["energy"]["joules"] > 0
    assert usage.model_extra["carbon"]["gco2e"] > 0
    assert all(c.model_extra["routing"]["model"] == CHAT_MODEL for c in chunks)


def test_stop_sequence_is_honoured_and_not_emitted(client):
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "List three fruits, separated by commas."}],
        max_tokens=40, temperature=0, stop=[","],
    )
    assert "," not in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client):
    resp = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=5, temperature=0,
    )
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"


def test_json_mode_through_the_gateway_gives_json_the_free_answer_is_not(client):
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    free = client.chat.completions.create(model="auto", messages=ask, max_tokens=30, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    resp = client.chat.completions.create(model="auto", messages=ask, max_tokens=96, temperature=0,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    assert resp.choices[0].finish_reason == "stop" and resp.usage.model_extra["energy"]["joules"] > 0
    # json_schema, streamed: the pieces join into an object of the schema
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    chunks = list(client.chat.completions.create(
        model=CHAT_MODEL, messages=ask, max_tokens=64, temperature=0.7, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}))
    value = json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert list(value) == ["city"] and isinstance(value["city"], str)


def test_tools_are_refused_not_ignored(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       max_tokens=8, tools=[{"type": "function", "function": {
                                           "name": "weather", "parameters": {"type": "object", "properties": {}}}}])
    assert info.value.body["param"] == "tools" and "function calling" in info.value.body["message"]


def test_token_logprobs_chat_streamed_and_legacy_completions(client):
    ask = [{"role": "user", "content": "Say hello."}]
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=ask, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    # streamed: each chunk carries its own tokens' entries, and the energy still rides on the finish chunk
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=ask, max_tokens=6, temperature=0,
                                                 logprobs=True, stream=True, stream_options={"include_usage": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish.choices[0].logprobs.model_extra["energy"]["joules"] > 0
    comp = client.completions.create(model=COMPLETION_MODEL, prompt="One, two, three,", max_tokens=4, temperature=0,
                                     logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    assert all(len(alts) == 2 for alts in lp.top_logprobs)


def test_prompt_scoring_with_echo_as_evaluation_harnesses_ask_for_it(client):
    """echo + logprobs (+ max_tokens 0): each prompt token's log-probability, as lm-evaluation-harness's
    loglikelihood tasks read it (llama.cpp's own server returns none: ggml-org/llama.cpp#27174)."""
    context, continuation = "The capital of France is Paris. The capital of Germany is", " Berlin"
    scored = client.completions.create(model=COMPLETION_MODEL, prompt=context + continuation, max_tokens=0, echo=True,
                                       logprobs=1, temperature=0)
    choice, lp = scored.choices[0], scored.choices[0].logprobs
    assert choice.text == context + continuation and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and len(lp.tokens) == scored.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and "".join(lp.tokens) == choice.text
    assert all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    # the continuation is the model's greedy choice where it stands ("is_greedy"), and far likelier than a wrong one
    assert lp.tokens[-1] == continuation and max(lp.top_logprobs[-1], key=lp.top_logprobs[-1].get) == continuation
    wrong = client.completions.create(model=COMPLETION_MODEL, prompt=context + " Madrid", max_tokens=0, echo=True,
                                      logprobs=1).choices[0].logprobs
    assert lp.token_logprobs[-1] > wrong.token_logprobs[-1] + 2
    # with output: the prompt's entries, then the output's, offsets running on past the echoed prompt
    both = client.completions.create(model=COMPLETION_MODEL, prompt=context, max_tokens=2, echo=True, logprobs=1,
                                     temperature=0)
    blp = both.choices[0].logprobs
    assert len(blp.tokens) == both.usage.prompt_tokens + both.usage.completion_tokens
    assert blp.text_offset[both.usage.prompt_tokens] == len(context) and both.choices[0].text.startswith(context)
    # streamed: the echoed prompt rides with its scores in the first chunk
    chunks = list(client.completions.create(model=COMPLETION_MODEL, prompt=context, max_tokens=2, echo=True,
                                            logprobs=1, temperature=0, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == both.choices[0].text and texts[0].startswith(context)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == blp.tokens


def test_a_token_id_prompt_scores_as_its_text_does(client, server):
    """lm-evaluation-harness's default request: the prompt as token ids, echo, logprobs 1, max_tokens 1."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(server.state_dir / "models" / f"{COMPLETION_MODEL}.gguf"), vocab_only=True,
                  verbose=False)
    text = "The capital of France is Paris. The capital of Germany is Berlin"
    ids = vocab.tokenize(text.encode(), add_bos=True)
    by_ids = client.completions.create(model=COMPLETION_MODEL, prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                                       temperature=0)
    by_text = client.completions.create(model=COMPLETION_MODEL, prompt=text, max_tokens=1, echo=True, logprobs=1,
                                        temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.choices[0].text.startswith(text)
    a, b = by_ids.choices[0].logprobs, by_text.choices[0].logprobs
    assert a.tokens == b.tokens and a.text_offset == b.text_offset
    assert a.token_logprobs[0] is None and a.token_logprobs[1:] == pytest.approx(b.token_logprobs[1:], abs=1e-4)
    with pytest.raises(openai.BadRequestError) as info:  # ids are one model's: "auto" cannot route them
        client.completions.create(model="auto", prompt=[ids], max_tokens=1)
    assert info.value.body["param"] == "model"


def test_completion_with_gemma(client):
    resp = client.completions.create(model=COMPLETION_MODEL, prompt="The capital of France is Paris. The capital of "
                                     "Germany is", max_tokens=8, temperature=0)
    assert "berlin" in resp.choices[0].text.lower(), resp.choices[0].text
    assert resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens >= 4
    assert resp.model == COMPLETION_MODEL and resp.model_extra["routing"]["model"] == COMPLETION_MODEL


def test_completion_stream_with_gemma(client):
    chunks = list(client.completions.create(model=COMPLETION_MODEL, prompt="One, two, three,", max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    assert [c for c in chunks if c.usage][0].usage.completion_tokens <= 6


def test_auto_picks_by_kind(client):
    # min_quality 1: only the largest model that serves the request's kind will do, whatever the predictor
    # thinks of the prompt; the completion model is larger but serves no chat, so a chat stays on the chat model
    strict = {"min_quality": 1.0}
    chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          extra_body=strict)
    assert chat.model == CHAT_MODEL and chat.model_extra["routing"]["reason"]
    comp = client.completions.create(model="auto", prompt="Hello", max_tokens=4, extra_body=strict)
    assert comp.model == COMPLETION_MODEL


def test_models_list(client):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "auto" and CHAT_MODEL in ids and COMPLETION_MODEL in ids
    # llama.cpp follows response_format with a grammar: both local models say so
    assert all(m.model_extra["wattlane"]["supports_json"] is True for m in models[1:])


def test_health_and_readiness(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {CHAT_MODEL: "ready", COMPLETION_MODEL: "ready"}


def test_raw_sse_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers(),
                      json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                            "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-wattlane-model"] == CHAT_MODEL
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"

"""The llama.cpp engine honours response_format (grammar-constrained JSON), logit_bias, the penalties and logprobs.

Each runs the real SmolLM2-135M on the CPU: a 135M model left to itself rarely writes valid JSON, so valid
JSON every time is the grammar's doing.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from scheduler.engines.base import GenerationRequest, ModelKind, RequestRejectedError, SamplingParams
from scheduler.engines.llamacpp import LlamaCppEngine

ASK = [{"role": "user", "content": "Describe a cat called Tom who is 3 years old."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def run(engine: LlamaCppEngine, messages=ASK, **params) -> tuple[str, str]:
    async def go() -> tuple[str, str]:
        req = GenerationRequest(request_id="t", kind=ModelKind.CHAT, messages=messages,
                                params=SamplingParams(**{"max_tokens": 96, "temperature": 0.0, **params}))
        text, last = [], None
        async for ev in engine.generate(req):
            text.append(ev.text)
            last = ev
        return "".join(text), last.finish_reason

    return asyncio.run(go())


def test_json_object_mode_gives_json_where_free_text_does_not(engine):
    for question in ("What is the capital of France?", "Say hello."):
        ask = [{"role": "user", "content": question}]
        free, _ = run(engine, ask, max_tokens=30)
        with pytest.raises(ValueError):
            json.loads(free)
        text, finish = run(engine, ask, response_format={"type": "json_object"})
        assert finish == "stop", text  # the grammar ends the answer when the object closes
        assert isinstance(json.loads(text), dict)


def test_json_schema_is_followed_at_any_temperature(engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        text, finish = run(engine, response_format=fmt, temperature=temperature, seed=seed)
        assert finish == "stop", text
        value = json.loads(text)
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


#: pydantic's schema of a recursive model: the root is a $ref beside the $defs it points into
TREE = {"$defs": {"Node": {"type": "object", "title": "Node", "required": ["name", "children"],
                           "properties": {"name": {"type": "string"},
                                          "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
        "$ref": "#/$defs/Node"}


def _tree_depth(node: dict) -> int:
    assert set(node) == {"name", "children"} and isinstance(node["name"], str), node
    return 1 + max((_tree_depth(child) for child in node["children"]), default=0)


def test_a_recursive_schema_whose_root_is_a_ref_is_followed(engine):
    # llama.cpp's converter alone fails on it (KeyError '#/$defs/Node'): it was refused as the client's error
    fmt = {"type": "json_schema", "json_schema": {"name": "tree", "schema": TREE}}
    ask = [{"role": "user", "content": "Tom has two children, Ann and Bob. Write his family tree."}]
    depths = []
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        text, finish = run(engine, ask, response_format=fmt, temperature=temperature, seed=seed)
        assert finish == "stop", text
        depths.append(_tree_depth(json.loads(text)))
    assert max(depths) > 1, depths  # the recursion itself was followed, not only a leaf


@pytest.mark.parametrize("schema", [
    {"$ref": "#/definitions/missing"},  # the converter raises
    {"type": "weird"},
    # the converter emits an empty rule, which llama.cpp's parser refuses: built into a sampler unchecked,
    # that grammar crashed the replica's process (segmentation fault)
    {"enum": []},
    {"anyOf": []},
])
def test_a_schema_that_gives_no_usable_grammar_is_the_clients_error(engine, schema):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(RequestRejectedError) as info:
        run(engine, response_format=bad)
    assert info.value.param == "response_format"
    # the engine is unharmed
    assert run(engine, max_tokens=2)[0]


def test_logit_bias_bans_and_forces_tokens(engine):
    greedy, _ = run(engine, max_tokens=8)
    first = engine._llm.tokenize(greedy.encode(), add_bos=False, special=False)[0]
    banned, _ = run(engine, max_tokens=8, logit_bias={first: -100.0})
    assert not banned.startswith(engine._llm.detokenize([first]).decode())
    forced_id = engine._llm.tokenize(b" banana", add_bos=False, special=False)[0]
    forced, _ = run(engine, max_tokens=4, logit_bias={forced_id: 100.0})
    assert forced.count(engine._llm.detokenize([forced_id]).decode().strip()) == 4
    with pytest.raises(RequestRejectedError) as info:
        run(engine, logit_bias={10**9: 1.0})
    assert info.value.param == "logit_bias"


def test_the_penalties_break_a_repetition(engine):
    ask = [{"role": "user", "content": "Write the word yes ten times."}]
    plain, _ = run(engine, ask, max_tokens=40)
    assert plain.count("ten times") >= 4  # greedy SmolLM2 loops on its own header
    assert run(engine, ask, max_tokens=40, frequency_penalty=2.0)[0].count("ten times") < 2
    presence, _ = run(engine, ask, max_tokens=40, presence_penalty=2.0)
    assert presence.count("ten times") < 2


def test_token_logprobs_one_per_token_with_sorted_alternatives(engine):
    async def go():
        req = GenerationRequest(request_id="t", kind=ModelKind.CHAT, messages=[{"role": "user", "content": "Say hello."}],
                                params=SamplingParams(max_tokens=8, temperature=0.0, return_logprobs=True, top_logprobs=3))
        return [ev async for ev in engine.generate(req)]

    events = asyncio.run(go())
    entries = [t for ev in events for t in (ev.token_logprobs or [])]
    assert len(entries) == events[-1].completion_tokens == 8
    assert b"".join(t.token_bytes for t in entries).decode() == "".join(ev.text for ev in events)
    for t in entries:
        assert t.logprob <= 0 and len(t.top) == 3
        assert [lp for _, lp, _ in t.top] == sorted((lp for _, lp, _ in t.top), reverse=True)
        # greedy: the token chosen is the most likely one, with the same figure
        assert t.top[0][0] == t.token and t.top[0][1] == pytest.approx(t.logprob)


def test_without_return_logprobs_no_entries_are_made(engine):
    async def go():
        req = GenerationRequest(request_id="t", kind=ModelKind.CHAT, messages=[{"role": "user", "content": "Say hello."}],
                                params=SamplingParams(max_tokens=4, temperature=0.0, logprobs=True))
        return [ev async for ev in engine.generate(req)]

    events = asyncio.run(go())
    assert all(ev.token_logprobs is None for ev in events)
    assert events[-1].mean_logprob is not None and events[-1].mean_logprob < 0  # the cascade's mean still is

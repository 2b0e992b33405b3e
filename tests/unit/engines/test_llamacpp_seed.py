"""The llama.cpp engine: a seed gives the same text for the same request whatever the replica ran before."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.engines.llamacpp import LlamaCppEngine
from tests.support.local_models import smollm2_weights

COLOUR = [{"role": "user", "content": "Name a colour."}]
#: requests of other clients that ran on the replica in between (other prompts, greedy and sampled)
OTHERS = [
    ([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], 0.0, 1),
    ([{"role": "user", "content": "Say hello."}], 0.7, None),
    ([{"role": "user", "content": "Name a colour. Then name another one."}], 0.9, 7),
    ([{"role": "user", "content": "List three fruits, separated by commas."}], 0.0, None),
]


def generate(engine: LlamaCppEngine, messages, temperature: float, seed: int | None, max_tokens: int = 12) -> str:
    async def run() -> str:
        req = GenerationRequest(request_id="t", kind=ModelKind.CHAT, messages=messages,
                                params=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))
        return "".join([ev.text async for ev in engine.generate(req)])

    return asyncio.run(run())


def test_same_seed_same_text_whatever_ran_before(engine):
    texts = []
    nothing = (None, 0.0, None)
    for messages, temperature, seed in [nothing, *OTHERS, nothing]:
        if messages is not None:
            generate(engine, messages, temperature, seed, max_tokens=20)
        texts.append(generate(engine, COLOUR, 0.9, 42))
    assert texts[0] and len(set(texts)) == 1, texts


def test_greedy_text_does_not_depend_on_what_ran_before(engine):
    prompt = [{"role": "user", "content": "Write one sentence about the sea."}]
    first = generate(engine, prompt, 0.0, None, max_tokens=24)
    generate(engine, OTHERS[0][0], 0.0, None)
    assert generate(engine, prompt, 0.0, None, max_tokens=24) == generate(engine, prompt, 0.0, None, max_tokens=24) == first


def test_a_request_without_seed_does_not_inherit_the_previous_seed(engine):
    generate(engine, COLOUR, 1.5, 42, max_tokens=24)
    unseeded = [generate(engine, COLOUR, 1.5, None, max_tokens=24) for _ in range(5)]
    # five independent 24-token draws at temperature 1.5 are all alike only if one seed is being reused
    assert len(set(unseeded)) > 1, unseeded


def test_fingerprint_names_the_weights_build_and_settings(engine, tmp_path):
    from scheduler.engines.llamacpp import _fingerprint

    fp = engine.system_fingerprint
    assert fp.startswith("fp_") and len(fp) == 15
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"weights one")
    base = _fingerprint(weights, context_length=2048, n_threads=1, n_batch=256)
    assert base == _fingerprint(weights, context_length=2048, n_threads=1, n_batch=256)
    assert base != _fingerprint(weights, context_length=2048, n_threads=2, n_batch=256)
    weights.write_bytes(b"weights two")
    assert base != _fingerprint(weights, context_length=2048, n_threads=1, n_batch=256)


def test_an_empty_completion_prompt_starts_a_document():
    """The fuzz found it: prompt "" on a model whose tokenizer adds no BOS crashed llama.cpp (503)."""
    eng = LlamaCppEngine("smollm2-135m-instruct", ModelKind.COMPLETION, smollm2_weights(), context_length=512, n_threads=1)

    async def run() -> list:
        req = GenerationRequest(request_id="t", kind=ModelKind.COMPLETION, prompt="",
                                params=SamplingParams(max_tokens=3, temperature=0.0))
        return [ev async for ev in eng.generate(req)]

    try:
        events = asyncio.run(run())
    finally:
        asyncio.run(eng.close())
    assert events[-1].finished and events[-1].prompt_tokens == 1

"""The llama.cpp engine scores a prompt (legacy completions' echo with logprobs): each prompt token's
log-probability given the tokens before it, checked against llama.cpp's own logits of every position.

The real SmolLM2-135M on the CPU, with a small batch so that a prompt spans several of them.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from scheduler.engines.base import GenerationRequest, ModelKind, RequestRejectedError, SamplingParams
from scheduler.engines.llamacpp import LlamaCppEngine
from tests.support.local_models import smollm2_weights

N_BATCH = 16
PROMPT = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
          "The capital of Spain is Madrid. The capital of Portugal is")


@pytest.fixture(scope="module")
def engine():
    eng = LlamaCppEngine("smollm2-135m", ModelKind.COMPLETION, smollm2_weights(), context_length=512, n_threads=1,
                         n_batch=N_BATCH)
    yield eng
    asyncio.run(eng.close())


def run(engine: LlamaCppEngine, prompt: str = PROMPT, **params):
    async def go():
        req = GenerationRequest(request_id="t", kind=ModelKind.COMPLETION, prompt=prompt,
                                params=SamplingParams(**{"temperature": 0.0, **params}))
        return [ev async for ev in engine.generate(req)]

    return asyncio.run(go())


def entries(events):
    return [t for ev in events for t in (ev.token_logprobs or [])]


def reference_logprobs(prompt: str) -> tuple[list[int], np.ndarray]:
    """Every position's log-softmax from a model loaded with logits_all, evaluated in the same batches."""
    from llama_cpp import Llama

    ref = Llama(model_path=str(smollm2_weights()), n_ctx=512, n_batch=N_BATCH, n_threads=1, logits_all=True,
                verbose=False)
    ids = ref.tokenize(prompt.encode(), add_bos=True)
    ref.eval(ids)
    scores = np.asarray(ref.scores[:len(ids)], dtype=np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    return ids, scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))


def test_each_prompt_token_is_scored_given_the_tokens_before_it(engine):
    events = run(engine, max_tokens=0, return_logprobs=True, top_logprobs=3, prompt_logprobs=True)
    scored = entries(events)
    ids, logprobs = reference_logprobs(PROMPT)
    assert len(ids) > 2 * N_BATCH  # three batches
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 0 and events[-1].prompt_tokens == len(ids) == len(scored)
    assert all(t.in_prompt for t in scored) and "".join(t.token for t in scored) == PROMPT
    first, rest = scored[0], scored[1:]
    assert first.logprob is None and first.top == ()  # nothing before it predicts it
    # position i is scored by the distribution after token i - 1 (llama-cpp-python's own echo reads row i:
    # abetlen/llama-cpp-python#1983); its alternatives are that distribution's most likely tokens
    expected = [logprobs[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose([t.logprob for t in rest], expected, atol=1e-4)
    for i, t in enumerate(rest, start=1):
        best = np.argsort(-logprobs[i - 1], kind="stable")[:3]
        assert [lp for _, lp, _ in t.top] == pytest.approx(logprobs[i - 1, best].tolist(), abs=1e-4)
        assert len(t.top) == 3 and t.top[0][1] >= t.logprob - 1e-6
    # a well-predicted token is the model's first choice there; "Paris" after "The capital of France is" is
    paris = next(t for t in rest if t.token == " Paris")
    assert paris.top[0][0] == " Paris"


def test_generation_after_scoring_is_the_same_as_without(engine):
    plain = run(engine, max_tokens=8, return_logprobs=True, top_logprobs=2)
    scored = run(engine, max_tokens=8, return_logprobs=True, top_logprobs=2, prompt_logprobs=True)
    assert "".join(e.text for e in scored) == "".join(e.text for e in plain) and "Lisbon" in "".join(e.text for e in plain)
    generated = [t for t in entries(scored) if not t.in_prompt]
    assert [(t.token, t.logprob, t.top) for t in generated] == [(t.token, t.logprob, t.top) for t in entries(plain)]
    prompt_part = entries(scored)[:len(entries(scored)) - len(generated)]
    assert all(t.in_prompt for t in prompt_part) and len(prompt_part) == scored[-1].prompt_tokens
    assert scored[-1].completion_tokens == plain[-1].completion_tokens == len(generated)


def test_the_first_generated_token_scores_the_same_as_its_prompt_position(engine):
    """The output's first token, then the same text as a prompt: one distribution, read two ways."""
    first = entries(run(engine, max_tokens=1, return_logprobs=True))[0]
    rescored = entries(run(engine, PROMPT + first.token, max_tokens=0, return_logprobs=True, prompt_logprobs=True))
    assert rescored[-1].token == first.token and rescored[-1].logprob == pytest.approx(first.logprob, abs=1e-4)


def test_max_tokens_zero_without_logprobs_generates_nothing(engine):
    events = run(engine, max_tokens=0)
    assert events[-1].finished and events[-1].finish_reason == "length" and events[-1].completion_tokens == 0
    assert "".join(e.text for e in events) == "" and entries(events) == []


def test_a_client_that_leaves_stops_the_scoring_and_the_next_answer_is_unchanged(engine, monkeypatch):
    long_prompt = PROMPT + " The capital of Austria is Vienna." * 30
    # the engine thread outlives the client's event loop here; its last events must go nowhere quietly
    thread_errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))

    async def leave_after_start() -> float:
        req = GenerationRequest(request_id="gone", kind=ModelKind.COMPLETION, prompt=long_prompt,
                                params=SamplingParams(max_tokens=0, temperature=0.0, return_logprobs=True,
                                                      prompt_logprobs=True))
        events = engine.generate(req)
        first = await events.__anext__()  # the start: the engine thread is scoring now
        assert first.completion_tokens == 0 and not first.finished
        await events.aclose()
        return first.prompt_tokens

    before = "".join(e.text for e in run(engine, max_tokens=8))
    n_prompt = asyncio.run(leave_after_start())
    assert n_prompt > 10 * N_BATCH
    after = run(engine, max_tokens=8)  # waits for the engine's lock: the scoring must have stopped
    assert "".join(e.text for e in after) == before
    scored = entries(run(engine, max_tokens=0, return_logprobs=True, prompt_logprobs=True))
    assert len(scored) == after[-1].prompt_tokens
    assert thread_errors == []


def test_a_prompt_given_as_token_ids_is_the_same_prompt(engine):
    ids = engine._llm.tokenize(PROMPT.encode(), add_bos=True)
    as_text = run(engine, max_tokens=6, return_logprobs=True, top_logprobs=2, prompt_logprobs=True)

    async def by_ids(token_ids, **params):
        req = GenerationRequest(request_id="ids", kind=ModelKind.COMPLETION, prompt_token_ids=token_ids,
                                params=SamplingParams(temperature=0.0, **params))
        return [ev async for ev in engine.generate(req)]

    as_ids = asyncio.run(by_ids(ids, max_tokens=6, return_logprobs=True, top_logprobs=2, prompt_logprobs=True))
    assert "".join(e.text for e in as_ids) == "".join(e.text for e in as_text)
    assert [(t.token, t.logprob, t.in_prompt) for t in entries(as_ids)] == \
        [(t.token, t.logprob, t.in_prompt) for t in entries(as_text)]
    assert as_ids[-1].prompt_tokens == len(ids) and engine.count_prompt_tokens(
        GenerationRequest(request_id="n", kind=ModelKind.COMPLETION, prompt_token_ids=ids)) == len(ids)
    with pytest.raises(RequestRejectedError) as info:
        asyncio.run(by_ids(ids + [engine._llm.n_vocab()], max_tokens=1))
    assert info.value.param == "prompt" and f"token id {engine._llm.n_vocab()} is not in" in str(info.value)

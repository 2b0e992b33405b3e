"""Energy and carbon reach users of LangChain and LiteLLM, streaming and not, from the real server.

Each library keeps only part of what a server sends (see README, "Client libraries"): these tests
pin down where the figures survive in the versions installed.
"""

from __future__ import annotations

import os

import pytest

from tests.support.server import KEYS

# LiteLLM fetches a price list from the internet at import unless told to use its bundled copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT_MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def _assert_footprint(energy: dict, carbon: dict) -> None:
    assert energy["joules"] > 0 and energy["method"] and energy["scope"], energy
    assert carbon["gco2e"] > 0 and carbon["region"], carbon


@pytest.fixture(scope="module")
def chat(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=CHAT_MODEL, base_url=server.url + "/v1", api_key=KEYS["client"], max_tokens=12,
                      temperature=0, stream_usage=True, max_retries=0, timeout=120)


def test_langchain_invoke_keeps_energy_in_token_usage(chat):
    msg = chat.invoke("Say hello.")
    usage = msg.response_metadata["token_usage"]
    _assert_footprint(usage["energy"], usage["carbon"])


def test_langchain_stream_keeps_energy_in_response_metadata(chat):
    total = None
    for piece in chat.stream("Say hello."):
        total = piece if total is None else total + piece
    assert total is not None and total.content
    assert total.usage_metadata["output_tokens"] > 0
    figures = total.response_metadata["logprobs"]
    _assert_footprint(figures["energy"], figures["carbon"])


def _litellm_kwargs(server) -> dict:
    return dict(model=f"openai/{CHAT_MODEL}", api_base=server.url + "/v1", api_key=KEYS["client"],
                messages=MESSAGES, max_tokens=12, temperature=0)


def test_litellm_completion_keeps_energy_in_usage(server):
    import litellm

    resp = litellm.completion(**_litellm_kwargs(server))
    _assert_footprint(resp.usage.energy, resp.usage.carbon)


def test_litellm_stream_keeps_energy_on_the_finish_chunk(server):
    import litellm

    chunks = list(litellm.completion(**_litellm_kwargs(server), stream=True, stream_options={"include_usage": True}))
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish, chunks
    _assert_footprint(finish[-1].energy, finish[-1].carbon)
    assert any(getattr(c, "usage", None) is not None and c.usage.completion_tokens > 0 for c in chunks)


def test_structured_output_from_langchain_and_the_openai_parse_helper(server):
    """Both send a strict json_schema response_format built from a pydantic model and parse the answer into it."""
    import openai
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        city: str
        country: str

    ask = "What is the capital of France?"
    llm = ChatOpenAI(model=CHAT_MODEL, base_url=server.url + "/v1", api_key=KEYS["client"], max_tokens=64,
                     temperature=0, max_retries=0, timeout=120)
    answer = llm.with_structured_output(City, method="json_schema").invoke(ask)
    assert isinstance(answer, City) and answer.city
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["client"], timeout=120, max_retries=0)
    parsed = client.chat.completions.parse(model=CHAT_MODEL, messages=[{"role": "user", "content": ask}],
                                           response_format=City, max_tokens=64, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, City)
    assert parsed.usage.model_extra["energy"]["joules"] > 0

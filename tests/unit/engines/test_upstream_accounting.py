"""An upstream request's response and ledger row say how its tokens were obtained (no Ray, seconds).

A server that sends no usage leaves the prompt's tokens estimated from its length and the output's
counted from the stream's chunks: usage.prompt_tokens_method and completion_tokens_method name the
estimates (the server's own counts are "server"), the ledger row carries the same names, and the
real openai client still parses the response.
"""

from __future__ import annotations

import asyncio
import pytest

from scheduler.api.serving import Job
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.engines.openai_upstream import JPT_ESTIMATE_METHOD
from tests.support.fake_upstream import WORDS, FakeUpstream
from tests.support.upstream_serving import UpstreamFleet, upstream_config

PROMPT = "say hello to the upstream"  # 25 UTF-8 bytes: 7 tokens by the 4-bytes-per-token estimate
PROMPT_ESTIMATE = 7


@pytest.fixture(scope="module")
def fake():
    with FakeUpstream(stall_seconds=30.0) as server:
        yield server


def job(rid: str, max_tokens: int = 8) -> Job:
    request = GenerationRequest(rid, ModelKind.CHAT, messages=[{"role": "user", "content": PROMPT}],
                                params=SamplingParams(max_tokens=max_tokens))
    return Job(request_id=rid, model="up", request=request, api_key_id="k")


# the fake server's usage reports 7 prompt tokens, like the estimate: only the labels tell them apart
@pytest.mark.parametrize(("mode", "prompt_method", "completion_method"), [
    ("ok", "server", "server"),
    ("ok-nousage", "utf8-bytes-estimate", "stream-chunk-estimate"),
    ("ok-no-prompt-usage", "utf8-bytes-estimate", "server"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_token_counts_name_their_source_in_the_result_and_the_ledger(fake, mode, prompt_method, completion_method,
                                                                     stream):
    async def main():
        fleet = UpstreamFleet(upstream_config([(fake.base_url, mode)]))
        try:
            if stream:
                session = await fleet.serving.open(job("req-1"))
                async for _ in session.deltas():
                    pass
                result = session.result
            else:
                result = await fleet.serving.run(job("req-1"))
            estimated = fleet.engines()[0].prompt_tokens_estimated
            await fleet.serving.settled()
            return result, fleet.rows(), estimated
        finally:
            await fleet.aclose()

    result, rows, estimated = asyncio.run(main())
    assert (result.prompt_tokens, result.completion_tokens) == (PROMPT_ESTIMATE, len(WORDS))
    assert (result.prompt_tokens_method, result.completion_tokens_method) == (prompt_method, completion_method)
    assert [(r["prompt_tokens_method"], r["completion_tokens_method"]) for r in rows] == [
        (prompt_method, completion_method)]
    assert estimated == (prompt_method != "server")


def test_the_openai_client_parses_labelled_usage_from_the_gateway(fake, tmp_path):
    """The real create_app's routes over the upstream serving path, called by the real openai client."""
    import openai
    from fastapi.testclient import TestClient

    from tests.support.gateway_app import KEYS, build

    app, gw = build(tmp_path)
    fleet = UpstreamFleet(upstream_config([(fake.base_url, "ok-nousage")]))
    app.state.serving = fleet.serving
    try:
        with TestClient(app) as http:
            client = openai.OpenAI(base_url=str(http.base_url) + "/v1", api_key=KEYS["client"], http_client=http,
                                   max_retries=0)
            messages = [{"role": "user", "content": PROMPT}]
            done = client.chat.completions.create(model="up", messages=messages, max_tokens=8)
            chunks = list(client.chat.completions.create(model="up", messages=messages, max_tokens=8, stream=True,
                                                         stream_options={"include_usage": True}))
            http.portal.call(fleet.aclose)  # on the app's loop, where the engines' clients were made
    finally:
        gw.close()
    assert done.choices[0].message.content == "".join(WORDS)
    assert done.usage.prompt_tokens == PROMPT_ESTIMATE and done.usage.total_tokens == PROMPT_ESTIMATE + len(WORDS)
    assert done.usage.prompt_tokens_method == "utf8-bytes-estimate"  # an extra field, kept by the client
    assert done.usage.completion_tokens_method == "stream-chunk-estimate"
    assert done.usage.model_extra["energy"]["method"] == JPT_ESTIMATE_METHOD
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(WORDS)
    assert (usage.prompt_tokens_method, usage.completion_tokens_method) == ("utf8-bytes-estimate",
                                                                            "stream-chunk-estimate")

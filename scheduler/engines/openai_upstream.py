"""The `openai` engine: one replica fronts one OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama).

Every request goes upstream as a streaming request (chat or completion) over one shared httpx
AsyncClient, whose connections are kept (each response is read to its end, past [DONE]), and each
content chunk comes back as an EngineEvent as it arrives, so the replica reports the work to its node
agent as it happens, exactly as for a local engine. Usage is the server's when it sends it
(stream_options.include_usage); otherwise output tokens are the content chunks counted and prompt
tokens an estimate from the prompt's length (counted in the replica's stats as
`prompt_tokens_estimated`). Each count names its source in its events (TokenCountMethod:
"server", or the estimate's name), which the response's usage and the ledger row carry.

Load: where the server publishes it (vLLM, SGLang, TGI and llama.cpp's /metrics, llama.cpp's /slots,
or an endpoint's metrics_url), a ServerLoadPoller (upstream_load.py) scrapes it from the first
request on, and stats() publishes the server's running, waiting and KV-cache figures over the
replica's own in-flight counts.

A client that leaves before the first token still cost the server the prompt's prefill once the whole
request reached it (httpx's trace of the request body): the engine keeps that prompt's count for its
replica (take_unreported_work), which charges it like any other work of the request.

Failures: anything that is not the client's fault (no connection, a stall past the read timeout, a
5xx, bad JSON, broken SSE, a server serving another model) raises EngineError and counts against
the endpoint's health (EndpointHealth: ejection, re-admission by health check with exponential
backoff); the server's 400 raises RequestRejectedError with its message, for a 400 to the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx

from scheduler.config import (
    CPU_DEVICE_ID,
    NVML_DEVICE_ID,
    ModelConfig,
    UpstreamEndpointConfig,
    UpstreamOptions,
    WattlaneConfig,
)
from scheduler.devices.resolve import is_node_local_name
from scheduler.engines.base import (
    Engine,
    EngineError,
    EngineEvent,
    GenerationRequest,
    ModelKind,
    ReplicaStats,
    RequestRejectedError,
    TokenCountMethod,
    TokenLogprob,
)
from scheduler.engines.upstream_health import EndpointHealth, HealthChecker
from scheduler.engines.upstream_load import SERVER_KINDS, ServerLoad, ServerLoadPoller, server_root, to_replica_stats

log = logging.getLogger(__name__)
# httpx logs every request at INFO: a health check every second per endpoint would drown the replica's log
logging.getLogger("httpx").setLevel(logging.WARNING)

#: the method name of energy estimated from a joules-per-token profile (no meter on the server's host)
JPT_ESTIMATE_METHOD = "upstream-jpt-estimate"
#: a prompt's tokens, when the server reports none, estimated as its UTF-8 bytes / this
BYTES_PER_PROMPT_TOKEN_ESTIMATE = 4.0
#: most of an error body read from the server (it goes into the client's message)
MAX_ERROR_BODY_BYTES = 4096
#: a server load scraped longer ago than this is stale: the replica's own counts stand instead
LOAD_MAX_AGE_SECONDS = 5.0
#: longest wait, after [DONE], for the end of the response: read to its end, the connection goes back to the
#: pool; left unread, httpx closes it and the next request connects again (a TCP, and for https a TLS, handshake).
#: The openai client drains the same way, for as long.
REST_AFTER_DONE_SECONDS = 0.1
#: most stopped requests whose prompt the server had, kept for the replica to take (it takes each at once)
MAX_UNREPORTED_REQUESTS = 1024
#: OpenAI's finish reasons that the engine interface knows; others (tool_calls, ...) end as "stop"
_FINISH = {"stop": "stop", "length": "length"}


class UpstreamEngine(Engine):
    """One OpenAI-compatible endpoint as an Engine (see the module docstring)."""

    def __init__(self, model_id: str, kind: ModelKind, endpoint: UpstreamEndpointConfig,
                 options: UpstreamOptions, *, context_length: int, api_key: str | None = None,
                 joules_per_prompt_token: float = 0.0, joules_per_output_token: float = 0.0,
                 node: str = "", health_checks: bool = True):
        self.model_id, self.kind, self.context_length = model_id, kind, context_length
        self.endpoint, self.options = endpoint, options
        self.base_url = endpoint.base_url.rstrip("/")
        self.served_model_name = endpoint.served_model_name
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.joules_per_prompt_token, self.joules_per_output_token = joules_per_prompt_token, joules_per_output_token
        self.node = node
        #: what the estimate covers (usage.energy.scope), from the devices the endpoint declares
        self.energy_scope = estimate_scope(endpoint.devices)
        self.health = EndpointHealth(options.ejection_base_seconds, options.ejection_max_seconds)
        self._client: httpx.AsyncClient | None = None
        self._checker: HealthChecker | None = None
        self._health_checks = health_checks
        self.waiting = 0  # sent, no token back yet
        self.running = 0  # streaming tokens
        self.prompt_tokens_estimated = 0  # requests whose prompt tokens the server did not report
        self.requests_completed = 0
        self._decode_seconds_per_token: float | None = None
        #: request id -> the prompt the server was sent for a request stopped before its first token
        self._unreported: dict[str, EngineEvent] = {}
        #: the server's own load from its /metrics (and llama.cpp's /slots), where it has them
        self.load_poller: ServerLoadPoller | None = None
        if endpoint.metrics_url or endpoint.server in SERVER_KINDS:
            root = server_root(self.base_url)
            self.load_poller = ServerLoadPoller(
                endpoint.metrics_url or root + "/metrics", server=endpoint.server,
                slots_url=root + "/slots" if endpoint.server == "llamacpp" else None,
                timeout_seconds=options.health_check_timeout_seconds, model_name=self.served_model_name,
                headers=self.headers)

    # --- connection ------------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        """The replica's one client, made in the running loop on first use (the constructor has none)."""
        if self._client is None:
            o = self.options
            self._client = httpx.AsyncClient(
                headers=self.headers,
                timeout=httpx.Timeout(connect=o.connect_timeout_seconds, read=o.read_timeout_seconds,
                                      write=o.read_timeout_seconds, pool=o.connect_timeout_seconds),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    def start_health_checks(self) -> None:
        if self._health_checks and self._checker is None:
            self._checker = HealthChecker(self.base_url, self.headers, self.options, self.health)
            self._checker.start()

    def _fail(self, message: str) -> EngineError:
        """An endpoint failure: it counts against the endpoint's health, and becomes the replica's error."""
        if self.health.failed(message):
            log.warning("endpoint %s ejected: %s", self.base_url, message)
        return EngineError(f"upstream {self.base_url}: {message}")

    # --- generation ------------------------------------------------------------------------------
    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {"model": self.served_model_name, "stream": True,
                                "stream_options": {"include_usage": True},
                                "temperature": p.temperature, "top_p": p.top_p}
        if request.kind == ModelKind.CHAT:
            body["messages"] = request.messages or []
        else:
            body["prompt"] = request.prompt or ""
        if p.max_tokens:
            body["max_tokens"] = p.max_tokens
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = p.stop
        # the server honours these itself (supports_json says it does for response_format); sent only when
        # asked for, so a server that lacks one still takes every other request
        if p.response_format is not None:
            body["response_format"] = p.response_format
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
        if p.return_logprobs:
            if request.kind == ModelKind.CHAT:
                body["logprobs"] = True
                if p.top_logprobs:
                    body["top_logprobs"] = p.top_logprobs
            else:
                body["logprobs"] = p.top_logprobs
        return body

    def _estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        if request.prompt_tokens_hint is not None:
            return request.prompt_tokens_hint
        text = request.prompt if request.kind == ModelKind.COMPLETION else "".join(
            str(m.get("content") or "") for m in request.messages or [])
        return max(1, math.ceil(len((text or "").encode("utf-8")) / BYTES_PER_PROMPT_TOKEN_ESTIMATE))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        if request.params.prompt_logprobs or request.params.max_tokens == 0:
            # servers differ here (llama.cpp's ignores echo; vLLM scores the prompt): never a half answer
            raise RequestRejectedError(f"model {self.model_id} is served upstream: scoring a prompt (echo with "
                                       "logprobs, or max_tokens 0) needs a llama.cpp model", param="echo")
        if request.prompt_token_ids is not None:
            # servers differ: vLLM and llama-server take ids, llama-cpp-python's server answers them with a 500,
            # which would read as a failing server (ejected, retried) for what is the request's shape
            raise RequestRejectedError(f"model {self.model_id} is served upstream: send the prompt as text (a "
                                       "token-id prompt needs a llama.cpp model)", param="prompt")
        self.start_health_checks()
        if self.load_poller is not None:
            self.load_poller.start()  # needs the replica's running loop, which the constructor has not
        if self.health.ejected:
            raise EngineError(f"upstream {self.base_url} is ejected ({self.health.reason}); "
                              f"re-checked in {self.health.seconds_to_recheck():.1f} s")
        path = "/v1/chat/completions" if request.kind == ModelKind.CHAT else "/v1/completions"
        prompt_estimate = self._estimate_prompt_tokens(request)
        prompt_tokens, completion_tokens = prompt_estimate, 0
        # until the server's usage arrives (at the end, if at all) both counts are estimates
        prompt_method = (TokenCountMethod.REQUEST_HINT if request.prompt_tokens_hint is not None
                         else TokenCountMethod.BYTES_ESTIMATE).value
        completion_method = TokenCountMethod.CHUNK_ESTIMATE.value
        usage: dict[str, Any] | None = None
        finish_reason: str | None = None
        last_token_s: float | None = None
        #: token log-probabilities the server sent that no event has carried yet (a chunk may have no text)
        logprobs: list[TokenLogprob] = []
        self.waiting += 1
        streaming = False
        sent = False  # the whole request reached the server: from here it is prefilling the prompt

        async def trace(name: str, info: dict[str, Any]) -> None:
            nonlocal sent
            if name.endswith(".send_request_body.complete"):  # http11. or http2.
                sent = True

        try:
            async with self.client().stream("POST", self.base_url + path, json=self._body(request),
                                            extensions={"trace": trace}) as resp:
                if resp.status_code != 200:
                    await self._raise_for_status(resp)
                # closed here, not left to the loop's async-generator finalizer (one task more per request)
                async with aclosing(self._chunks(resp)) as chunks:
                    async for chunk in chunks:
                        if chunk is _DONE:
                            break
                        self._check_chunk(chunk)
                        if isinstance(chunk.get("usage"), dict):
                            usage = chunk["usage"]
                        text, reason = self._choice(chunk, request.kind)
                        finish_reason = reason or finish_reason
                        if request.params.return_logprobs:
                            logprobs.extend(_chunk_logprobs(chunk))
                        if text:
                            now = time.time()
                            if not streaming:
                                streaming = True
                                self.waiting -= 1
                                self.running += 1
                            elif last_token_s is not None:
                                self._learn_decode_step(now - last_token_s)
                            last_token_s = now
                            completion_tokens += 1
                            yield EngineEvent(text=text, prompt_tokens=prompt_tokens,
                                              completion_tokens=completion_tokens, time_s=now,
                                              prompt_tokens_method=prompt_method,
                                              completion_tokens_method=completion_method,
                                              token_logprobs=logprobs or None)
                            logprobs = []
                    else:
                        if finish_reason is None:
                            raise self._fail("the stream ended without [DONE] or a finish_reason (broken SSE)")
        except httpx.TimeoutException as exc:
            what = "connecting" if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)) else "waiting for data"
            limit = self.options.connect_timeout_seconds if what == "connecting" else self.options.read_timeout_seconds
            raise self._fail(f"timed out {what} (limit {limit:g} s)") from None
        except httpx.ConnectError as exc:
            raise self._fail(f"cannot connect ({exc})") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise self._fail(f"the connection broke mid-response ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise self._fail(f"HTTP failure ({type(exc).__name__}: {exc})") from None
        except (asyncio.CancelledError, GeneratorExit):
            if sent and not streaming:  # the replica has no event of this request to count its prompt from
                self._keep_unreported(request.request_id, EngineEvent(
                    text="", prompt_tokens=prompt_tokens, completion_tokens=0, time_s=time.time(),
                    prompt_tokens_method=prompt_method, completion_tokens_method=completion_method))
            raise
        finally:
            if streaming:
                self.running -= 1
            else:
                self.waiting -= 1
        server, usage = TokenCountMethod.SERVER.value, usage or {}
        if _count(usage.get("prompt_tokens")):
            prompt_tokens, prompt_method = _count(usage["prompt_tokens"]), server
        if _count(usage.get("completion_tokens")):
            completion_tokens, completion_method = _count(usage["completion_tokens"]), server
        if prompt_method != server:
            self.prompt_tokens_estimated += 1
        self.health.succeeded()
        self.requests_completed += 1
        yield EngineEvent(text="", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          time_s=time.time(), finished=True, finish_reason=_FINISH.get(finish_reason or "", "stop"),
                          prompt_tokens_method=prompt_method, completion_tokens_method=completion_method,
                          token_logprobs=logprobs or None)

    async def _raise_for_status(self, resp: httpx.Response) -> None:
        body = b""
        async for part in resp.aiter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
        message, param, code = _error_fields(body[:MAX_ERROR_BODY_BYTES])
        status = resp.status_code
        if status in (400, 413, 422):
            # the client's request: the server's words, for a 400 in the OpenAI envelope
            if code is None and "context" in message.lower():
                code = "context_length_exceeded"
            raise RequestRejectedError(f"upstream rejected the request: {message}", param=param, code=code)
        if status == 404 and "model" in message.lower():
            raise self._fail(f"does not serve model '{self.served_model_name}' ({message})")
        if status in (401, 403):
            raise self._fail(f"refused the API key ({status}: {message}); check api_key_env")
        raise self._fail(f"answered {status}: {message}")

    async def _chunks(self, resp: httpx.Response) -> AsyncIterator[Any]:
        """The JSON payloads of a Server-Sent Events stream, then _DONE (if the server sent [DONE])."""
        data: list[str] = []
        lines = resp.aiter_lines()
        async for line in lines:
            if line == "":
                if data:
                    payload = self._payload("\n".join(data))
                    data = []
                    if payload is _DONE:
                        await _read_rest(lines)
                        yield _DONE
                        return
                    yield payload
                continue
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line.startswith((":", "event:", "id:", "retry:")):
                continue  # comments and fields the OpenAI stream does not use
            else:
                raise self._fail(f"sent a line that is not Server-Sent Events: {line[:80]!r}")
        if data:
            yield self._payload("\n".join(data))

    def _payload(self, data: str) -> Any:
        if data.strip() == "[DONE]":
            return _DONE
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._fail(f"sent a chunk that is not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise self._fail(f"sent a chunk that is not a JSON object: {data[:80]!r}")
        return chunk

    def _check_chunk(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise self._fail(f"reported an error mid-stream: {str(msg)[:200]}")
        model = chunk.get("model")
        # TGI names its own model whatever the request said; the others echo the served name
        if model is not None and self.endpoint.server != "tgi" and model != self.served_model_name:
            raise self._fail(f"serves model '{model}', not '{self.served_model_name}' (check served_model_name)")

    def _choice(self, chunk: dict[str, Any], kind: ModelKind) -> tuple[str, str | None]:
        choices = chunk.get("choices")
        if choices is None or choices == []:
            return "", None  # the usage-only chunk
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise self._fail("sent a chunk whose 'choices' is not a list of objects")
        c = choices[0]
        if kind == ModelKind.CHAT:
            delta = c.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = c.get("text")
        if text is not None and not isinstance(text, str):
            raise self._fail("sent a chunk whose text is not a string")
        reason = c.get("finish_reason")
        return text or "", reason if isinstance(reason, str) else None

    def _keep_unreported(self, request_id: str, work: EngineEvent) -> None:
        self._unreported[request_id] = work
        while len(self._unreported) > MAX_UNREPORTED_REQUESTS:  # a caller that never takes them (not a replica)
            del self._unreported[next(iter(self._unreported))]

    def take_unreported_work(self, request_id: str) -> EngineEvent | None:
        """The prompt of a request stopped after it reached the server and before its first token.

        Charged whole: the server may not have finished prefilling it, but no server tells how far it got,
        and servers finish the prefill step they have started (docs/energy.md: a client that leaves before the
        first token)."""
        return self._unreported.pop(request_id, None)

    def _learn_decode_step(self, seconds: float) -> None:
        prev = self._decode_seconds_per_token
        self._decode_seconds_per_token = seconds if prev is None else 0.9 * prev + 0.1 * seconds

    # --- figures ---------------------------------------------------------------------------------
    def stats(self) -> ReplicaStats:
        stats = ReplicaStats(running=self.running, waiting=self.waiting, ejected=self.health.ejected,
                             requests_completed=self.requests_completed)
        if self._decode_seconds_per_token is not None:
            stats["decode_seconds_per_token"] = self._decode_seconds_per_token
        # --- the one place the server's own load overrides what this replica saw -----------------
        # (running, waiting and KV cache from the server's metrics when a recent scrape has them; each
        # figure the server does not expose stays ours)
        load = self.server_load()
        if load is not None:
            stats.update(to_replica_stats(load))
        return stats

    def server_load(self) -> ServerLoad | None:
        """The server's latest load, if scraped within LOAD_MAX_AGE_SECONDS."""
        p = self.load_poller
        age = None if p is None else p.age_seconds()
        return p.latest if p is not None and age is not None and age <= LOAD_MAX_AGE_SECONDS else None

    def estimate_energy(self, prompt_tokens: int, completion_tokens: int) -> Any:
        """The energy of a request no node agent metered: the joules-per-token profile, labelled so."""
        from scheduler.cluster.messages import EnergyReport

        dynamic = prompt_tokens * self.joules_per_prompt_token + completion_tokens * self.joules_per_output_token
        return EnergyReport(joules=dynamic, dynamic_joules=dynamic, idle_joules=0.0, method=JPT_ESTIMATE_METHOD,
                            scope=self.energy_scope, device=",".join(self.endpoint.devices), node=self.node,
                            metered=True, complete=True, work_tokens=float(prompt_tokens + completion_tokens))

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.stop_event.set()
        if self.load_poller is not None:
            await self.load_poller.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


_DONE: Any = object()


def estimate_scope(devices: Sequence[str]) -> str:
    """What an estimate for a server on `devices` covers: "gpu" (gpuN, an NVML index or a GPU UUID), "cpu"
    (cpu0), "cpu+gpu" for a server on both, "unknown" where a name is neither (the config allows none such)."""
    kinds = set()
    for name in devices:
        if name == CPU_DEVICE_ID:
            kinds.add("cpu")
        elif NVML_DEVICE_ID.match(name) or is_node_local_name(name):
            kinds.add("gpu")
        else:
            return "unknown"
    return "+".join(sorted(kinds)) or "unknown"


def _count(value: Any) -> int:
    """A token count from a usage report; 0 when it has none (some servers send 0 for a count they do not keep)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


async def _read_rest(lines: AsyncIterator[str]) -> None:
    """Read what follows [DONE], normally only the end of the chunked body, so that the connection is kept.

    Nothing after [DONE] counts; a server that holds the response open past REST_AFTER_DONE_SECONDS, or
    breaks it, costs only the connection, which httpx then closes."""
    try:
        async with asyncio.timeout(REST_AFTER_DONE_SECONDS):
            async for _ in lines:
                await asyncio.sleep(0)  # the deadline holds even where the lines come from a buffer
    except (TimeoutError, httpx.HTTPError) as exc:
        log.debug("the response after [DONE] did not end cleanly (%s); its connection is closed", type(exc).__name__)


def _error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an error body: the OpenAI envelope, FastAPI's detail, or the text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(no body)", None, None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("error") or text
            code = err.get("code")
            return str(msg)[:500], err.get("param") if isinstance(err.get("param"), str) else None, \
                str(code) if isinstance(code, str) else None
        if isinstance(err, str):
            return err[:500], None, None
    return text[:500], None, None


def build_upstream_engine(model: ModelConfig, config: WattlaneConfig, state_dir: Path, devices: dict | None = None,
                          replica_index: int = 0) -> UpstreamEngine:
    """The engine of replica `replica_index`: the model's endpoint of the same index."""
    from scheduler.cluster.runtime import node_name
    from scheduler.config_error import ConfigError
    from scheduler.routing.placement import prior_joules_per_token

    endpoint = model.endpoints[replica_index % len(model.endpoints)]
    api_key = None
    if endpoint.api_key_env:
        api_key = os.environ.get(endpoint.api_key_env)
        if not api_key:
            raise ConfigError(
                f"environment variable {endpoint.api_key_env} (the API key of {endpoint.base_url}) is not set",
                file=config.source_path or "config", key=f"models (id {model.id}).endpoints.api_key_env",
                fix=f"export {endpoint.api_key_env} where the replica runs, or remove api_key_env")
    o = model.upstream
    prior_prompt, prior_output = prior_joules_per_token(model.params_b)
    jp, jo = o.estimate_joules_per_prompt_token, o.estimate_joules_per_output_token
    engine = UpstreamEngine(
        model.id, ModelKind(model.kind), endpoint, o, context_length=model.context_length, api_key=api_key,
        joules_per_prompt_token=prior_prompt if jp is None else jp,
        joules_per_output_token=prior_output if jo is None else jo,
        node=endpoint.node or node_name(),
    )
    engine.start_health_checks()  # from the start: an endpoint that is down is out before a request meets it
    return engine


def _chunk_logprobs(chunk: dict[str, Any]) -> list[TokenLogprob]:
    """A streamed chunk's token log-probabilities, from either OpenAI shape: chat (logprobs.content, one entry
    per token with its top_logprobs) or legacy completions (parallel tokens / token_logprobs / top_logprobs)."""
    choices = chunk.get("choices") or []
    lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
    if not isinstance(lp, dict):
        return []

    def raw(token: str, given: Any) -> bytes:
        return bytes(given) if isinstance(given, list) else token.encode("utf-8")

    out = []
    if isinstance(lp.get("content"), list):
        for e in lp["content"]:
            if isinstance(e, dict) and isinstance(e.get("token"), str) and isinstance(e.get("logprob"), (int, float)):
                top = tuple((a["token"], float(a["logprob"]), raw(a["token"], a.get("bytes")))
                            for a in e.get("top_logprobs") or [] if isinstance(a, dict) and "token" in a and "logprob" in a)
                out.append(TokenLogprob(e["token"], float(e["logprob"]), raw(e["token"], e.get("bytes")), top))
        return out
    tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    for token, value, top in zip(tokens, values, tops):
        if isinstance(token, str) and isinstance(value, (int, float)):
            alts = tuple((a, float(v), a.encode("utf-8")) for a, v in (top or {}).items())
            out.append(TokenLogprob(token, float(value), token.encode("utf-8"), alts))
    return out

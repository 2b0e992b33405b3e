"""A minimal OpenAI-compatible streaming TEST server for scripts/gpu/upstream_check.py; not a product engine.

It exists so the upstream check has a server to front on a GPU machine where neither vLLM, SGLang nor
llama.cpp's server is installed (and none may be downloaded). It answers /v1/chat/completions and
/v1/completions with Server-Sent Events as OpenAI does (usage in the last chunk), /v1/models and
/health; it has no tokenizer: a prompt is counted as its UTF-8 bytes / 4 tokens of random ids, and
each output token is sent as the text " t<id>". Two backends:

- TorchLlamaBackend: a Llama-3.1-8B-shaped LlamaForCausalLM (transformers) with random bf16 weights
  on the GPU, the model scripts/gpu/gpu_run.py measures; greedy decoding with a KV cache, one request
  at a time (no batching: concurrent requests queue), eager PyTorch.
- SimulatedBackend: no model runs; a simulated GPU (scheduler/devices/simulated.py) is set busy while
  requests are in flight, tokens come at a fixed step time. For CI (method "simulated").

Run in-process on a thread (TestOpenAIServer), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

BYTES_PER_TOKEN = 4.0


class Backend(Protocol):
    label: str

    def generate(self, prompt_tokens: int, max_tokens: int) -> AsyncIterator[str]: ...


def prompt_token_count(text: str) -> int:
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


class SimulatedBackend:
    """Tokens at a fixed step; the simulated GPU draws more while more requests are in flight."""

    label = ("TEST SERVER (simulated backend): no model runs; a simulated GPU is set busy while requests are in "
             "flight and tokens come every step_seconds")

    def __init__(self, gpu: Any, step_seconds: float = 0.004, prefill_seconds_per_token: float = 0.00002):
        self.gpu, self.step_seconds, self.prefill_seconds_per_token = gpu, step_seconds, prefill_seconds_per_token
        self.active = 0
        self._lock = threading.Lock()

    def _set_power(self) -> None:
        p = self.gpu.profile
        if self.active == 0:
            self.gpu.set_idle()
            return
        idle = self.gpu.idle_power_watts()
        # a batch of n draws more than one request, less than n times as much (weights are read once per step)
        share = min(1.0, 0.45 + 0.08 * self.active)
        self.gpu.set_busy(power_watts=idle + (p.power_limit_default_watts - idle) * share,
                          clock_mhz=p.sm_clock_max_mhz, capped=False)

    async def generate(self, prompt_tokens: int, max_tokens: int) -> AsyncIterator[str]:
        with self._lock:
            self.active += 1
            self._set_power()
        try:
            await asyncio.sleep(prompt_tokens * self.prefill_seconds_per_token)
            for i in range(max_tokens):
                await asyncio.sleep(self.step_seconds)
                yield f" t{i}"
        finally:
            with self._lock:
                self.active -= 1
                self._set_power()


class TorchLlamaBackend:
    """The Llama-3.1-8B-shaped model with random bf16 weights on one CUDA device; one request at a time."""

    label = ("TEST SERVER (torch backend): Llama-3.1-8B-shaped LlamaForCausalLM (transformers), random bf16 "
             "weights, greedy decoding with a KV cache, eager PyTorch, one request at a time (no batching)")

    def __init__(self, torch: Any, transformers: Any, config: dict[str, Any], device: str = "cuda:0",
                 dtype: str = "bfloat16"):
        self.torch, self.tf, self.config = torch, transformers, config
        self.device = torch.device(device)
        cfg = transformers.LlamaConfig(**config, torch_dtype=dtype, attn_implementation="sdpa")
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            with torch.device(self.device):  # initialise the weights where they run (seconds, not minutes)
                self.model = transformers.LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        self._gpu_lock = threading.Lock()

    def _run(self, prompt_tokens: int, max_tokens: int, emit: Any) -> None:
        torch = self.torch
        with self._gpu_lock, torch.inference_mode():
            ids = torch.randint(0, self.config["vocab_size"], (1, prompt_tokens), device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(max_tokens):
                emit(int(tok.item()))  # .item() waits for the GPU: the token exists when it is sent
                out = self.model(input_ids=tok, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
        emit(None)

    async def generate(self, prompt_tokens: int, max_tokens: int) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        task = loop.run_in_executor(None, self._run, prompt_tokens, max_tokens,
                                    lambda t: loop.call_soon_threadsafe(queue.put_nowait, t))
        while (tok := await queue.get()) is not None:
            yield f" t{tok}"
        await task


def _chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> str:
    if usage is not None:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "model": model, "choices": [], "usage": usage}
    else:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text} if text is not None else {}
        else:
            choice["text"] = text or ""
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "model": model,
                "created": int(time.time()), "choices": [choice]}
    return "data: " + json.dumps(body) + "\n\n"


class TestOpenAIServer:
    """The server on a free loopback port, on a thread of this process."""

    __test__ = False  # a server, not a pytest test class

    def __init__(self, backend: Backend, served_model_name: str, default_max_tokens: int = 16):
        self.backend, self.served_model_name, self.default_max_tokens = backend, served_model_name, default_max_tokens
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._n = 0
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._generate, methods=["POST"]),
            Route("/v1/completions", self._generate, methods=["POST"]),
            Route("/v1/models", self._models),
            Route("/health", self._health),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="test-openai-server", daemon=True)

    def __enter__(self) -> "TestOpenAIServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.served_model_name, "object": "model"}]})

    async def _generate(self, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "body is not JSON", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        chat = request.url.path.endswith("/chat/completions")
        if body.get("model") != self.served_model_name:
            return JSONResponse({"error": {"message": f"model '{body.get('model')}' does not exist",
                                           "type": "invalid_request_error", "param": "model", "code": None}},
                                status_code=404)
        text = "".join(str(m.get("content") or "") for m in body.get("messages") or []) if chat \
            else str(body.get("prompt") or "")
        prompt_tokens = prompt_token_count(text)
        max_tokens = int(body.get("max_tokens") or self.default_max_tokens)
        self._n += 1
        rid = f"test-{self._n}"
        model = self.served_model_name

        async def stream() -> AsyncIterator[str]:
            n = 0
            async for piece in self.backend.generate(prompt_tokens, max_tokens):
                n += 1
                yield _chunk(rid, model, chat, piece)
            yield _chunk(rid, model, chat, None, finish="length" if n >= max_tokens else "stop")
            yield _chunk(rid, model, chat, None, usage={"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                        "total_tokens": prompt_tokens + n})
            yield "data: [DONE]\n\n"

        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this test server streams only (\"stream\": true)",
                                           "type": "invalid_request_error", "param": "stream", "code": None}},
                                status_code=400)
        return StreamingResponse(stream(), media_type="text/event-stream")

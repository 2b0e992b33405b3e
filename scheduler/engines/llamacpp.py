"""llama.cpp engine (llama-cpp-python): runs a GGUF model on the CPU, one generation at a time.

We drive Llama.generate() token by token instead of create_completion() so that token counts,
per-token timestamps and stop-sequence handling are exact: the energy attribution and the TTFT/TPOT
figures depend on them. One llama.cpp context cannot run two generations at once, so requests
queue on a lock; `waiting` in stats() counts them.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from scheduler.config import ModelConfig, WattlaneConfig
from scheduler.config_error import ConfigError
from scheduler.engines.base import (
    ContextLengthError,
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
from scheduler.weights import resolve_weights

log = logging.getLogger(__name__)

#: prompt tokens decoded at once when a prompt is scored: llama.cpp keeps an output buffer of this many rows of
#: logits for the context's lifetime (64 x Gemma's 262,144-token vocabulary: 67 MB; the engine's n_batch of 256
#: would hold 268 MB)
SCORE_BATCH_TOKENS = 64
#: prompt positions whose log-softmax is computed at once (bounds the copy's size the same way)
SCORE_ROWS_AT_ONCE = 32


class LlamaCppEngine(Engine):
    token_counts_method = TokenCountMethod.TOKENIZER.value

    def __init__(
        self,
        model_id: str,
        kind: ModelKind,
        weights_path: Path,
        context_length: int,
        n_threads: int | None = None,
        n_batch: int = 256,
    ):
        from llama_cpp import Llama  # imported here: the package is optional (extra "local")

        self.model_id = model_id
        self.kind = kind
        self.context_length = context_length
        self._llm = Llama(
            model_path=str(weights_path),
            n_ctx=context_length,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=n_batch,
            verbose=False,
        )
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._completed = 0
        self._recent: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=200)
        #: response_format (as sorted JSON) -> its checked grammar, oldest first
        self._grammars: dict[str, Any] = {}
        self.system_fingerprint = _fingerprint(weights_path, context_length=context_length, n_threads=n_threads, n_batch=n_batch)
        self._formatter = self._chat_formatter() if kind == ModelKind.CHAT else None
        if kind == ModelKind.CHAT and self._formatter is None:
            raise EngineError(f"model {model_id}: the GGUF file has no chat template; configure it as kind: completion")

    # --- prompt handling ----------------------------------------------------------------------
    def _chat_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        vocab = self._llm
        bos = vocab.detokenize([vocab.token_bos()], special=True).decode("utf-8", "ignore") if vocab.token_bos() >= 0 else ""
        eos = vocab.detokenize([vocab.token_eos()], special=True).decode("utf-8", "ignore") if vocab.token_eos() >= 0 else ""
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """Tokenise the prompt; for chat, apply the model's own chat template first."""
        if request.kind == ModelKind.CHAT:
            if self._formatter is None:
                raise EngineError(f"model {self.model_id} has no chat template")
            result = self._formatter(messages=request.messages or [])
            text = result.prompt
            extra_stop = list(result.stop or []) if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
            add_bos = not getattr(result, "added_special", False)
            return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True), extra_stop
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids), []  # the client's ids, as given (checked in generate)
        ids = self._llm.tokenize((request.prompt or "").encode("utf-8"), add_bos=True, special=False)
        if not ids:
            # an empty prompt means "start of a document", as in OpenAI's completions (whose default prompt is
            # <|endoftext|>); a model whose vocabulary adds no BOS would otherwise have nothing to condition on
            llm = self._llm
            ids = [llm.token_bos() if llm.token_bos() >= 0 else llm.token_eos()]
        return ids, []

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self._prompt_tokens(request)[0])

    # --- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        prompt_ids, template_stops = self._prompt_tokens(request)
        n_prompt = len(prompt_ids)
        if request.params.max_tokens is None:
            if n_prompt >= self.context_length:
                raise ContextLengthError(n_prompt, 1, self.context_length)
            request.params.max_tokens = self.resolve_max_tokens(request, n_prompt)
        elif n_prompt + request.params.max_tokens > self.context_length:
            raise ContextLengthError(n_prompt, request.params.max_tokens, self.context_length)
        # checked before the request queues: a schema that cannot become a grammar is the client's 400 now
        grammar = self._grammar(request.params.response_format)
        if request.prompt_token_ids is not None:
            self._check_vocabulary(prompt_ids, "prompt")
        if request.params.logit_bias:
            self._check_vocabulary(request.params.logit_bias, "logit_bias")

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: EngineEvent | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop has closed: it left, and nobody reads this
                cancel.set()

        def work() -> None:
            try:
                self._run(request, prompt_ids, template_stops, emit, cancel, grammar)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)

        self._waiting += 1
        thread = threading.Thread(target=work, name=f"llama-{request.request_id}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            cancel.set()

    def _run(self, request, prompt_ids, template_stops, emit, cancel: threading.Event, grammar: Any = None) -> None:
        params = request.params
        stops = [s for s in (params.stop or []) + template_stops if s]
        with self._lock:
            self._waiting -= 1
            self._running += 1
            started = time.time()
            try:
                self._generate_locked(request, prompt_ids, stops, emit, cancel, started, grammar)
            finally:
                self._running -= 1

    def _generate_locked(self, request, prompt_ids, stops, emit, cancel, started: float, grammar: Any = None) -> None:
        import llama_cpp

        llm = self._llm
        params = request.params
        n_prompt = len(prompt_ids)
        # Same request + same seed -> same text, whatever ran before (README, reproducible output).
        # llama-cpp-python keeps the last seed set, so an unseeded request would reuse it.
        llm.set_seed(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        if params.seed is not None or params.temperature <= 0:
            # generate() reuses the longest prefix cached by the previous request and evaluates only
            # the rest; a prompt evaluated in pieces gets logits up to ~0.8 apart (SmolLM2 Q4_1),
            # enough to change a sampled or even a greedy token. A request that asks for a
            # reproducible answer pays for one full prefill; a random one keeps the cache.
            llm.reset()
        # the start event carries the prompt tokens, so attribution sees prefill work at once
        emit(EngineEvent(text="", prompt_tokens=n_prompt, completion_tokens=0, time_s=started))
        # the prompt's own log-probabilities (echo): they ride on the first event after the start
        pending_entries: list[TokenLogprob] = []
        if params.prompt_logprobs:
            pending_entries = self._score_prompt(prompt_ids, params.top_logprobs, cancel)
            # generation evaluates the prompt again in its own batches: scored in smaller ones, its logits may
            # differ slightly, and the output must be what the same request without echo gives
            llm.reset()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        completion_ids: list[int] = []
        text_out = ""  # text already emitted
        pending = ""  # decoded text held back because it may start a stop sequence
        finish_reason = "length"
        logprob_sum = 0.0
        vocab = llm._model.vocab
        forced = params.force_output_tokens
        limit = forced if forced is not None else params.max_tokens
        if limit == 0 or cancel.is_set():
            # max_tokens 0 (echo): the prompt alone, scored above when asked; nothing is generated
            self._finish(emit, started, n_prompt, 0, "length" if limit == 0 else "stop", None, pending_entries)
            return
        gen = llm.generate(
            prompt_ids,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=40 if params.temperature > 0 else 1,
            min_p=0.05,
            repeat_penalty=1.0,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=_logit_bias_processor(params.logit_bias),
            grammar=grammar,
            reset=True,
        )
        try:
            for token in gen:
                if cancel.is_set():
                    finish_reason = "stop"
                    break
                now = time.time()
                if forced is None and llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                piece = llm.detokenize([token], prev_tokens=prompt_ids + completion_ids)
                completion_ids.append(token)
                entry = None
                if params.logprobs or params.return_logprobs:
                    logprob, entry = self._token_logprob(token, piece, params.top_logprobs if params.return_logprobs else 0)
                    logprob_sum += logprob
                pending += decoder.decode(piece)
                emit_text, pending, hit_stop = _split_on_stops(pending, stops)
                text_out += emit_text
                done = hit_stop or len(completion_ids) >= limit
                if hit_stop:
                    finish_reason = "stop"
                emit(
                    EngineEvent(
                        text=emit_text,
                        prompt_tokens=n_prompt,
                        completion_tokens=len(completion_ids),
                        time_s=now,
                        mean_logprob=(logprob_sum / len(completion_ids)) if params.logprobs else None,
                        token_logprobs=(pending_entries + [entry]) if params.return_logprobs and entry is not None
                        else None,
                    )
                )
                pending_entries = []
                if done:
                    break
        finally:
            gen.close()
        if finish_reason != "stop" or not stops:
            tail = pending + decoder.decode(b"", final=True)
        else:
            tail = ""
        self._finish(emit, started, n_prompt, len(completion_ids), finish_reason,
                     (logprob_sum / len(completion_ids)) if (params.logprobs and completion_ids) else None,
                     pending_entries, tail)

    def _finish(self, emit, started: float, n_prompt: int, n_completion: int, finish_reason: str,
                mean_logprob: float | None, entries: list[TokenLogprob], tail: str = "") -> None:
        finished = time.time()
        self._completed += 1
        self._recent.append((finished - started, n_completion, n_prompt))
        emit(
            EngineEvent(
                text=tail,
                prompt_tokens=n_prompt,
                completion_tokens=n_completion,
                time_s=finished,
                finished=True,
                finish_reason=finish_reason,  # type: ignore[arg-type]
                mean_logprob=mean_logprob,
                token_logprobs=entries or None,
            )
        )

    def _score_prompt(self, prompt_ids: list[int], top_n: int, cancel: threading.Event) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (the first has none), with the
        top_n most likely tokens at its position.

        One pass over the prompt as llama-cpp-python's own eval makes, but with logits kept for every position
        (llama.cpp projects every row instead of the last). The model is not loaded with logits_all, which
        would keep n_ctx x n_vocab floats for every request; these live SCORE_BATCH_TOKENS rows at a time.
        """
        import llama_cpp
        import numpy as np

        llm = self._llm
        n_vocab = llm.n_vocab()
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        texts: dict[int, bytes] = {}

        def piece(token: int) -> bytes:
            if token not in texts:
                texts[token] = llm.detokenize([token])
            return texts[token]

        first = piece(prompt_ids[0])
        entries = [TokenLogprob(first.decode("utf-8", "replace"), None, first, (), in_prompt=True)]
        step = min(llm.n_batch, SCORE_BATCH_TOKENS)
        for start in range(0, len(prompt_ids), step):
            if cancel.is_set():
                break
            batch = prompt_ids[start:start + step]
            llm._batch.set_batch(batch=batch, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[start:start + len(batch)] = batch
            llm.n_tokens = start + len(batch)
            # row j predicts the token after position start + j; the prompt's last row predicts the first
            # generated token, which the generation reads itself
            rows = min(len(batch), len(prompt_ids) - 1 - start)
            if rows <= 0:
                continue
            all_logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(len(batch), n_vocab))
            # a few rows at a time: a large vocabulary (Gemma's 262,144) makes a whole batch's copy hundreds of MB
            for lo in range(0, rows, SCORE_ROWS_AT_ONCE):
                logits = all_logits[lo:min(rows, lo + SCORE_ROWS_AT_ONCE)]
                n = len(logits)
                lse = logits.max(axis=1)
                shifted = logits - lse[:, None]
                np.exp(shifted, out=shifted)
                lse += np.log(shifted.sum(axis=1, dtype=np.float64)).astype(np.float32)
                pos0 = start + lo + 1  # the prompt position the block's first row predicts
                values = logits[np.arange(n), np.asarray(prompt_ids[pos0:pos0 + n])] - lse
                tops = None
                if top_n > 0:
                    tops = np.argpartition(logits, n_vocab - top_n, axis=1)[:, n_vocab - top_n:]
                    tops = np.take_along_axis(tops, np.argsort(-np.take_along_axis(logits, tops, axis=1), axis=1,
                                                               kind="stable"), axis=1)
                for j in range(n):
                    raw = piece(prompt_ids[pos0 + j])
                    top = () if tops is None else tuple(
                        (piece(i).decode("utf-8", "replace"), float(logits[j, i] - lse[j]), piece(i)) for i in tops[j].tolist())
                    entries.append(TokenLogprob(raw.decode("utf-8", "replace"), float(values[j]), raw, top, in_prompt=True))
        return entries

    def _check_vocabulary(self, token_ids: Any, param: str) -> None:
        """RequestRejectedError on `param` for the first of the client's token ids this model does not have."""
        n_vocab = self._llm.n_vocab()
        too_big = [t for t in token_ids if t >= n_vocab]
        if too_big:
            raise RequestRejectedError(f"{param}: token id {too_big[0]} is not in {self.model_id}'s vocabulary "
                                       f"(0-{n_vocab - 1})", param=param)

    def _grammar(self, response_format: dict[str, Any] | None) -> Any:
        """The grammar that holds sampling to response_format's JSON (None: free text); RequestRejectedError for
        a schema llama.cpp's converter cannot follow or whose grammar its parser refuses."""
        if response_format is None:
            return None
        key = json.dumps(response_format, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = _checked_grammar(response_format, self._llm._model.vocab)
            if len(self._grammars) >= GRAMMAR_CACHE_SIZE:  # clients send the same schema with every request
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = grammar
        return grammar

    def _token_logprob(self, token: int, token_bytes: bytes, top_n: int) -> tuple[float, TokenLogprob]:
        """Log-probability of the sampled token under the model (temperature 1, before any logit_bias), and its
        entry with the top_n most likely tokens at this position.

        Read from the context's last logits: llama-cpp-python keeps no logit history unless the
        model is loaded with logits_all, which would cost n_ctx x n_vocab floats.
        """
        import llama_cpp
        import numpy as np

        llm = self._llm
        n_vocab = llm.n_vocab()
        # the last output row: after a prompt scored with every row kept (_score_prompt), row 0 is not it
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        m = float(np.max(logits))
        lse = m + math.log(float(np.sum(np.exp(logits - m))))
        logprob = float(logits[token]) - lse
        top: tuple[tuple[str, float, bytes], ...] = ()
        if top_n > 0:
            ids = np.argpartition(logits, -top_n)[-top_n:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            top = tuple((b.decode("utf-8", "replace"), float(logits[i]) - lse, b)
                        for i in ids.tolist() for b in (llm.detokenize([i]),))
        return logprob, TokenLogprob(token_bytes.decode("utf-8", "replace"), logprob, token_bytes, top)

    def stats(self) -> ReplicaStats:
        # a crude live speed figure: seconds per generated token over recent requests, prompt
        # processing included (the CPU models are small enough that decode dominates)
        recent = list(self._recent)
        total_tokens = sum(r[1] for r in recent)
        decode_s_per_token = sum(r[0] for r in recent) / total_tokens if total_tokens else 0.0
        return ReplicaStats(
            model_id=self.model_id,
            running=self._running,
            waiting=self._waiting,
            decode_seconds_per_token=decode_s_per_token,
            requests_completed=self._completed,
        )

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def _fingerprint(weights_path: Path, **settings: Any) -> str:
    """fp_ + a digest of what decides the text for a given seed: the weights, llama.cpp's build, the settings."""
    import llama_cpp

    digest = hashlib.sha256()
    with open(weights_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps({"llama_cpp": llama_cpp.__version__, **settings}, sort_keys=True).encode())
    return "fp_" + digest.hexdigest()[:12]


def _split_on_stops(pending: str, stops: list[str]) -> tuple[str, str, bool]:
    """Return (text safe to emit, text to hold back, whether a stop sequence was hit).

    Text is held back while its tail could still grow into a stop sequence, so a client never
    sees part of a stop string.
    """
    if not stops:
        return pending, "", False
    cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return pending[:cut], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(pending)), 0, -1):
            if pending.endswith(s[:k]):
                hold = max(hold, k)
                break
    return pending[: len(pending) - hold], pending[len(pending) - hold :], False


#: the llama.cpp options a model's engine_options may set
ENGINE_OPTIONS = ("n_threads", "n_batch")
#: response_format grammars kept per engine (a schema's conversion and parse are done once)
GRAMMAR_CACHE_SIZE = 64


def build_llamacpp_engine(model: ModelConfig, config: WattlaneConfig, state_dir: Path, devices: dict | None = None,
                          replica_index: int = 0) -> LlamaCppEngine:
    """The registered builder (engines/base.py ENGINE_BUILDERS): weights resolved, options checked."""
    weights = resolve_weights(model, config, cache_dir=state_dir / "models")
    opts = dict(model.engine_options)
    unknown = set(opts) - set(ENGINE_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown llamacpp engine option(s): {', '.join(sorted(unknown))}",
            file=config.source_path, key=f"models (id {model.id}).engine_options", fix=f"allowed: {', '.join(ENGINE_OPTIONS)}",
        )
    return LlamaCppEngine(
        model_id=model.id,
        kind=ModelKind(model.kind),
        weights_path=weights,
        context_length=model.context_length,
        n_threads=opts.get("n_threads"),
        n_batch=int(opts.get("n_batch", 256)),
    )


def _checked_grammar(response_format: dict[str, Any], vocab: Any) -> Any:
    """response_format as a llama.cpp grammar, parsed once by llama.cpp itself before any request uses it.

    The schema converter emits grammars llama.cpp cannot parse for some schemas ({"enum": []} gives an empty
    rule), and a sampler built from such a grammar crashes the process: the parse here returns NULL instead."""
    import llama_cpp
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if response_format["type"] == "json_object":
        grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    else:
        schema = _root_ref_as_union(response_format["json_schema"].get("schema") or {})
        try:
            grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as exc:  # the converter raises what it meets (AssertionError, KeyError, ValueError, ...)
            raise RequestRejectedError(f"response_format.json_schema.schema cannot be turned into a grammar: "
                                       f"{type(exc).__name__}: {exc}", param="response_format") from None
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not sampler:
        raise RequestRejectedError("response_format.json_schema.schema gives a grammar llama.cpp cannot parse "
                                   "(an empty enum or anyOf, for one)", param="response_format")
    llama_cpp.llama_sampler_free(sampler)
    return grammar


def _root_ref_as_union(schema: Any) -> Any:
    """The same schema, with a root that is itself a $ref written as a one-way anyOf of that $ref.

    llama.cpp's converter resolves a node's $ref without walking the node's other keys, so when the root is
    a $ref beside its $defs (pydantic's schema of a recursive model: {"$ref": "#/$defs/Node", "$defs":
    {...}}) the refs inside $defs stay unresolved and it fails (KeyError). Without a $ref of its own the
    root's $defs are walked too; the grammar is the same, since the converter reads nothing else beside a
    $ref. A root with its own anyOf or oneOf is left alone: those would take the $ref's place."""
    if not isinstance(schema, dict) or "$ref" not in schema or len(schema) == 1 or {"anyOf", "oneOf"} & schema.keys():
        return schema
    rest = {k: v for k, v in schema.items() if k != "$ref"}
    return {**rest, "anyOf": [{"$ref": schema["$ref"]}]}


def _logit_bias_processor(logit_bias: dict[int, float] | None) -> Any:
    """OpenAI's logit_bias as a llama.cpp logits processor: each biased token's logit moves by its bias."""
    if not logit_bias:
        return None
    import numpy as np
    from llama_cpp import LogitsProcessorList

    ids = np.fromiter(logit_bias.keys(), dtype=np.int64)
    bias = np.fromiter(logit_bias.values(), dtype=np.float32)

    def add_bias(_input_ids: Any, scores: Any) -> Any:
        scores[ids] += bias
        return scores

    return LogitsProcessorList([add_bias])

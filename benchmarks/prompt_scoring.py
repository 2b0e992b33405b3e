"""Benchmark scoring a prompt (legacy completions' echo with logprobs) against a plain prefill, on the embedded
default's two llama.cpp models.

    python -m benchmarks.prompt_scoring   # writes docs/results/prompt-scoring.md and .json

Each model runs in this process on LlamaCppEngine with its configured context and batch, on 2 threads.
For each of them, one prompt of about 600 tokens is timed 5 times:
- prefill + 1 token (max_tokens 1, no logprobs);
- scored (max_tokens 0, echo logprobs 1).
The medians are reported, with the process's resident memory before the first scoring and after the last.
Scoring projects every prompt position onto the vocabulary, so its cost grows with the vocabulary's size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from scheduler.config import load_config
from scheduler.datafiles import REPOSITORY_DIR
from scheduler.engines.base import GenerationRequest, ModelKind, SamplingParams
from scheduler.engines.llamacpp import LlamaCppEngine
from scheduler.weights import resolve_weights

RESULTS_DIR = REPOSITORY_DIR / "docs" / "results"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 60


def _time(engine: LlamaCppEngine, **params: Any) -> tuple[float, int]:
    async def go() -> int:
        req = GenerationRequest(request_id="bench", kind=ModelKind.COMPLETION, prompt=PROMPT,
                                params=SamplingParams(temperature=0.0, **params))
        return [ev async for ev in engine.generate(req)][-1].prompt_tokens

    started = time.perf_counter()
    n = asyncio.run(go())
    return time.perf_counter() - started, n


def measure(rounds: int) -> list[dict[str, Any]]:
    cfg = load_config(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wattlane-scoring-bench-") as cache:
        for model in cfg.models:
            weights = resolve_weights(model, cfg, cache_dir=Path(cache))
            engine = LlamaCppEngine(model.id, ModelKind.COMPLETION, weights, context_length=model.context_length,
                                    n_threads=2, n_batch=int(model.engine_options.get("n_batch", 256)))
            _time(engine, max_tokens=1)  # warm-up
            rss_before = psutil.Process().memory_info().rss
            plain = [_time(engine, max_tokens=1)[0] for _ in range(rounds)]
            scored = [_time(engine, max_tokens=0, return_logprobs=True, top_logprobs=1, prompt_logprobs=True)
                      for _ in range(rounds)]
            rss_after = psutil.Process().memory_info().rss
            rows.append({"model": model.id, "vocabulary": engine._llm.n_vocab(), "prompt_tokens": scored[0][1],
                         "prefill_and_one_token_s": statistics.median(plain),
                         "scored_s": statistics.median(t for t, _ in scored),
                         "rss_added_mb": (rss_after - rss_before) / 2**20})
            asyncio.run(engine.close())
            del engine
    return rows


def render_md(doc: dict[str, Any]) -> str:
    lines = ["# Scoring a prompt (echo with logprobs) against a plain prefill", "",
             f"Command: `{doc['command']}` ({doc['date_utc']} UTC; {doc['machine']}; load average before "
             f"{doc['load_average_before']}). Each model runs on LlamaCppEngine in one process, 2 threads; medians of "
             f"{doc['rounds']} runs of one prompt.", "",
             "| model | vocabulary | prompt tokens | prefill + 1 token (s) | scored, max_tokens 0 (s) | ratio | "
             "memory kept after scoring (MB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["models"]:
        lines.append(f"| {r['model']} | {r['vocabulary']:,} | {r['prompt_tokens']} | {r['prefill_and_one_token_s']:.2f} "
                     f"| {r['scored_s']:.2f} | {r['scored_s'] / r['prefill_and_one_token_s']:.1f}x | {r['rss_added_mb']:.0f} |")
    lines += ["", "Scoring keeps every prompt position's logits (64 positions decoded at a time) and computes their "
              "log-softmax, so it costs more than a prefill, and more with a large vocabulary. The memory is what the "
              "process kept: llama.cpp's output buffer for 64 rows of logits, and numpy's pool.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prompt-scoring")
    args = parser.parse_args()
    doc = {"command": "python -m benchmarks.prompt_scoring" + (f" --rounds {args.rounds}" if args.rounds != 5 else ""),
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
           "load_average_before": [round(x, 2) for x in os.getloadavg()], "rounds": args.rounds,
           "models": measure(args.rounds)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render_md(doc), encoding="utf-8")
    print(render_md(doc))


if __name__ == "__main__":
    main()

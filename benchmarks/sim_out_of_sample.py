"""Out-of-sample checks of the simulator: fit on part of the ML.ENERGY table, report the error on rows the fit never saw.

Checks (every prediction is the discrete-event engine, scheduler.sim.calibration.calibrate_point, run
on the row's batch size and output length; the errors are simulated / measured - 1):
- batch: Llama-3.1-8B (1x H100) and -70B (4x H100) fitted on the rows with max_num_seqs <= 128 only,
  predicted at the larger batch sizes of the table;
- model: the shipped profiles (fitted to Llama-3.1 only) with another model's architecture, on that
  model's rows: Llama-3.1-8B -> Qwen3-8B and Qwen3-14B (1x H100), Llama-3.1-70B -> Llama-3.3-70B (4x H100);
- tensor parallel: Qwen3-32B fitted on its 2x H100 rows, predicted on 1x H100, and the reverse (the only
  dense model the table measured at two GPU counts on H100, besides Gemma-3-27B, whose sliding-window
  attention the simulator does not model). The prompt length is held at the shipped fit's value.
- prefill: time to first token at batch 1 against published first-token latencies
  (data/reference/published_prefill.csv, with provenance in data/reference/README.md).

Usage: python -m benchmarks.sim_out_of_sample   (writes docs/results/sim-out-of-sample.{json,md})
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.datafiles import REPOSITORY_DIR, reference_csv
from scheduler.devices.simulated import SimulatedGpu
from scheduler.sim.calibration import calibrate_point
from scheduler.sim.core import BatchCore, CoreListener, SimRequest
from scheduler.sim.fit import Row, base_profile, fit_setups, read_rows, table_facts
from scheduler.sim.profiles import ModelProfile, model_profile

RESULTS = REPOSITORY_DIR / "docs" / "results"
PUBLISHED_PREFILL = REPOSITORY_DIR / "data" / "reference" / "published_prefill.csv"
#: the batch check fits on rows up to this max_num_seqs and predicts the rows above it
FIT_MAX_SEQS = 128
METRICS = ("energy_per_token", "power", "median_itl")

#: architectures of the published prefill figures' models (model cards); params in billions
PREFILL_ARCHITECTURES = {
    "llama-2-7b": {"params_b": 6.74, "n_layers": 32, "d_model": 4096, "n_kv_heads": 32, "head_dim": 128, "fit_from": "llama-3.1-8b"},
    "llama-2-70b": {"params_b": 68.98, "n_layers": 80, "d_model": 8192, "n_kv_heads": 8, "head_dim": 128, "fit_from": "llama-3.1-70b"},
}


def transferred(source: ModelProfile, model: str, gpu_col: str, num_gpus: int, path: Path) -> ModelProfile:
    """source's fitted parameters on another model's architecture (the table's parameter count and precision)."""
    params_b, bpp = table_facts(path, model)
    return base_profile(model, source.gpu, num_gpus, params_b, bpp, source.fit)


def predict_rows(profile: ModelProfile, rows: list[Row], check: str, setup: str) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        r = calibrate_point(profile, row)
        out.append({
            "check": check, "setup": setup, "max_num_seqs": row.max_num_seqs, "batch_size": row.batch_size,
            "measured": {"energy_per_token_j": row.energy_per_token_j, "power_w": row.avg_power_w, "median_itl_ms": row.median_itl_ms},
            "simulated": {"energy_per_token_j": round(r.simulated_energy_per_token_j, 5), "power_w": round(r.simulated_power_w, 1),
                          "median_itl_ms": round(r.simulated_median_itl_ms, 3)},
            "errors": {k: round(v, 4) for k, v in r.errors().items()},
            "preemptions": r.preemptions,
        })
        e = out[-1]["errors"]
        print(f"{check:6s} {setup:34s} b{row.max_num_seqs:<5d} J/tok {e['energy_per_token']:+7.1%}  W {e['power']:+7.1%}  ITL {e['median_itl']:+7.1%}", flush=True)
    return out


def batch_check(path: Path) -> list[dict[str, Any]]:
    specs = []
    held = {}
    for model, n in (("meta-llama/Llama-3.1-8B-Instruct", 1), ("meta-llama/Llama-3.1-70B-Instruct", 4)):
        rows = read_rows(path, model, "H100", n)
        specs.append((model, "H100", n, [r for r in rows if r.max_num_seqs <= FIT_MAX_SEQS]))
        held[model] = [r for r in rows if r.max_num_seqs > FIT_MAX_SEQS]
    out = []
    for prof, _report in fit_setups(path, specs):
        out += predict_rows(prof, held[prof.model], "batch", f"{prof.model.split('/')[1]} {prof.num_gpus}xH100, fit b<={FIT_MAX_SEQS}")
    return out


def model_check(path: Path) -> list[dict[str, Any]]:
    out = []
    for source_key, model, n in (("llama-3.1-8b@h100-sxm", "Qwen/Qwen3-8B", 1),
                                 ("llama-3.1-8b@h100-sxm", "Qwen/Qwen3-14B", 1),
                                 ("llama-3.1-70b@h100-sxm", "meta-llama/Llama-3.3-70B-Instruct", 4)):
        prof = transferred(model_profile(source_key), model, "H100", n, path)
        out += predict_rows(prof, read_rows(path, model, "H100", n), "model", f"{source_key.split('@')[0]} -> {model.split('/')[1]} {n}xH100")
    return out


def tp_check(path: Path) -> list[dict[str, Any]]:
    model = "Qwen/Qwen3-32B"
    prompt = model_profile("llama-3.1-8b@h100-sxm").fit.prompt_tokens_mean
    rows = {n: read_rows(path, model, "H100", n) for n in (1, 2)}
    out = []
    for fit_n, predict_n in ((2, 1), (1, 2)):
        (prof, _report), = fit_setups(path, [(model, "H100", fit_n, rows[fit_n])], prompt_tokens_mean=prompt)
        target = replace(prof, num_gpus=predict_n, key=f"qwen3-32b@h100-sxm x{predict_n}")
        out += predict_rows(target, rows[predict_n], "tp", f"Qwen3-32B fit {fit_n}xH100 -> {predict_n}xH100")
    return out


class _FirstToken(CoreListener):
    def __init__(self):
        self.at: float | None = None

    def on_first_token(self, req: SimRequest, now: float) -> None:
        self.at = now


def simulated_ttft_seconds(profile: ModelProfile, input_tokens: int) -> float:
    """Time to first token of one request alone on the replica (batch 1), in virtual seconds."""
    t = [0.0]
    gpus = [SimulatedGpu(f"ttft{i}", profile.gpu, clock=lambda: t[0]) for i in range(profile.num_gpus)]
    listener = _FirstToken()
    core = BatchCore(profile, gpus, max_num_seqs=1, listener=listener)
    wake = core.submit(SimRequest("r0", input_tokens, 2, 0.0), 0.0)
    while wake is not None and listener.at is None:
        t[0] = wake
        wake = core.advance(wake)
    assert listener.at is not None
    return listener.at


def uncapped_prefill_ms(profile: ModelProfile, input_tokens: int) -> float:
    """The same prefill as one iteration with no power limit: what the time would be if the cap did not bind."""
    from scheduler.sim.physics import iteration_work, operating_point
    from scheduler.sim.profiles import gpu_profile

    w = iteration_work(profile, decode_tokens=0, decode_context_tokens=0.0, prefill_tokens=input_tokens,
                       prefill_attention_pairs=input_tokens * input_tokens / 2.0, prefill_sequences=1)
    return operating_point(gpu_profile(profile.gpu), profile.fit, w, float("inf")).seconds * 1000.0


def published_prefill_rows(path: Path = PUBLISHED_PREFILL) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def prefill_profile(architecture: str, gpu: str, num_gpus: int) -> ModelProfile:
    """The published model's shape with the fit of the shipped Llama-3.1 profile of its size, on `gpu`."""
    a = PREFILL_ARCHITECTURES[architecture]
    source = model_profile(a["fit_from"], gpu)
    kv = 2 * a["n_layers"] * a["n_kv_heads"] * a["head_dim"] * 2
    return ModelProfile(key=f"{architecture}@{gpu}", model=architecture, gpu=gpu, num_gpus=num_gpus, params_b=a["params_b"],
                        n_layers=a["n_layers"], d_model=a["d_model"], kv_bytes_per_token=kv,
                        weights_bytes=a["params_b"] * 1e9 * 2, fit=source.fit, provenance=source.provenance)


def prefill_check() -> list[dict[str, Any]]:
    out = []
    for r in published_prefill_rows():
        prof = prefill_profile(r["architecture"], r["gpu"], int(r["num_gpus"]))
        sim_ms = simulated_ttft_seconds(prof, int(r["input_tokens"])) * 1000.0
        pub_ms = float(r["first_token_latency_ms"])
        same_precision = r["precision"] in ("fp16", "bf16")
        out.append({**r, "simulated_ms": round(sim_ms, 2), "error": round(sim_ms / pub_ms - 1, 4),
                    "simulated_uncapped_ms": round(uncapped_prefill_ms(prof, int(r["input_tokens"])), 2),
                    "compared": same_precision, "profile_provenance": prof.provenance})
        print(f"prefill {r['source_id']:34s} published {pub_ms:6.1f} ms  simulated (bf16) {sim_ms:6.1f} ms  {sim_ms / pub_ms - 1:+7.1%}"
              + ("" if same_precision else "  (published is fp8: not compared)"), flush=True)
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """MAPE and worst error per (check, setup) and per check, for each metric."""
    def stats(rs):
        d = {}
        for m in METRICS:
            errs = [r["errors"][m] for r in rs]
            worst = max(rs, key=lambda r: abs(r["errors"][m]))
            d[m] = {"mape": round(float(np.mean(np.abs(errs))), 4), "worst": worst["errors"][m], "worst_at_max_num_seqs": worst["max_num_seqs"]}
        d["rows"] = len(rs)
        return d

    by_setup: dict[str, list] = {}
    by_check: dict[str, list] = {}
    for r in rows:
        by_setup.setdefault(f"{r['check']}: {r['setup']}", []).append(r)
        by_check.setdefault(r["check"], []).append(r)
    return {"by_setup": {k: stats(v) for k, v in by_setup.items()}, "by_check": {k: stats(v) for k, v in by_check.items()}}


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    lines = [
        "# Simulator out of sample (method: simulated, against measured ML.ENERGY rows and published figures)",
        "",
        f"`{doc['command']}` on {doc['machine']}, {doc['date']} ({doc['wall_seconds']:.0f} s).",
        "",
        "Every row below is one the prediction's fit never saw. Errors are simulated / measured - 1; MAPE is",
        "the mean absolute error over the rows. The engine (discrete-event, `calibrate_point`) runs each row's",
        "batch size and mean output length as the benchmark ran vLLM (closed loop, default clocks and limit).",
        "",
        "## Summary",
        "",
        "| check | setup | rows | J/token MAPE (worst) | power MAPE (worst) | median ITL MAPE (worst) |",
        "|---|---|---|---|---|---|",
    ]
    for key, s in doc["summary"]["by_setup"].items():
        check, setup = key.split(": ", 1)
        cells = [f"{100 * s[m]['mape']:.1f}% ({pct(s[m]['worst'])} at b{s[m]['worst_at_max_num_seqs']})" for m in METRICS]
        lines.append(f"| {check} | {setup} | {s['rows']} | " + " | ".join(cells) + " |")
    for check, s in doc["summary"]["by_check"].items():
        cells = [f"**{100 * s[m]['mape']:.1f}%** ({pct(s[m]['worst'])})" for m in METRICS]
        lines.append(f"| **{check}, all** | | {s['rows']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per row", "",
              "| check | setup | max_num_seqs | batch | J/token meas / sim (err) | power W meas / sim (err) | median ITL ms meas / sim (err) |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        m, s, e = r["measured"], r["simulated"], r["errors"]
        lines.append(
            f"| {r['check']} | {r['setup']} | {r['max_num_seqs']} | {r['batch_size']:.1f} "
            f"| {m['energy_per_token_j']:.4f} / {s['energy_per_token_j']:.4f} ({pct(e['energy_per_token'])}) "
            f"| {m['power_w']:.0f} / {s['power_w']:.0f} ({pct(e['power'])}) "
            f"| {m['median_itl_ms']:.2f} / {s['median_itl_ms']:.2f} ({pct(e['median_itl'])}) |")
    lines += ["", "## Prefill: time to first token at batch 1 vs published first-token latency", "",
              "Published figures: `data/reference/published_prefill.csv` (provenance in `data/reference/README.md`).",
              "No published BF16 prefill or TTFT figure for Llama-3.1-8B/70B on H100 with its input length, batch",
              "size and precision stated was found in the sources searched (NVIDIA TensorRT-LLM and NIM",
              "performance pages, vLLM and cloud-vendor benchmark posts): the stored copy of NVIDIA's NIM table",
              "for Llama-3.1-8B (TTFT 10.26 ms at concurrency 1) lacks the header that says the precision and the",
              "sequence lengths, so it is not used. The nearest citable figures are TensorRT-LLM v0.5's batch-1",
              "first-token latencies for LLaMA (Llama 2) 7B and 70B. They are compared on A100 in FP16, the",
              "simulator's precision, with the shipped Llama-3.1 fits of the same size on the Llama 2 shapes",
              "(A100 profiles are transferred from H100: same efficiencies). The H100 figures are FP8 (twice",
              "BF16's peak tensor throughput) and are shown for context only; a BF16 run is expected to be slower.",
              "",
              "| published | engine | GPU | precision | input tokens | published ms | simulated ms (bf16) | error | simulated, no power cap (ms) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["prefill"]:
        err = pct(r["error"]) if r["compared"] else f"({pct(r['error'])}, not compared: fp8)"
        lines.append(f"| {r['source_id']} | {r['engine']} | {r['num_gpus']}x {r['gpu']} | {r['precision']} | {r['input_tokens']} "
                     f"| {float(r['first_token_latency_ms']):.0f} | {r['simulated_ms']:.1f} | {err} | {r['simulated_uncapped_ms']:.1f} |")
    p = doc["prefill_summary"]
    lines += ["", f"Compared rows (FP16 on A100): MAPE **{100 * p['mape']:.1f}%**, worst {pct(p['worst'])}.", "",
              "Why long prefills come out slow. The last column is the same iteration with no power limit. For the 7B shape",
              "the power cap is the cause: the 8B fit explains decode power (memory-bound) with SM activity, so its dynamic",
              "power at full compute is far above the card's limit, a 2048-token prefill is capped and the clock drops;",
              "without the cap it would match the published figure closely. For 70B on 4 GPUs the cap does not bind: the",
              "70B fit's compute efficiency (about 0.49 of peak, fitted to decode-heavy rows, all-reduce time included) is",
              "lower than what TensorRT-LLM's prefill reached. A GPU run's prefill power and time (scripts/gpu/gpu_run.py)",
              "will settle the first; the second needs a multi-GPU measurement.", ""]
    lines += ["## What this does and does not show", "", *doc["notes"], ""]
    path.write_text("\n".join(lines), encoding="utf-8")


NOTES = [
    "- The batch check extrapolates in batch size only: same model, GPU, engine and workload as the fit.",
    "- The model check keeps the Llama fit's efficiencies, overheads and power coefficients and changes only "
    "the architecture (parameters, layers, KV heads) and each row's output length; Qwen3's tokenizer and "
    "longer outputs are part of what it tests.",
    "- The tensor-parallel check keeps per-GPU coefficients and the per-iteration overhead; the all-reduce "
    "cost that differs between 1 and 2 GPUs lives inside that overhead, so this check is the one most "
    "likely to fail for other GPU counts. Only 3 rows exist on 1x H100 (b8-b32): the fit on them is weak.",
    "- Nothing here checks clocks or power caps: every row ran at default settings. Those constants wait "
    "for a GPU run (`scripts/gpu/gpu_run.py`, then `python -m scheduler.sim.fit --gpu-run`).",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_out_of_sample", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "sim-out-of-sample.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    path = reference_csv()
    rows = batch_check(path) + model_check(path) + tp_check(path)
    prefill = prefill_check()
    compared = [r["error"] for r in prefill if r["compared"]]
    worst = max(compared, key=abs)
    doc = {
        "method": "simulated",
        "command": "python -m benchmarks.sim_out_of_sample",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "wall_seconds": round(time.time() - t0, 1),
        "fit_max_num_seqs": FIT_MAX_SEQS,
        "summary": summarise(rows),
        "rows": rows,
        "prefill": prefill,
        "prefill_summary": {"mape": round(float(np.mean(np.abs(compared))), 4), "worst": worst, "rows": len(compared)},
        "notes": NOTES,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    write_markdown(doc, args.out.with_suffix(".md"))
    for check, s in doc["summary"]["by_check"].items():
        print(f"{check}: " + ", ".join(f"{m} MAPE {100 * s[m]['mape']:.1f}% worst {100 * s[m]['worst']:+.1f}%" for m in METRICS))
    print(f"prefill (fp16, A100): MAPE {100 * doc['prefill_summary']['mape']:.1f}% worst {100 * worst:+.1f}%")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

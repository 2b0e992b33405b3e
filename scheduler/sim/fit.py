"""Fit the simulator's model profiles to the ML.ENERGY table and write scheduler/sim/data/models.json.

Run: python -m scheduler.sim.fit [--csv PATH] [--out PATH]
 or: python -m scheduler.sim.fit --gpu-run RUN.json [--gpu-key KEY]   (GPU constants; scheduler/sim/gpu_fit.py)

For each (model, GPU, GPU count) in TARGETS, the seven ModelFit parameters are chosen by least
squares on log-ratios of energy per token, average power and median inter-token latency at every
measured batch size. The prediction for a row is a steady-state Monte Carlo of the engine's
iterations at that batch size: the same physics (scheduler.sim.physics) the simulator runs, with
Binomial(B, 1/L) new requests per iteration (memoryless output lengths, mean L = avg_output_len)
and lognormal prompts. The calibration test then checks the discrete-event engine itself against
the table, so an error in this approximation would show there.

Architecture facts (layers, hidden size, KV heads) are model-card constants, listed below.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scheduler.datafiles import DataFileError, reference_csv
from scheduler.sim.physics import operating_points_array
from scheduler.sim.profiles import MODELS_PATH, GpuProfile, ModelFit, ModelProfile, gpu_profile

#: model-card architecture facts (config.json of each model on Hugging Face)
ARCHITECTURES = {
    "meta-llama/Llama-3.1-8B-Instruct": {"key": "llama-3.1-8b", "n_layers": 32, "d_model": 4096, "n_kv_heads": 8, "head_dim": 128},
    "meta-llama/Llama-3.1-70B-Instruct": {"key": "llama-3.1-70b", "n_layers": 80, "d_model": 8192, "n_kv_heads": 8, "head_dim": 128},
    # not fitted into models.json: the out-of-sample checks (benchmarks/sim_out_of_sample.py) use them
    "meta-llama/Llama-3.3-70B-Instruct": {"key": "llama-3.3-70b", "n_layers": 80, "d_model": 8192, "n_kv_heads": 8, "head_dim": 128},
    "Qwen/Qwen3-8B": {"key": "qwen3-8b", "n_layers": 36, "d_model": 4096, "n_kv_heads": 8, "head_dim": 128},
    "Qwen/Qwen3-14B": {"key": "qwen3-14b", "n_layers": 40, "d_model": 5120, "n_kv_heads": 8, "head_dim": 128},
    "Qwen/Qwen3-32B": {"key": "qwen3-32b", "n_layers": 64, "d_model": 5120, "n_kv_heads": 8, "head_dim": 128},
}
GPU_KEYS = {"H100": "h100-sxm"}
#: (model, GPU column value, GPU count) to fit
TARGETS = [
    ("meta-llama/Llama-3.1-8B-Instruct", "H100", 1),
    ("meta-llama/Llama-3.1-70B-Instruct", "H100", 4),
]
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "fp8": 1}
#: spread of prompt lengths (sigma of log tokens); the table gives no prompt lengths
PROMPT_LOG_SIGMA = 1.0
#: vLLM's per-iteration token budget (max_num_batched_tokens) for an OpenAI server on an 80 GB GPU
MAX_BATCHED_TOKENS = 8192
SAMPLES = 1500
SEED = 20240

PARAM_NAMES = ["memory_efficiency", "compute_efficiency", "fixed_seconds", "per_token_seconds", "dynamic_watts", "memory_watts", "prompt_tokens_mean"]
LOWER = np.array([0.30, 0.05, 0.0, 0.0, 0.0, 0.0, 32.0])
UPPER = np.array([1.00, 0.90, 0.020, 2e-4, 2000.0, 800.0, 1024.0])
START = np.array([0.8, 0.4, 0.002, 1e-5, 400.0, 200.0, 200.0])


class FitDataError(ValueError):
    """The reference CSV is missing, malformed, or lacks the rows to fit."""


@dataclass(frozen=True)
class Row:
    batch_size: float
    max_num_seqs: int
    avg_power_w: float
    energy_per_token_j: float
    avg_output_len: float
    median_itl_ms: float


def open_table(path: Path):
    """The reference table as text, whether plain CSV or gzipped (the repository ships it gzipped)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return path.open(newline="", encoding="utf-8")


def read_rows(path: Path, model: str, gpu: str, num_gpus: int) -> list[Row]:
    if not path.is_file():
        raise FitDataError(f"{path}: not found; pass --csv, or run from a clone (data/reference holds the table)")
    need = {"model", "gpu", "num_gpus", "max_num_seqs", "avg_batch_size", "avg_power_w", "energy_per_token_j", "avg_output_len", "median_itl_ms"}
    with open_table(path) as fh:
        reader = csv.DictReader(fh)
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise FitDataError(f"{path}: missing columns {', '.join(sorted(missing))}")
        rows = []
        for i, r in enumerate(reader, start=2):
            if r["model"] != model or r["gpu"] != gpu or int(r["num_gpus"]) != num_gpus:
                continue
            try:
                rows.append(Row(
                    batch_size=float(r["avg_batch_size"]), max_num_seqs=int(r["max_num_seqs"]),
                    avg_power_w=float(r["avg_power_w"]), energy_per_token_j=float(r["energy_per_token_j"]),
                    avg_output_len=float(r["avg_output_len"]), median_itl_ms=float(r["median_itl_ms"]),
                ))
            except ValueError as exc:
                raise FitDataError(f"{path}: line {i}: {exc}") from None
    if len(rows) < 3:
        raise FitDataError(f"{path}: only {len(rows)} rows for {model} on {num_gpus}x {gpu}; need at least 3")
    return sorted(rows, key=lambda r: r.batch_size)


def base_profile(model: str, gpu_key: str, num_gpus: int, params_b: float, bytes_per_param: int, fit: ModelFit) -> ModelProfile:
    arch = ARCHITECTURES[model]
    kv = 2 * arch["n_layers"] * arch["n_kv_heads"] * arch["head_dim"] * bytes_per_param
    return ModelProfile(
        key=f"{arch['key']}@{gpu_key}", model=model, gpu=gpu_key, num_gpus=num_gpus, params_b=params_b,
        n_layers=arch["n_layers"], d_model=arch["d_model"], kv_bytes_per_token=kv,
        weights_bytes=params_b * 1e9 * bytes_per_param, fit=fit,
    )


class SteadyState:
    """Monte Carlo of a saturated engine at batch size B (common random numbers across calls)."""

    def __init__(self, rows: list[Row], samples: int = SAMPLES, seed: int = SEED):
        rng = np.random.default_rng(seed)
        self.rows = rows
        self.draws = []
        for r in rows:
            b = max(1, int(round(r.batch_size)))
            k = rng.binomial(b, min(1.0, 1.0 / r.avg_output_len), size=samples)
            kmax = max(1, int(k.max()))
            z = rng.standard_normal((samples, kmax))
            mask = np.arange(kmax)[None, :] < k[:, None]
            self.draws.append((b, k, z, mask))

    def predict(self, profile: ModelProfile, gpu: GpuProfile, power_limit_watts: float | None = None):
        """Arrays (energy per token J, total power W, median ITL s), one entry per row."""
        fit = profile.fit
        limit = power_limit_watts or gpu.power_limit_default_watts
        mu = np.log(fit.prompt_tokens_mean) - 0.5 * PROMPT_LOG_SIGMA**2
        e_tok, power, itl = [], [], []
        for r, (b, k, z, mask) in zip(self.rows, self.draws):
            prompts = np.where(mask, np.exp(mu + PROMPT_LOG_SIGMA * z), 0.0)
            decode = b - k
            budget = np.maximum(MAX_BATCHED_TOKENS - decode, 0)
            pre_tokens = np.minimum(prompts.sum(axis=1), budget)
            pairs = np.minimum((prompts * prompts).sum(axis=1) * 0.5, pre_tokens * pre_tokens * 0.5 + 1.0)
            ctx = decode * (fit.prompt_tokens_mean + r.avg_output_len)
            g = profile.num_gpus
            flops = (profile.flops_per_token * (decode + pre_tokens) + profile.attention_flops_per_token_context * (ctx + pairs)) / g
            nbytes = (profile.weights_bytes + profile.kv_bytes_per_token * (ctx + pre_tokens)) / g
            _, sec, joules = operating_points_array(gpu, fit, flops, nbytes, (decode + k).astype(float), limit)
            total_j = joules.mean() * g
            e_tok.append(total_j / b)
            power.append(total_j / sec.mean())
            itl.append(float(np.median(sec)))
        return np.array(e_tok), np.array(power), np.array(itl)


def measured(rows: list[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([r.energy_per_token_j for r in rows]),
        np.array([r.avg_power_w for r in rows]),
        np.array([r.median_itl_ms / 1000.0 for r in rows]),
    )


def table_facts(path: Path, model: str) -> tuple[float, int]:
    """(total parameters in billions, bytes per parameter) of a model, from its first row in the table."""
    with open_table(path) as fh:
        first = next((r for r in csv.DictReader(fh) if r["model"] == model), None)
    if first is None:
        raise FitDataError(f"{path}: no rows for {model}")
    return float(first["total_params_b"]), BYTES_PER_PARAM[first["precision"]]


def fit_targets(path: Path, targets=TARGETS) -> list[tuple[ModelProfile, dict]]:
    """Fit all targets at once: six parameters per target plus one prompt length they share
    (every target ran the same prompts through the same tokenizer)."""
    return fit_setups(path, [(model, gpu_col, n, read_rows(path, model, gpu_col, n)) for model, gpu_col, n in targets])


def fit_setups(path: Path, specs: list[tuple[str, str, int, list[Row]]],
               prompt_tokens_mean: float | None = None) -> list[tuple[ModelProfile, dict]]:
    """fit_targets on given rows of each (model, GPU column, GPU count): the out-of-sample checks fit
    on part of a setup's rows. With prompt_tokens_mean given, the prompt length is held there instead
    of fitted (a fit on a few rows cannot tell it from the overheads)."""
    from scipy.optimize import least_squares

    setups = []
    for model, gpu_col, num_gpus, rows in specs:
        params_b, bpp = table_facts(path, model)
        setups.append((model, gpu_profile(GPU_KEYS[gpu_col]), num_gpus, params_b, bpp, rows, SteadyState(rows), measured(rows)))
    n_own = len(PARAM_NAMES) - 1
    free_prompt = prompt_tokens_mean is None

    def profiles_for(x: np.ndarray) -> list[ModelProfile]:
        out = []
        prompt = float(x[-1]) if free_prompt else float(prompt_tokens_mean)
        for t, (model, gpu, num_gpus, params_b, bpp, *_rest) in enumerate(setups):
            own = list(map(float, x[t * n_own:(t + 1) * n_own])) + [prompt]
            out.append(base_profile(model, gpu.key, num_gpus, params_b, bpp, ModelFit(**dict(zip(PARAM_NAMES, own)))))
        return out

    def residuals(x: np.ndarray) -> np.ndarray:
        parts = []
        for prof, (_m, gpu, _n, _p, _b, _rows, ss, (e_m, p_m, i_m)) in zip(profiles_for(x), setups):
            e, p, i = ss.predict(prof, gpu)
            parts += [np.log(e / e_m), np.log(p / p_m), np.log(i / i_m)]
        return np.concatenate(parts)

    tail = slice(-1, None) if free_prompt else slice(0, 0)
    lower = np.concatenate([LOWER[:-1]] * len(setups) + [LOWER[tail]])
    upper = np.concatenate([UPPER[:-1]] * len(setups) + [UPPER[tail]])
    start = np.concatenate([START[:-1]] * len(setups) + [START[tail]])
    result = least_squares(residuals, start, bounds=(lower, upper), x_scale=upper - lower, diff_step=1e-3, max_nfev=600)
    out = []
    for prof, (_m, gpu, _n, _p, _b, rows, ss, _meas) in zip(profiles_for(result.x), setups):
        e, p, i = ss.predict(prof, gpu)
        errors = [abs(np.log(e[j] / r.energy_per_token_j)) for j, r in enumerate(rows)]
        errors += [abs(np.log(p[j] / r.avg_power_w)) for j, r in enumerate(rows)]
        errors += [abs(np.log(i[j] * 1000 / r.median_itl_ms)) for j, r in enumerate(rows)]
        report = {
            "rows": [
                {
                    "batch_size": r.batch_size, "max_num_seqs": r.max_num_seqs,
                    "energy_per_token_j": [r.energy_per_token_j, round(float(e[j]), 5)],
                    "avg_power_w": [r.avg_power_w, round(float(p[j]), 1)],
                    "median_itl_ms": [r.median_itl_ms, round(float(i[j]) * 1000, 3)],
                }
                for j, r in enumerate(rows)
            ],
            "max_abs_log_error": float(max(errors)),
        }
        out.append((prof, report))
    return out


def profile_to_json(p: ModelProfile, report: dict, source: Path) -> dict:
    d = asdict(p)
    d.pop("key")
    d["fit_report"] = report
    d["fit_report"]["note"] = "pairs are [measured, steady-state prediction]"
    d["source"] = f"{source.name}: {p.model}, {p.num_gpus}x {p.gpu}"
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scheduler.sim.fit", description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=None, help="ML.ENERGY table (default: data/reference/mlenergy_v3_lm_arena_chat.csv.gz of the clone)")
    ap.add_argument("--out", type=Path, default=MODELS_PATH)
    ap.add_argument("--gpu-run", type=Path, default=None,
                    help="instead: fit a GPU's clock and power-cap constants to this gpu_run JSON (see scheduler/sim/gpu_fit.py)")
    ap.add_argument("--gpu-key", default=None, help="with --gpu-run: the GPU profile to write (default: the run's profile)")
    ap.add_argument("--gpu-base", default="h100-sxm", help="with --gpu-run: profile whose data-sheet facts a new key starts from")
    ap.add_argument("--gpu-out", type=Path, default=None, help="with --gpu-run: GPU profiles file to update (default scheduler/sim/data/gpus.json)")
    ap.add_argument("--gpu-report", type=Path, default=None, help="with --gpu-run: also write the full fit report here")
    args = ap.parse_args(argv)
    if args.gpu_run is not None:
        from scheduler.sim.gpu_fit import run as fit_gpu_run
        from scheduler.sim.profiles import GPUS_PATH

        return fit_gpu_run(args.gpu_run, args.gpu_key, args.gpu_base, args.gpu_out or GPUS_PATH, args.gpu_report)
    out: dict[str, dict] = {"_generated_by": "python -m scheduler.sim.fit (do not edit by hand)"}
    try:
        path = args.csv or reference_csv()
        for prof, report in fit_targets(path):
            out[prof.key] = profile_to_json(prof, report, path)
            print(f"{prof.key}: max |log error| {report['max_abs_log_error']:.3f}  fit {asdict(prof.fit)}")
    except (FitDataError, DataFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

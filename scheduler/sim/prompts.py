"""Give trace requests real prompts and correctness labels, drawn from the held-out routing split.

The Azure trace carries token counts but no text, and model selection reads the prompt. Each trace
request gets a prompt drawn (seeded, with replacement) from the held-out 25% of the routing data,
packaged as scheduler/data/routing-held-out.csv.gz: `python -m scheduler.routing.train` writes it
from the same deduplicated split it trains on (and scheduler.routing.evaluate scores), so the
shipped predictor never saw these rows, nor a copy of them. The trace's own prompt and output
token counts still drive the physics; the text only feeds the predictor, and the labels say whether
the weak (small) or strong (large) model would have answered it correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler import datafiles
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
        """The packaged held-out split of the routing data (MMLU + GSM8K) the predictor was not trained on."""
        try:
            data = routing_data.load_csv(datafiles.held_out_prompts())
        except (datafiles.DataFileError, routing_data.RoutingDataError) as exc:
            raise PromptPoolError(
                f"{exc}; model selection in the simulator needs the held-out routing prompts "
                "(or replay with auto_selection='placement-only')"
            ) from None
        return cls.from_data(data, f"held-out routing split ({datafiles.HELD_OUT_PROMPTS}, {len(data)} rows)")

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

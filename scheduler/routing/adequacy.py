"""The adequacy predictor: P(the weak model answers this prompt adequately), from a shipped artefact.

Inference is numpy only: a logistic model over the hashed features of scheduler.routing.features,
its weights stored in scheduler/routing/artefacts/adequacy.npz (rebuilt by
`python -m scheduler.routing.train`). The model is trained to predict "only the strong model is
right" (RouteLLM's win label); adequacy is one minus that probability.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from scheduler.routing.features import N_FEATURES, featurize

ARTEFACT_DIR = Path(__file__).resolve().parent / "artefacts"
DEFAULT_ARTEFACT = ARTEFACT_DIR / "adequacy.npz"
FORMAT_VERSION = 1


class PredictorError(RuntimeError):
    """The artefact is missing or does not match this code's feature layout."""


class AdequacyPredictor:
    """Scores prompts; pure and thread-safe after construction (weights are read-only)."""

    def __init__(self, weights: np.ndarray, intercept: float, metadata: dict):
        if weights.shape != (N_FEATURES,):
            raise PredictorError(
                f"artefact has {weights.shape[0]} weights but the features have {N_FEATURES}; "
                "rebuild it with `python -m scheduler.routing.train`"
            )
        self.weights = weights.astype(np.float64)
        self.weights.setflags(write=False)
        self.intercept = float(intercept)
        self.metadata = metadata

    @classmethod
    def load(cls, path: str | Path | None = None) -> "AdequacyPredictor":
        p = Path(path) if path else DEFAULT_ARTEFACT
        if not p.is_file():
            raise PredictorError(f"adequacy artefact not found: {p}; build it with `python -m scheduler.routing.train`")
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["metadata"]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise PredictorError(f"{p}: format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it")
            return cls(np.asarray(z["weights"]), float(z["intercept"]), meta)

    def strong_needed_probability(self, prompt: str) -> float:
        """P(only the strong model answers correctly) for this prompt."""
        idx, val = featurize(prompt)
        z = float(self.weights[idx] @ val) + self.intercept
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def adequacy(self, prompt: str) -> float:
        """P(the weak model is adequate for this prompt) = 1 - P(strong needed)."""
        return 1.0 - self.strong_needed_probability(prompt)

    def strong_needed_many(self, prompts: list[str]) -> np.ndarray:
        return np.fromiter((self.strong_needed_probability(p) for p in prompts), dtype=np.float64, count=len(prompts))


@lru_cache(maxsize=4)
def load_predictor(path: str | None = None) -> AdequacyPredictor:
    """The process-wide predictor for an artefact path (None: the shipped one); loaded once."""
    return AdequacyPredictor.load(path)

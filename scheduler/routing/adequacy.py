"""The adequacy predictor: how much the strong model is expected to gain over the weak one on a prompt, from a shipped artefact.

Inference is numpy only: two logistic models over the same hashed features of
scheduler.routing.features, one for P(strong model correct) and one for P(weak model correct), their
weights stored in scheduler/routing/artefacts/adequacy.npz (rebuilt by `python -m scheduler.routing.train`).
The routing score is the expected accuracy gain of the strong model,
gain = P(strong correct) - P(weak correct) = P(only strong right) - P(only weak right):
ranking prompts by it is what maximises accuracy at every strong-call share, whereas RouteLLM's win label
("only strong right") alone ignores the prompts where the strong model is the one that fails.
Adequacy is 1 - max(gain, GAIN_FLOOR): near 1 when the weak model is expected to do as well, never 1 itself,
so that min_quality 1.0 keeps meaning "the largest model".
"""

from __future__ import annotations

import json
import math
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from scheduler.routing.features import N_FEATURES, featurize

ARTEFACT_DIR = Path(__file__).resolve().parent / "artefacts"
DEFAULT_ARTEFACT = ARTEFACT_DIR / "adequacy.npz"
FORMAT_VERSION = 2
#: the arrays `python -m scheduler.routing.train` writes into the artefact
_ARTEFACT_KEYS = ("metadata", "weights_strong", "intercept_strong", "weights_weak", "intercept_weak")
#: the smallest gain adequacy reads; keeps adequacy below 1 (min_quality 1.0 = always the largest model)
GAIN_FLOOR = 1e-4


class PredictorError(RuntimeError):
    """The artefact is missing or does not match this code's feature layout."""


def _sigmoid(z: float) -> float:
    if z < -700:
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))


class AdequacyPredictor:
    """Scores prompts; pure and thread-safe after construction (weights are read-only)."""

    def __init__(self, weights_strong: np.ndarray, intercept_strong: float, weights_weak: np.ndarray,
                 intercept_weak: float, metadata: dict):
        for name, w in (("strong", weights_strong), ("weak", weights_weak)):
            if w.shape != (N_FEATURES,):
                raise PredictorError(
                    f"artefact's {name}-model head has {w.size} weights but the features have {N_FEATURES}; "
                    "rebuild it with `python -m scheduler.routing.train`"
                )
        # one (N_FEATURES, 2) matrix: a prompt's columns are gathered once for both heads
        self.weights = np.stack([weights_strong, weights_weak], axis=1).astype(np.float64)
        self.weights.setflags(write=False)
        self.intercepts = np.array([intercept_strong, intercept_weak], dtype=np.float64)
        self.intercepts.setflags(write=False)
        self.metadata = metadata

    @classmethod
    def load(cls, path: str | Path | None = None) -> "AdequacyPredictor":
        p = Path(path) if path else DEFAULT_ARTEFACT
        if not p.is_file():
            raise PredictorError(f"adequacy artefact not found: {p}; build it with `python -m scheduler.routing.train`")

        def not_an_artefact(what: str) -> PredictorError:
            return PredictorError(f"{p} is not an adequacy predictor artefact ({what}); pass the .npz that "
                                  "`python -m scheduler.routing.train` writes")

        try:
            z = np.load(p, allow_pickle=False)
        except ValueError:  # numpy's words for "no .npy/.npz magic" are about unpickling, which misleads here
            raise not_an_artefact("not a NumPy .npz archive") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise not_an_artefact(f"unreadable as an .npz archive: {exc}") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise not_an_artefact("a single .npy array, not an .npz archive")
        with z:
            missing = [k for k in _ARTEFACT_KEYS if k not in z.files]
            if missing:
                raise not_an_artefact(f"it has no {', '.join(missing)}")
            try:
                meta = json.loads(str(z["metadata"]))
                version = meta.get("format_version")
            except (ValueError, AttributeError):
                raise not_an_artefact("its metadata is not a JSON object") from None
            if version != FORMAT_VERSION:
                raise PredictorError(f"{p}: format {version} != {FORMAT_VERSION}; rebuild it")
            try:
                heads = (np.asarray(z["weights_strong"], dtype=np.float64), float(z["intercept_strong"]),
                         np.asarray(z["weights_weak"], dtype=np.float64), float(z["intercept_weak"]))
            except (ValueError, TypeError) as exc:
                raise not_an_artefact(f"its weights are not numbers: {exc}") from None
            return cls(*heads, meta)

    def correct_probabilities(self, prompt: str) -> tuple[float, float]:
        """(P(strong model correct), P(weak model correct)) for this prompt."""
        idx, val = featurize(prompt)
        z = val @ self.weights[idx] + self.intercepts
        return _sigmoid(float(z[0])), _sigmoid(float(z[1]))

    def strong_gain(self, prompt: str) -> float:
        """Expected accuracy gain of the strong model over the weak one, in [-1, 1]; the routing score."""
        p_strong, p_weak = self.correct_probabilities(prompt)
        return p_strong - p_weak

    def adequacy(self, prompt: str) -> float:
        """How adequate the weak model is: 1 - max(expected gain of the strong model, GAIN_FLOOR), in [0, 1)."""
        return 1.0 - max(self.strong_gain(prompt), GAIN_FLOOR)

    def strong_gain_many(self, prompts: list[str]) -> np.ndarray:
        """strong_gain of each prompt: higher = more in need of the strong model (what the routing curve ranks)."""
        return np.fromiter((self.strong_gain(p) for p in prompts), dtype=np.float64, count=len(prompts))

    #: the routing score under the name the metrics and calibration use
    strong_needed_many = strong_gain_many


@lru_cache(maxsize=4)
def load_predictor(path: str | None = None) -> AdequacyPredictor:
    """The process-wide predictor for an artefact path (None: the shipped one); loaded once."""
    return AdequacyPredictor.load(path)

"""The comparison router every predictor change must beat: TF-IDF word 1-2-grams and a logistic regression on RouteLLM's win label.

It is the obvious thing to try (scikit-learn's TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) and
LogisticRegression on "strong right and weak wrong"), trained on the same training part as the shipped
predictor, its C chosen by the same cross-validation folds (train.cross_validate_baseline). Needs
scikit-learn (pip install -e '.[train]'); the gateway never uses it.
"""

from __future__ import annotations

import numpy as np

from scheduler.routing import data as routing_data

#: candidate inverse L2 strengths for the baseline; cross-validation on the training part picks one
BASELINE_C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
MAX_ITER = 3000


class TfidfBaseline:
    """A fitted TF-IDF + logistic-regression router; scores are P(strong needed), RouteLLM's win label."""

    def __init__(self, c: float):
        self.c = c
        self._vectorizer = None
        self._model = None

    def fit(self, prompts: list[str], strong_needed: np.ndarray) -> "TfidfBaseline":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self._vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x = self._vectorizer.fit_transform(prompts)
        self._model = LogisticRegression(C=self.c, max_iter=MAX_ITER).fit(x, strong_needed)
        return self

    def scores(self, prompts: list[str]) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("fit the baseline first")
        return self._model.predict_proba(self._vectorizer.transform(prompts))[:, 1]


def fit_baseline(train: routing_data.RoutingData, c: float) -> TfidfBaseline:
    """The baseline fitted on the training part with inverse L2 strength c."""
    return TfidfBaseline(c).fit(train.prompts, train.strong_needed)

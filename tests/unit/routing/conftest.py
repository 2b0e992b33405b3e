"""Fixtures shared by the routing tests: the out-of-fold scores of the training part are computed once (about 12 s)."""

import pytest

from scheduler.routing.adequacy import load_predictor


@pytest.fixture(scope="session")
def out_of_fold():
    """(training part, out-of-fold expected gain per training row): each fold scored by heads fitted on the others."""
    from scheduler.routing.calibrate import out_of_fold_training_scores

    return out_of_fold_training_scores(load_predictor())

"""Shared fixtures: the tiny planted-square classifier, trained once per session."""
import pytest

from planted import tiny_cnn_state, train_tiny_cnn


@pytest.fixture(scope="session")
def tiny_cnn_weights() -> dict:
    """The trained weights of the tiny CNN (seed 0): one training per test session."""
    return tiny_cnn_state(seed=0)


@pytest.fixture
def tiny_classifier(tiny_cnn_weights):
    """A fresh copy of the trained tiny CNN (eval mode): a test may move or change it freely."""
    return train_tiny_cnn(seed=0)

"""Offline fixtures: a tiny HookedTransformer built from a config and an in-memory token dataset."""

import pytest
from datasets import Dataset
from transformer_lens import HookedTransformer

from tests.support.models import build_tiny_model, build_token_dataset


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    return build_tiny_model()


@pytest.fixture(scope="session")
def token_dataset() -> Dataset:
    return build_token_dataset()

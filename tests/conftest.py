"""Shared test setup: one CPU thread (the tests use tiny tensors) and seeded randomness."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set, or parallel work already started
    pass


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)

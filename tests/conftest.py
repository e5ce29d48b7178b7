"""Shared test setup: JAX in 64-bit mode (float64 references need it), fixed seeds."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_enable_x64", True)
torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)

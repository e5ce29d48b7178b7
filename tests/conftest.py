"""Shared test setup: JAX's precision mode for this run, fixed seeds.

The suite runs twice over (``tests/test_default_precision.py`` starts the second run):
- in JAX's 64-bit mode, which the float64 references and float64 parity need;
- in JAX's default mode (64-bit off, as JAX users run it) for the float32 and bfloat16
  parity matrix and the tests of ``test_default_precision.py``. The environment variable
  ``ATTENTIONS_TEST_X64=0`` selects it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

X64 = os.environ.get("ATTENTIONS_TEST_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)

"""The twin language models of ``examples/`` (issue 17): trained side by side in both
frameworks from the same weights, the losses agree step by step and greedy generation
through the caches gives the same tokens. Short runs here; ``python -m examples.twin_lm``
runs the 100 steps of the README."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from examples import twin_lm

needs_x64 = pytest.mark.skipif(
    not jax.config.jax_enable_x64, reason="float64 needs JAX's 64-bit mode (conftest.py)"
)


def test_markov_data_is_a_fixed_chain():
    batches = twin_lm.markov_batches(3, 4, 16, seed=0)
    assert batches.shape == (3, 4, 17) and batches.dtype == np.int64
    assert np.array_equal(batches, twin_lm.markov_batches(3, 4, 16, seed=0))
    assert batches.min() >= 0 and batches.max() < twin_lm.VOCAB
    # two likely successors per token: the most frequent successor takes well over 1/V
    pairs = np.stack([batches[..., :-1].ravel(), batches[..., 1:].ravel()])
    counts = np.zeros((twin_lm.VOCAB, twin_lm.VOCAB))
    np.add.at(counts, tuple(pairs), 1)
    assert (counts.max(1) / counts.sum(1).clip(1)).mean() > 0.4


@needs_x64
@pytest.mark.parametrize("mechanism", ["grouped", "local", "linear"])
def test_twins_train_and_generate_alike(mechanism):
    """Float64: 8 AdamW steps, every loss equal within 1e-12, the loss falling, and the
    same 6 greedy tokens from both frameworks' caches."""
    result = twin_lm.run(mechanism, steps=8, dtype="float64", generate=6)
    assert result.max_loss_difference <= 1e-12
    assert result.torch_losses[-1] < result.torch_losses[0]
    assert result.torch_tokens.shape == (4, 6)
    np.testing.assert_array_equal(result.torch_tokens, result.flax_tokens)


def test_float32_twins_drift_by_rounding_only():
    result = twin_lm.run("rotary", steps=5, dtype="float32", generate=4)
    assert result.max_loss_difference <= 1e-4

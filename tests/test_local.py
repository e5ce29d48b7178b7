"""LocalSelfAttention in both frameworks: reference, parity, fast path, masks, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attentions_torch as at
from attentions_jax.local import local_tiling as jax_local_tiling
from attentions_torch.local import local_tiling
from tests.sparse_cases import (
    B,
    E,
    H,
    L,
    check_blind_rows,
    check_equals_dense,
    check_invalid_size,
    check_layout,
    check_only_itself,
    check_parity,
    check_reference,
    user_mask,
)


@pytest.mark.parametrize(
    ("window", "mask_kind", "is_causal"),
    [
        (2, "none", False),
        (5, "padding", True),
        (5, "per_head", False),
        (24, "square", False),
        (24, "per_head", True),
        (90, "square", True),
    ],
)
def test_matches_float64_reference(window, mask_kind, is_causal, rng):
    """Even and odd windows, one wider than L, every mask kind, several chunks."""
    check_reference("local", window, mask_kind, is_causal, rng)


def test_single_sequence(rng):
    check_reference("local", 7, "square", True, rng, batch=1)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_parity(dtype, rng):
    """Across frameworks on several chunks (the registry's L = 13 fits in one)."""
    check_parity("local", 9, dtype, rng)


def test_blind_rows(rng):
    check_blind_rows("local", 7, rng)


def test_window_one_sees_only_itself(rng):
    check_only_itself("local", 1, rng)


def test_window_over_twice_the_length_is_dense(rng):
    check_equals_dense("local", 2 * L + 1, rng)


@pytest.mark.parametrize("window", [0, -4, 2.5, True])
def test_invalid_window(window):
    check_invalid_size("local", window, f"window_size must be a positive integer, got {window!r}")


@pytest.mark.parametrize("is_causal", [False, True])
def test_tiles_hold_only_the_band(is_causal):
    """Each chunk of c queries gets c + 2h keys (c + h when causal): O(L · w) pairs."""
    length, window = 300, 64
    for tiling in (
        local_tiling(length, window, is_causal=is_causal),
        jax_local_tiling(length, window, is_causal=is_causal),
    ):
        check_layout(tiling, length)
        tiles, chunk = tiling.queries.shape
        assert tiles * chunk < length + chunk
        assert tiling.keys.shape[1] == chunk + 32 * (1 if is_causal else 2)
        # every key a query may see lies in its tile
        queries = np.asarray(tiling.queries)[:, :, None]
        keys = np.asarray(tiling.keys)[:, None, :]
        visible = (np.abs(queries - keys) <= 32) & (keys >= 0) & (keys < length)
        if is_causal:
            visible &= keys <= queries
        position = np.arange(length)
        last = position if is_causal else np.minimum(position + 32, length - 1)
        expected = last + 1 - np.maximum(position - 32, 0)
        np.testing.assert_array_equal(visible.sum(-1).reshape(-1)[:length], expected)


@pytest.mark.slow
def test_torch_compile_fast_path(rng):
    """The stepped fast path compiles and gives eager's numbers and gradients (one tiny
    graph; the overlapping key windows are where inductor once miscompiled unfold)."""
    layer = at.LocalSelfAttention(E, 5, H).eval()
    x = torch.tensor(rng.standard_normal((B, L, E)), dtype=torch.float32, requires_grad=True)
    mask = torch.tensor(user_mask("padding", rng))
    results = []
    for run in (layer, torch.compile(layer)):
        out, _ = run(x, mask, is_causal=True, need_weights=False)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        results.append((out, grad))
    for compiled, eager in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)

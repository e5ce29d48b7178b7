"""DilatedSelfAttention in both frameworks: reference, parity, fast path, masks, errors."""

from __future__ import annotations

import numpy as np
import pytest

from attentions_jax.dilated import dilated_tiling as jax_dilated_tiling
from attentions_torch.dilated import dilated_tiling
from tests.sparse_cases import (
    L,
    check_blind_rows,
    check_equals_dense,
    check_invalid_size,
    check_layout,
    check_only_itself,
    check_parity,
    check_reference,
)


@pytest.mark.parametrize(
    ("dilation_rate", "mask_kind", "is_causal"),
    [
        (2, "none", False),
        (4, "padding", True),
        (4, "per_head", False),
        (7, "square", False),
        (7, "per_head", True),
        (40, "square", True),
    ],
)
def test_matches_float64_reference(dilation_rate, mask_kind, is_causal, rng):
    """Rates that do not divide L (short residue classes), every mask kind."""
    check_reference("dilated", dilation_rate, mask_kind, is_causal, rng)


def test_single_sequence(rng):
    check_reference("dilated", 4, "square", True, rng, batch=1)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_parity(dtype, rng):
    check_parity("dilated", 4, dtype, rng)


def test_blind_rows(rng):
    check_blind_rows("dilated", 5, rng)


@pytest.mark.parametrize("dilation_rate", [L, 1000])
def test_rate_at_least_the_length_sees_only_itself(dilation_rate, rng):
    check_only_itself("dilated", dilation_rate, rng)


def test_rate_one_is_dense(rng):
    check_equals_dense("dilated", 1, rng)


@pytest.mark.parametrize("dilation_rate", [0, -2, 3.5, True])
def test_invalid_dilation_rate(dilation_rate):
    check_invalid_size(
        "dilated",
        dilation_rate,
        f"dilation_rate must be a positive integer, got {dilation_rate!r}",
    )


@pytest.mark.parametrize(("length", "rate"), [(300, 4), (301, 4), (303, 4), (3, 8)])
def test_tiles_are_the_residue_classes(length, rate):
    """r tiles of ceil(L / r) positions, each one residue class: O(L² / r) pairs."""
    for tiling in (dilated_tiling(length, rate), jax_dilated_tiling(length, rate)):
        check_layout(tiling, length)
        queries = np.asarray(tiling.queries)
        assert queries.shape == (min(rate, length), -(-length // rate))
        assert np.all(queries % rate == queries[:, :1] % rate)
        assert tiling.edges == (0, queries.size - length)

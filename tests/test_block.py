"""BlockSelfAttention in both frameworks: reference, parity, fast path, masks, errors."""

from __future__ import annotations

import numpy as np
import pytest

from attentions_jax.block import block_tiling as jax_block_tiling
from attentions_torch.block import block_tiling
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
    ("block_size", "mask_kind", "is_causal"),
    [
        (4, "none", False),
        (4, "padding", True),
        (7, "per_head", False),
        (16, "square", False),
        (16, "per_head", True),
        (50, "square", True),
    ],
)
def test_matches_float64_reference(block_size, mask_kind, is_causal, rng):
    """Block sizes that do not divide L (a short last block), every mask kind."""
    check_reference("block", block_size, mask_kind, is_causal, rng)


def test_single_sequence(rng):
    check_reference("block", 6, "square", True, rng, batch=1)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_parity(dtype, rng):
    check_parity("block", 8, dtype, rng)


def test_blind_rows(rng):
    check_blind_rows("block", 10, rng)


def test_block_of_one_sees_only_itself(rng):
    check_only_itself("block", 1, rng)


@pytest.mark.parametrize("block_size", [L, 1000])
def test_block_covering_the_sequence_is_dense(block_size, rng):
    check_equals_dense("block", block_size, rng)


@pytest.mark.parametrize("block_size", [0, -1, 4.0, False])
def test_invalid_block_size(block_size):
    check_invalid_size(
        "block", block_size, f"block_size must be a positive integer, got {block_size!r}"
    )


@pytest.mark.parametrize(("length", "block_size"), [(300, 64), (320, 64), (5, 64)])
def test_tiles_are_the_blocks(length, block_size):
    """ceil(L / b) tiles of min(b, L) positions each: O(L · b) pairs, the last one padded."""
    for tiling in (block_tiling(length, block_size), jax_block_tiling(length, block_size)):
        check_layout(tiling, length)
        width = min(block_size, length)
        queries = np.asarray(tiling.queries)
        assert queries.shape == (-(-length // width), width)
        assert tiling.edges == (0, int(length % width > 0))

"""Dilated self-attention: query i sees key j iff ``(i - j) % dilation_rate == 0``."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ._validation import validate_positive
from .block import block_tiling
from .sparse import AlignedTiling, TiledSelfAttention, merge_tiles, pad_positions

__all__ = ["DilatedSelfAttention", "DilatedTiling", "dilated_tiling"]


@dataclass(frozen=True)
class DilatedTiling(AlignedTiling):
    """One tile per residue class: the sequence reshaped to ``(M, r)``, transposed."""

    def query_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        rate, size = self.queries.shape
        padded = pad_positions(x, 0, rate * size)
        return padded.reshape(x.shape[0], size, rate, x.shape[2]).transpose(0, 2, 1, 3)[:, tiles]

    def untile(self, out: jax.Array) -> jax.Array:
        return merge_tiles(out.transpose(0, 2, 1, 3))[:, : self.length]


def dilated_tiling(length: int, dilation_rate: int) -> AlignedTiling:
    """One tile per residue class ``g = i mod r``: positions ``g, g + r, g + 2r, ...``.

    A query sees exactly its own class, so each tile is a dense attention of length
    ``M = ceil(L / r)`` (the last element padded where ``L`` is not a multiple of r): time
    O(L² / r), and the fast path runs the core's query-chunked kernel on the classes. With
    ``r >= L`` every class is one position: the tiling of blocks of 1.
    """
    if dilation_rate >= length:
        return block_tiling(length, 1)
    size = -(-length // dilation_rate)
    queries = jnp.arange(dilation_rate)[:, None] + dilation_rate * jnp.arange(size)
    # class g is padded iff g + r·(M - 1) >= L; those are the last classes
    padded = dilation_rate * size - length
    return DilatedTiling(queries, queries, length, edges=(0, padded))


class DilatedSelfAttention(TiledSelfAttention):
    """Multi-head attention over a dilated pattern: key j visible from query i iff
    ``(i - j) % dilation_rate == 0``.

    Positions are regrouped by residue ``i mod r`` into r dense attentions of length
    ``ceil(L / r)`` (a reshape): the fast path (``need_weights=False``) costs
    O(L² · E / r) time and runs the core's query-chunked kernel on each group, never an
    ``(L, L)`` tensor. ``need_weights=True`` scatters the groups' weights into the dense
    ``(B, H, L, L)`` result.

    Example::

        attn = DilatedSelfAttention(d_model=128, dilation_rate=4, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, need_weights=False)   # (4, 8192, 128)
    """

    dilation_rate: int
    num_heads: int

    def __post_init__(self) -> None:
        validate_positive("dilation_rate", self.dilation_rate)
        super().__post_init__()

    def head_counts(self) -> tuple[int, int]:
        return self.num_heads, self.num_heads

    def tiling(self, length: int, *, is_causal: bool) -> AlignedTiling:
        return dilated_tiling(length, self.dilation_rate)

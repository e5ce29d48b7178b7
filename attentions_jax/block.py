"""Block self-attention: query i sees key j iff ``i // block_size == j // block_size``."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ._validation import validate_positive
from .sparse import AlignedTiling, TiledSelfAttention, merge_tiles, pad_positions

__all__ = ["BlockSelfAttention", "BlockTiling", "block_tiling"]


@dataclass(frozen=True)
class BlockTiling(AlignedTiling):
    """One tile per block: the sequence reshaped to ``(N, b)``."""

    def query_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        width = self.queries.shape[1]
        piece = pad_positions(x, tiles.start * width, tiles.stop * width)
        return piece.reshape(x.shape[0], tiles.stop - tiles.start, width, x.shape[2])

    def untile(self, out: jax.Array) -> jax.Array:
        return merge_tiles(out)[:, : self.length]


def block_tiling(length: int, block_size: int) -> BlockTiling:
    """``N = ceil(L / b)`` tiles of ``b = min(block_size, L)`` positions, the last padded.

    Each tile's keys are its queries: time and memory O(L · b).
    """
    width = min(block_size, length)
    tiles = -(-length // width)
    queries = jnp.arange(tiles * width).reshape(tiles, width)
    padded = int(tiles * width > length)
    return BlockTiling(queries, queries, length, edges=(0, padded))


class BlockSelfAttention(TiledSelfAttention):
    """Multi-head attention within fixed blocks: key j visible from query i iff
    ``i // block_size == j // block_size``; the last block may be shorter.

    The fast path (``need_weights=False``) attends block by block on reshaped q, k, v:
    time and memory O(L · b · E), never an ``(L, L)`` tensor. ``need_weights=True``
    scatters the blocks' weights into the dense ``(B, H, L, L)`` result (block diagonal).

    Example::

        attn = BlockSelfAttention(d_model=128, block_size=64, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, need_weights=False)   # (4, 16384, 128)
    """

    block_size: int
    num_heads: int

    def __post_init__(self) -> None:
        validate_positive("block_size", self.block_size)
        super().__post_init__()

    def head_counts(self) -> tuple[int, int]:
        return self.num_heads, self.num_heads

    def tiling(self, length: int, *, is_causal: bool) -> BlockTiling:
        return block_tiling(length, self.block_size)

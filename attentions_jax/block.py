"""Block self-attention: query i sees key j iff ``p_i // block_size == s_j // block_size``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax

from ._validation import validate_positive
from .base import SelfAttention
from .cache import CacheRule
from .masks import block_keep
from .sparse import TiledMechanism, WindowTiling, is_symbolic, window_tiling

__all__ = ["BlockMechanism", "BlockSelfAttention", "BlockTiling", "block_tiling"]


@dataclass(frozen=True)
class BlockTiling(WindowTiling):
    """One tile per block of absolute positions (the first and last may be partial)."""

    block_size: int
    interior_visible = True

    def pattern(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
        return block_keep(queries, keys, self.block_size)


def block_tiling(
    length: int,
    block_size: int,
    *,
    keys: int | None = None,
    query_start: int = 0,
    key_start: int = 0,
) -> BlockTiling:
    """Tiles of ``Q = min(block_size, L)`` queries, each inside one block of positions.

    With ``b = block_size``, the tiles follow the absolute blocks ``[m·b, (m + 1)·b)``: the
    first tile starts at the block of ``query_start`` (indices before 0 are padding), so
    with ``query_start = 0`` they are ``ceil(L / Q)`` tiles, the last one padded. When the
    keys are the queries (same start, ``S = L``) each tile's keys are its queries; else
    tile t's keys are the b keys of its block. If ``L < b`` the queries touch at most two
    blocks and the tiles, L wide, meet at the block boundary. Time and memory O(L · b).
    In export mode ``Q = b`` (see ``sparse``).
    """
    keys = length if keys is None else keys
    width = block_size
    if not is_symbolic(length):
        width = min(block_size, length)
    first_block = query_start // block_size * block_size
    boundary = first_block + block_size - query_start  # index of the next block's first query
    query_first = boundary - width if boundary < width else 0
    if query_start == key_start and keys == length:
        key_first, key_step, key_width = query_first, width, width
    else:
        key_first, key_step, key_width = first_block - key_start, block_size, block_size
    return window_tiling(
        BlockTiling,
        tiles=-(-(length - query_first) // width),
        width=width,
        key_width=key_width,
        key_step=key_step,
        query_first=query_first,
        key_first=key_first,
        length=length,
        keys=keys,
        query_start=query_start,
        key_start=key_start,
        block_size=block_size,
    )


class BlockMechanism(TiledMechanism):
    """Keys in the query's block of ``block_size`` positions, on tiles."""

    def validate(self) -> None:
        validate_positive("block_size", self.block_size)
        super().validate()

    def cache_rule(self) -> CacheRule:
        """Decoding: a ring of ``block_size`` slots: the current block."""
        return CacheRule(
            ring=self.block_size, pattern=partial(block_keep, block_size=self.block_size)
        )

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> BlockTiling:
        return block_tiling(
            length, self.block_size, keys=keys, query_start=query_start, key_start=key_start
        )


class BlockSelfAttention(BlockMechanism, SelfAttention):
    """Multi-head attention within fixed blocks: key j visible from query i iff
    ``p_i // block_size == s_j // block_size``; the last block may be shorter.

    The fast path (``need_weights=False``) attends block by block on reshaped q, k, v:
    time and memory O(L · b · E), never an ``(L, S)`` tensor. ``need_weights=True``
    scatters the blocks' weights into the dense ``(B, H, L, S)`` result (block diagonal).

    Example::

        attn = BlockSelfAttention(d_model=128, block_size=64, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, need_weights=False)   # (4, 16384, 128)
    """

    block_size: int
    num_heads: int

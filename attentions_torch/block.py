"""Block self-attention: query i sees key j iff ``p_i // block_size == s_j // block_size``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import parallel
from ._validation import validate_positive
from .cache import CacheRule
from .masks import block_keep
from .sparse import (
    TiledSelfAttention,
    WindowTiling,
    sharded_chunk,
    tile_count,
    window_tiling,
)

__all__ = ["BlockSelfAttention", "BlockTiling", "block_tiling"]


@dataclass(frozen=True)
class BlockTiling(WindowTiling):
    """One tile per block of absolute positions (the first and last may be partial)."""

    block_size: int
    interior_visible = True

    def pattern(self, queries: Tensor, keys: Tensor) -> Tensor:
        return block_keep(queries, keys, self.block_size)


def block_tiling(
    length: int,
    block_size: int,
    device: torch.device | None = None,
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
    if not torch.compiler.is_exporting():
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
        tiles=tile_count(length - query_first, width),
        width=width,
        key_width=key_width,
        key_step=key_step,
        query_first=query_first,
        key_first=key_first,
        length=length,
        keys=keys,
        query_start=query_start,
        key_start=key_start,
        device=device,
        block_size=block_size,
    )


class BlockSelfAttention(TiledSelfAttention):
    """Multi-head attention within fixed blocks: key j visible from query i iff
    ``p_i // block_size == s_j // block_size``; the last block may be shorter.

    The fast path (``need_weights=False``) attends block by block on views of q, k, v:
    time and memory O(L · b · E), never an ``(L, S)`` tensor. ``need_weights=True``
    scatters the blocks' weights into the dense ``(B, H, L, S)`` result (block diagonal).

    Example::

        attn = BlockSelfAttention(d_model=128, block_size=64, num_heads=8)
        out, _ = attn(torch.randn(4, 16384, 128), need_weights=False)   # (4, 16384, 128)
    """

    def __init__(self, d_model: int, block_size: int, num_heads: int, **options: Any) -> None:
        validate_positive("block_size", block_size)
        super().__init__(d_model, num_heads, num_heads, **options)
        self.block_size = block_size

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        device: torch.device,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> BlockTiling:
        return block_tiling(
            length,
            self.block_size,
            device,
            keys=keys,
            query_start=query_start,
            key_start=key_start,
        )

    def attend_sharded(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        spec: parallel.SequenceParallel,
        *,
        is_causal: bool,
        positions: Tensor,
    ) -> Tensor:
        """The shard's blocks (``SelfAttention.attend_sharded``). When the chunk length c
        is a multiple of b = ``block_size``, every chunk starts a block: it attends alone,
        no exchange. Else (contiguous layout only) the shard receives the ``b - 1`` keys
        and values on each side (left only when causal; ``parallel.halo_exchange``,
        independent of L) and, its start ``r·Ll`` lying at residue ``a`` in a block,
        attends with the queries at ``a + b`` and the keys at ``a + 1``: positions on
        the grid of the blocks. ``ValueError`` for blocks straddling zigzag chunks or
        wider than a shard plus one."""
        size = self.block_size
        chunk, name = sharded_chunk(spec, q.shape[2])
        if chunk % size == 0:
            return self.attend_chunks(
                q, k, v, spec, is_causal=is_causal, before=0, after=0, query_start=0, key_start=0
            )
        layer = type(self).__name__
        if spec.layout != "contiguous":
            raise ValueError(
                f"{layer}: sequence_parallel with layout='zigzag' needs block_size = {size} "
                f"to divide the chunk length {name} (chunks that start on block "
                "boundaries); use layout='contiguous', or a length and shard count whose "
                "chunks hold whole blocks"
            )
        if size - 1 > chunk:
            raise ValueError(
                f"{layer}: sequence_parallel needs block_size - 1 = {size - 1} <= the shard "
                f"length {name} when shard boundaries cut blocks (a block then reaches into "
                "one neighbouring shard only); use fewer shards or a longer sequence"
            )
        residue = dist.get_rank(spec.group) * chunk % size
        return self.attend_chunks(
            q,
            k,
            v,
            spec,
            is_causal=is_causal,
            before=size - 1,
            after=0 if is_causal else size - 1,
            query_start=residue + size,
            key_start=residue + 1,
        )

    def cache_rule(self) -> CacheRule:
        """Decoding: a ring of ``block_size`` slots: the current block."""
        return CacheRule(
            ring=self.block_size, pattern=partial(block_keep, block_size=self.block_size)
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"

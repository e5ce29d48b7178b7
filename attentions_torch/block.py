"""Block self-attention: query i sees key j iff ``i // block_size == j // block_size``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validation import validate_positive
from .sparse import AlignedTiling, TiledSelfAttention, merge_tiles, pad_positions

__all__ = ["BlockSelfAttention", "BlockTiling", "block_tiling"]


@dataclass(frozen=True)
class BlockTiling(AlignedTiling):
    """One tile per block: a view of the sequence as ``(N, b)``."""

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        width = self.queries.shape[1]
        piece = pad_positions(x, tiles.start * width, tiles.stop * width)
        return piece.view(x.shape[0], tiles.stop - tiles.start, width, x.shape[2])

    def untile(self, out: Tensor) -> Tensor:
        return merge_tiles(out)[:, : self.length]


def block_tiling(length: int, block_size: int, device: torch.device | None = None) -> BlockTiling:
    """``N = ceil(L / b)`` tiles of ``b = min(block_size, L)`` positions, the last padded.

    Each tile's keys are its queries: time and memory O(L · b).
    """
    width = min(block_size, length)
    tiles = -(-length // width)
    queries = torch.arange(tiles * width, device=device).view(tiles, width)
    padded = int(tiles * width > length)
    return BlockTiling(queries, queries, length, edges=(0, padded))


class BlockSelfAttention(TiledSelfAttention):
    """Multi-head attention within fixed blocks: key j visible from query i iff
    ``i // block_size == j // block_size``; the last block may be shorter.

    The fast path (``need_weights=False``) attends block by block on views of q, k, v:
    time and memory O(L · b · E), never an ``(L, L)`` tensor. ``need_weights=True``
    scatters the blocks' weights into the dense ``(B, H, L, L)`` result (block diagonal).

    Example::

        attn = BlockSelfAttention(d_model=128, block_size=64, num_heads=8)
        out, _ = attn(torch.randn(4, 16384, 128), need_weights=False)   # (4, 16384, 128)
    """

    def __init__(self, d_model: int, block_size: int, num_heads: int, **options: Any) -> None:
        validate_positive("block_size", block_size)
        super().__init__(d_model, num_heads, num_heads, **options)
        self.block_size = block_size

    def tiling(self, length: int, *, is_causal: bool, device: torch.device) -> BlockTiling:
        return block_tiling(length, self.block_size, device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"

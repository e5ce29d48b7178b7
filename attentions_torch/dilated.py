"""Dilated self-attention: query i sees key j iff ``(i - j) % dilation_rate == 0``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validation import validate_positive
from .block import block_tiling
from .sparse import AlignedTiling, TiledSelfAttention, merge_tiles, pad_positions

__all__ = ["DilatedSelfAttention", "DilatedTiling", "dilated_tiling"]


@dataclass(frozen=True)
class DilatedTiling(AlignedTiling):
    """One tile per residue class: a view of the sequence as ``(M, r)``, transposed."""

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        rate, size = self.queries.shape
        padded = pad_positions(x, 0, rate * size)
        return padded.view(x.shape[0], size, rate, x.shape[2]).transpose(1, 2)[:, tiles]

    def untile(self, out: Tensor) -> Tensor:
        return merge_tiles(out.transpose(1, 2))[:, : self.length]


def dilated_tiling(
    length: int, dilation_rate: int, device: torch.device | None = None
) -> AlignedTiling:
    """One tile per residue class ``g = i mod r``: positions ``g, g + r, g + 2r, ...``.

    A query sees exactly its own class, so each tile is a dense attention of length
    ``M = ceil(L / r)`` (the last element padded where ``L`` is not a multiple of r): time
    O(L² / r), and the fast path runs the fused dense kernel on the classes. With
    ``r >= L`` every class is one position: the tiling of blocks of 1.
    """
    if dilation_rate >= length:
        return block_tiling(length, 1, device)
    size = -(-length // dilation_rate)
    queries = torch.arange(dilation_rate, device=device)[:, None] + dilation_rate * torch.arange(
        size, device=device
    )
    # class g is padded iff g + r·(M - 1) >= L; those are the last classes
    padded = dilation_rate * size - length
    return DilatedTiling(queries, queries, length, edges=(0, padded))


class DilatedSelfAttention(TiledSelfAttention):
    """Multi-head attention over a dilated pattern: key j visible from query i iff
    ``(i - j) % dilation_rate == 0``.

    Positions are regrouped by residue ``i mod r`` into r dense attentions of length
    ``ceil(L / r)`` (strided views, no copy): the fast path (``need_weights=False``) costs
    O(L² · E / r) time and runs the fused kernel (SDPA) on each group, never an ``(L, L)``
    tensor. ``need_weights=True`` scatters the groups' weights into the dense
    ``(B, H, L, L)`` result.

    Example::

        attn = DilatedSelfAttention(d_model=128, dilation_rate=4, num_heads=8)
        out, _ = attn(torch.randn(4, 8192, 128), need_weights=False)   # (4, 8192, 128)
    """

    def __init__(self, d_model: int, dilation_rate: int, num_heads: int, **options: Any) -> None:
        validate_positive("dilation_rate", dilation_rate)
        super().__init__(d_model, num_heads, num_heads, **options)
        self.dilation_rate = dilation_rate

    def tiling(self, length: int, *, is_causal: bool, device: torch.device) -> AlignedTiling:
        return dilated_tiling(length, self.dilation_rate, device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilation_rate={self.dilation_rate}"

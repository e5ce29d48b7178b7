"""Dilated self-attention: query i sees key j iff ``(p_i - s_j) % dilation_rate == 0``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from . import parallel
from ._validation import validate_positive
from .block import block_tiling
from .cache import CacheRule
from .masks import dilation_keep
from .sparse import (
    TiledSelfAttention,
    Tiling,
    merge_tiles,
    pad_positions,
    sharded_chunk,
    take_rows,
    tile_count,
)

__all__ = ["DilatedSelfAttention", "DilatedTiling", "dilated_tiling"]


@dataclass(frozen=True)
class DilatedTiling(Tiling):
    """Tile u holds the queries ``u, u + r, u + 2r, ...`` and the keys of their residue
    class, ``u - key_pad, u - key_pad + r, ...``: views of the sequences as ``(M, r)``,
    transposed (the keys padded in front by ``key_pad``)."""

    dilation_rate: int
    key_pad: int
    interior_visible = True

    def pattern(self, queries: Tensor, keys: Tensor) -> Tensor:
        return dilation_keep(queries, keys, self.dilation_rate)

    def _classes(self, x: Tensor, tiles: slice, first: int, size: int, index: Tensor) -> Tensor:
        """``(G, L, D) -> (G, n, M, D)``: rows ``first + u + r·m`` for u in ``tiles``."""
        if torch.compiler.is_exporting():
            return take_rows(x, index[tiles])
        if size == 1:  # one row per class: the classes are consecutive rows
            return pad_positions(x, first + tiles.start, first + tiles.stop)[:, :, None]
        rate = self.dilation_rate
        padded = pad_positions(x, first, first + rate * size)
        return padded.view(x.shape[0], size, rate, x.shape[2]).transpose(1, 2)[:, tiles]

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        return self._classes(x, tiles, 0, self.queries.shape[1], self.queries)

    def key_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        return self._classes(x, tiles, -self.key_pad, self.keys.shape[1], self.keys)

    def untile(self, out: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            # a gather: merging the symbolic slot axis by a reshape would pin L
            index = torch.arange(self.length, device=out.device)
            return out[:, index % self.dilation_rate, index // self.dilation_rate]
        # (G, N, M, D) -> (G, M·N, D): row m·N + u is query u + r·m (N = r, or M = 1)
        return merge_tiles(out.transpose(1, 2))[:, : self.length]


def dilated_tiling(
    length: int,
    dilation_rate: int,
    device: torch.device | None = None,
    *,
    keys: int | None = None,
    query_start: int = 0,
    key_start: int = 0,
) -> Tiling:
    """One tile per residue class of positions, ``p ≡ query_start + u (mod r)``.

    A query sees exactly its own class, so each tile is a dense attention of
    ``M = ceil(L / r)`` queries (the last element padded where L is not a multiple of r)
    against the class's ``ceil((S + key_pad) / r)`` keys: time O(L·S / r), and the fast path
    runs the fused dense kernel on the classes. ``key_pad = (key_start - query_start) % r``
    puts key slot m of every class at the position of query slot m + ceil(d / r)
    (``d = query_start - key_start``), so causal is each tile's triangle when that is 0.
    With ``L <= r`` only L classes hold queries; when the keys are the queries as well
    every class is one position: the tiling of blocks of 1. In export mode there are r
    tiles (see ``sparse``).
    """
    keys = length if keys is None else keys
    exporting = torch.compiler.is_exporting()
    aligned = query_start == key_start and keys == length
    if aligned and not exporting and dilation_rate >= length:
        return block_tiling(
            length, 1, device, keys=keys, query_start=query_start, key_start=key_start
        )
    rate = dilation_rate
    key_pad = (key_start - query_start) % rate
    size = tile_count(length, rate)
    key_size = tile_count(keys + key_pad, rate)
    tiles = rate if exporting else min(rate, length)
    classes = torch.arange(tiles, device=device)[:, None]
    queries = classes + rate * torch.arange(size, device=device)
    key_index = queries
    if key_pad or key_size != size:
        key_index = classes - key_pad + rate * torch.arange(key_size, device=device)
    edges = None
    if not exporting:
        # class u has padding in front iff u < key_pad; at the back iff its last query or
        # key lies past the end
        front = min(key_pad, tiles)
        back_from = min(length - rate * (size - 1), keys + key_pad - rate * (key_size - 1), tiles)
        edges = (front, tiles - max(back_from, front))
    return DilatedTiling(
        queries,
        key_index,
        length,
        edges,
        key_length=keys,
        query_start=query_start,
        key_start=key_start,
        tile_causal=-(-(query_start - key_start) // rate) == 0,
        dilation_rate=rate,
        key_pad=key_pad,
    )


class DilatedSelfAttention(TiledSelfAttention):
    """Multi-head attention over a dilated pattern: key j visible from query i iff
    ``(p_i - s_j) % dilation_rate == 0``.

    Positions are regrouped by residue mod r into r dense attentions of length
    ``ceil(L / r)`` (strided views, no copy): the fast path (``need_weights=False``) costs
    O(L · S · E / r) time and runs the fused kernel (SDPA) on each group, never an
    ``(L, S)`` tensor. ``need_weights=True`` scatters the groups' weights into the dense
    ``(B, H, L, S)`` result.

    Example::

        attn = DilatedSelfAttention(d_model=128, dilation_rate=4, num_heads=8)
        out, _ = attn(torch.randn(4, 8192, 128), need_weights=False)   # (4, 8192, 128)
    """

    def __init__(self, d_model: int, dilation_rate: int, num_heads: int, **options: Any) -> None:
        validate_positive("dilation_rate", dilation_rate)
        super().__init__(d_model, num_heads, num_heads, **options)
        self.dilation_rate = dilation_rate

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        device: torch.device,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> Tiling:
        return dilated_tiling(
            length,
            self.dilation_rate,
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
        """The shard's residue classes (``SelfAttention.attend_sharded``), exact by the
        dense ring: with r = ``dilation_rate`` dividing the chunk length c, row i of every
        chunk sits at a position ≡ i (mod r), so the shard's rows of class u, in order,
        are its shard of class u's sequence (length L / r) in the same layout. The r
        classes become heads, ``(B, H, Ll, D) -> (B, H·r, Ll / r, D)``, and go around
        ``parallel.ring_attention`` (causal on the class index is causal on positions):
        O(L²·D·H / r) per step of the ring over the ranks. ``ValueError`` unless r
        divides c."""
        rate = self.dilation_rate
        chunk, name = sharded_chunk(spec, q.shape[2])
        if chunk % rate:
            raise ValueError(
                f"{type(self).__name__}: sequence_parallel needs dilation_rate = {rate} to "
                f"divide the chunk length {name} (each chunk then holds whole strides of "
                "every residue class); pad the sequence or change the shard count"
            )
        heads, local = q.shape[1], q.shape[2]

        def classes(x: Tensor) -> Tensor:
            # (B, H, Ll / r, r, D) -> (B, H, r, Ll / r, D): row m·r + u -> class u, slot m
            return x.unflatten(2, (local // rate, rate)).transpose(2, 3).flatten(1, 2)

        out = parallel.ring_attention(
            classes(q),
            classes(k),
            classes(v),
            group=spec.group,
            layout=spec.layout,
            is_causal=is_causal,
            scale=self.scale,
        )
        return out.unflatten(1, (heads, rate)).transpose(2, 3).reshape(q.shape)

    def cache_rule(self) -> CacheRule:
        """Decoding: slot = position; a one-token step reads its residue class."""
        return CacheRule(
            stride=self.dilation_rate,
            pattern=partial(dilation_keep, dilation_rate=self.dilation_rate),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilation_rate={self.dilation_rate}"

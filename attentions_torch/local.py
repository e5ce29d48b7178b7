"""Local (sliding-window) self-attention: query i sees key j iff ``|i - j| <= window_size // 2``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validation import validate_positive
from .masks import window_keep
from .sparse import TiledSelfAttention, Tiling, merge_tiles, pad_positions

__all__ = ["LocalSelfAttention", "LocalTiling", "local_tiling"]

MIN_CHUNK = 32
"""Fewest queries per tile: smaller tiles make too many small matrix products."""


@dataclass(frozen=True)
class LocalTiling(Tiling):
    """Chunks of ``c`` queries, each with the window of keys from ``t·c - h``.

    ``half`` is ``h = window_size // 2``. The key windows overlap: they are an ``unfold``
    view of the keys, so no key is copied per tile (only the end tiles' windows, padded).
    """

    window_size: int

    @property
    def half(self) -> int:
        return self.window_size // 2

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        chunk = self.queries.shape[1]
        piece = pad_positions(x, tiles.start * chunk, tiles.stop * chunk)
        return piece.view(x.shape[0], tiles.stop - tiles.start, chunk, x.shape[2])

    def key_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        chunk, width = self.queries.shape[1], self.keys.shape[1]
        start = tiles.start * chunk - self.half
        count = tiles.stop - tiles.start
        piece = pad_positions(x, start, start + (count - 1) * chunk + width)
        if torch.compiler.is_compiling():
            # inductor (torch 2.13) miscompiles the backward of overlapping views: its
            # unfold_backward writes out of bounds. A gather of the windows compiles safely.
            index = torch.arange(count, device=x.device)[:, None] * chunk
            return piece[:, index + torch.arange(width, device=x.device)]
        # (G, n, D, S) windows of S keys every c positions, overlapping views -> (G, n, S, D)
        return piece.unfold(1, width, chunk).transpose(2, 3)

    def untile(self, out: Tensor) -> Tensor:
        return merge_tiles(out)[:, : self.length]

    def keep(self, tiles: slice, is_causal: bool) -> Tensor:
        queries, keys = self.queries[tiles], self.keys[tiles]
        if self.interior(tiles):
            # away from the ends every tile has the same band: one (Q, S) mask serves all
            queries, keys = queries[:1], keys[:1]
        rows, cols = queries[:, :, None], keys[:, None, :]
        keep = (
            window_keep(rows, cols, self.window_size)
            & (cols >= 0)
            & (cols < self.length)
            & (rows < self.length)
        )
        if is_causal:
            keep = keep & (cols <= rows)
        return keep[None, None]


def local_tiling(
    length: int, window_size: int, *, is_causal: bool, device: torch.device | None = None
) -> LocalTiling:
    """Chunks of ``c = max(MIN_CHUNK, window_size // 2)`` queries, each with its band of keys.

    With half-window ``h``, chunk t holds queries ``t·c .. t·c + c - 1`` and the keys
    ``t·c - h .. t·c + c - 1 + h`` (``+ 0`` when causal): ``c + 2h`` keys (``c + h``), of
    which each query sees at most ``2h + 1``. Time and memory are O(L · (c + 2h)).
    """
    half = window_size // 2
    chunk = min(max(MIN_CHUNK, half), length)
    tiles = -(-length // chunk)
    width = chunk + half + (0 if is_causal else half)
    starts = torch.arange(tiles, device=device) * chunk
    queries = starts[:, None] + torch.arange(chunk, device=device)
    keys = (starts - half)[:, None] + torch.arange(width, device=device)
    # tiles whose window starts before 0 or ends after L - 1
    front = min(-(-half // chunk), tiles)
    back = min(tiles - max(0, -(-(length + half - width + 1) // chunk)), tiles - front)
    return LocalTiling(queries, keys, length, edges=(front, back), window_size=window_size)


class LocalSelfAttention(TiledSelfAttention):
    """Multi-head attention within a sliding window: key j visible from query i iff
    ``|i - j| <= window_size // 2`` (a window of ``window_size`` keys for odd sizes).

    The fast path (``need_weights=False``) computes only the band, chunk by chunk: time and
    memory O(L · w · E), never an ``(L, L)`` tensor. ``need_weights=True`` scatters the
    band's weights into the dense ``(B, H, L, L)`` result (zero outside the window).

    Example::

        attn = LocalSelfAttention(d_model=128, window_size=64, num_heads=8)
        out, _ = attn(torch.randn(4, 16384, 128), need_weights=False)   # (4, 16384, 128)
    """

    def __init__(self, d_model: int, window_size: int, num_heads: int, **options: Any) -> None:
        validate_positive("window_size", window_size)
        super().__init__(d_model, num_heads, num_heads, **options)
        self.window_size = window_size

    def tiling(self, length: int, *, is_causal: bool, device: torch.device) -> LocalTiling:
        return local_tiling(length, self.window_size, is_causal=is_causal, device=device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}"

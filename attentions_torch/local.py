"""Local (sliding-window) self-attention: query i sees key j iff
``|p_i - s_j| <= window_size // 2``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from . import parallel
from ._validation import validate_positive
from .cache import CacheRule
from .masks import window_keep
from .sparse import (
    TiledSelfAttention,
    WindowTiling,
    sharded_chunk,
    tile_count,
    window_tiling,
)

__all__ = ["LocalSelfAttention", "LocalTiling", "local_tiling"]

MIN_CHUNK = 32
"""Fewest queries per tile: smaller tiles make too many small matrix products."""


@dataclass(frozen=True)
class LocalTiling(WindowTiling):
    """Chunks of ``c`` queries, each with the window of keys from ``t·c + d - h``.

    ``half`` is ``h = window_size // 2``, ``d = query_start - key_start``. The key windows
    overlap: they are an ``unfold`` view of the keys, so no key is copied per tile (only
    the end tiles' windows, padded).
    """

    window_size: int

    def pattern(self, queries: Tensor, keys: Tensor) -> Tensor:
        return window_keep(queries, keys, self.window_size)


def local_tiling(
    length: int,
    window_size: int,
    *,
    is_causal: bool,
    device: torch.device | None = None,
    keys: int | None = None,
    query_start: int = 0,
    key_start: int = 0,
) -> LocalTiling:
    """Chunks of ``c = max(MIN_CHUNK, window_size // 2)`` queries (at most L), each with its
    band of keys.

    With half-window ``h`` and ``d = query_start - key_start``, chunk t holds queries
    ``t·c .. t·c + c - 1`` and the keys ``t·c + d - h .. t·c + c - 1 + d + h`` (``+ d`` at the
    end when causal): ``c + 2h`` keys (``c + h``), of which each query sees at most
    ``2h + 1``. Time and memory are O(L · (c + 2h)) whatever S. In export mode c does not
    depend on L (see ``sparse``).
    """
    half = window_size // 2
    keys = length if keys is None else keys
    chunk = max(MIN_CHUNK, half)
    if not torch.compiler.is_exporting():
        chunk = min(chunk, length)
    return window_tiling(
        LocalTiling,
        tiles=tile_count(length, chunk),
        width=chunk,
        key_width=chunk + half + (0 if is_causal else half),
        key_step=chunk,
        query_first=0,
        key_first=query_start - key_start - half,
        length=length,
        keys=keys,
        query_start=query_start,
        key_start=key_start,
        device=device,
        window_size=window_size,
    )


class LocalSelfAttention(TiledSelfAttention):
    """Multi-head attention within a sliding window: key j visible from query i iff
    ``|p_i - s_j| <= window_size // 2`` (a window of ``window_size`` keys for odd sizes).

    The fast path (``need_weights=False``) computes only the band, chunk by chunk: time and
    memory O(L · w · E), never an ``(L, S)`` tensor. ``need_weights=True`` scatters the
    band's weights into the dense ``(B, H, L, S)`` result (zero outside the window).

    Example::

        attn = LocalSelfAttention(d_model=128, window_size=64, num_heads=8)
        out, _ = attn(torch.randn(4, 16384, 128), need_weights=False)   # (4, 16384, 128)
    """

    def __init__(self, d_model: int, window_size: int, num_heads: int, **options: Any) -> None:
        validate_positive("window_size", window_size)
        super().__init__(d_model, num_heads, num_heads, **options)
        self.window_size = window_size

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        device: torch.device,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> LocalTiling:
        return local_tiling(
            length,
            self.window_size,
            is_causal=is_causal,
            device=device,
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
        """The shard's windows (``SelfAttention.attend_sharded``): each chunk of c queries
        receives the last ``h = window_size // 2`` keys and values of the chunk before it
        in the sequence and, unless causal, the first h of the chunk after it
        (``parallel.halo_exchange``: O(h·H·D) per rank whatever L), then attends to
        those ``h + c + h`` keys with the compact kernel, the queries at offset h.
        ``ValueError`` when ``h > c`` (the window would reach past the neighbour)."""
        half = self.window_size // 2
        chunk, name = sharded_chunk(spec, q.shape[2])
        if half > chunk:
            raise ValueError(
                f"{type(self).__name__}: sequence_parallel needs window_size // 2 = {half} "
                f"<= the chunk length {name} (a window reaches into one neighbouring chunk "
                "only); use fewer shards or a longer sequence"
            )
        return self.attend_chunks(
            q,
            k,
            v,
            spec,
            is_causal=is_causal,
            before=half,
            after=0 if is_causal else half,
            query_start=half,
            key_start=0,
        )

    def cache_rule(self) -> CacheRule:
        """Decoding: a ring of the ``window_size // 2`` keys before a query (at least one slot)."""
        return CacheRule(
            ring=max(1, self.window_size // 2),
            pattern=partial(window_keep, window_size=self.window_size),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}"

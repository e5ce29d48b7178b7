"""Dilated self-attention: query i sees key j iff ``(p_i - s_j) % dilation_rate == 0``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from . import parallel
from ._validation import validate_positive
from .base import SelfAttention
from .block import block_tiling
from .cache import CacheRule
from .masks import dilation_keep
from .sparse import (
    TiledMechanism,
    Tiling,
    is_symbolic,
    merge_tiles,
    pad_positions,
    row_range,
    take_rows,
)

__all__ = ["DilatedMechanism", "DilatedSelfAttention", "DilatedTiling", "dilated_tiling"]


@dataclass(frozen=True)
class DilatedTiling(Tiling):
    """Tile u holds the queries ``u, u + r, u + 2r, ...`` and the keys of their residue
    class, ``u - key_pad, u - key_pad + r, ...``: the sequences reshaped to ``(M, r)``,
    transposed (the keys padded in front by ``key_pad``)."""

    dilation_rate: int
    key_pad: int
    interior_visible = True

    def pattern(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
        return dilation_keep(queries, keys, self.dilation_rate)

    def _classes(
        self, x: jax.Array, tiles: slice, first: int, size: int, index: jax.Array
    ) -> jax.Array:
        """``(G, L, D) -> (G, n, M, D)``: rows ``first + u + r·m`` for u in ``tiles``."""
        if is_symbolic(size, x.shape[1]):
            return take_rows(x, index[tiles])
        if size == 1:  # one row per class: the classes are consecutive rows
            return pad_positions(x, first + tiles.start, first + tiles.stop)[:, :, None]
        rate = self.dilation_rate
        padded = pad_positions(x, first, first + rate * size)
        classes = padded.reshape(x.shape[0], size, rate, x.shape[2]).transpose(0, 2, 1, 3)
        return classes[:, tiles]

    def query_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        return self._classes(x, tiles, 0, self.queries.shape[1], self.queries)

    def key_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        return self._classes(x, tiles, -self.key_pad, self.keys.shape[1], self.keys)

    def untile(self, out: jax.Array) -> jax.Array:
        # (G, N, M, D) -> (G, M·N, D): row m·N + u is query u + r·m (N = r, or M = 1)
        return row_range(merge_tiles(out.transpose(0, 2, 1, 3)), 0, self.length)


def dilated_tiling(
    length: int,
    dilation_rate: int,
    *,
    keys: int | None = None,
    query_start: int = 0,
    key_start: int = 0,
) -> Tiling:
    """One tile per residue class of positions, ``p ≡ query_start + u (mod r)``.

    A query sees exactly its own class, so each tile is a dense attention of
    ``M = ceil(L / r)`` queries (the last element padded where L is not a multiple of r)
    against the class's ``ceil((S + key_pad) / r)`` keys: time O(L·S / r), and the fast path
    runs the core's query-chunked kernel on the classes. ``key_pad = (key_start -
    query_start) % r`` puts key slot m of every class at the position of query slot
    m + ceil(d / r) (``d = query_start - key_start``), so causal is each tile's triangle
    when that is 0. With ``L <= r`` only L classes hold queries; when the keys are the
    queries as well every class is one position: the tiling of blocks of 1. In export
    mode there are r tiles (see ``sparse``).
    """
    keys = length if keys is None else keys
    exporting = is_symbolic(length, keys)
    aligned = query_start == key_start and keys == length
    if aligned and not exporting and dilation_rate >= length:
        return block_tiling(length, 1, keys=keys, query_start=query_start, key_start=key_start)
    rate = dilation_rate
    key_pad = (key_start - query_start) % rate
    size = -(-length // rate)
    key_size = -(-(keys + key_pad) // rate)
    tiles = rate if exporting else min(rate, length)
    classes = jnp.arange(tiles)[:, None]
    queries = classes + rate * jnp.arange(size)
    key_index = classes - key_pad + rate * jnp.arange(key_size)
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


class DilatedMechanism(TiledMechanism):
    """Keys whose distance to the query is a multiple of ``dilation_rate``, on tiles."""

    def validate(self) -> None:
        validate_positive("dilation_rate", self.dilation_rate)
        super().validate()

    def cache_rule(self) -> CacheRule:
        """Decoding: slot = position; a one-token step reads its residue class."""
        return CacheRule(
            stride=self.dilation_rate,
            pattern=partial(dilation_keep, dilation_rate=self.dilation_rate),
        )

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> Tiling:
        return dilated_tiling(
            length,
            self.dilation_rate,
            keys=keys,
            query_start=query_start,
            key_start=key_start,
        )

    def attend_sharded(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        spec: parallel.SequenceParallel,
        *,
        is_causal: bool,
        positions: jax.Array,
    ) -> jax.Array:
        """The residue classes as heads on the dense ring: q, k, v ``(B, H, Ll, D)`` ->
        ``(B, H, Ll, D)``.

        With ``r = dilation_rate`` dividing the chunk length, row i of every chunk sits at
        a position ``≡ i (mod r)``: ``(Ll, D) -> (Ll / r, r, D)`` puts each class's rows of
        the shard in order, and the shards' pieces of one class are that class's
        subsequence of ``L / r`` positions in the same layout. So the classes fold into
        ``H·r`` heads of ``Ll / r`` rows, attend densely by ``parallel.ring_attention``
        (causal: class index ``m' <= m``, the same rule) and unfold.
        """
        rate = self.dilation_rate
        chunk, name = parallel.chunk_length(q.shape[2], spec.layout)
        if chunk % rate:
            raise ValueError(
                f"{type(self).__name__}: sequence_parallel needs dilation_rate = {rate} to "
                f"divide the chunk length {name} = {chunk} (each chunk then holds whole "
                "strides of every residue class); pad the sequence or change the shard count"
            )
        batch, heads, local, d_head = q.shape

        def fold(x: jax.Array) -> jax.Array:
            # (B, H, Ll, D) -> (B, H, Ll / r, r, D) -> (B, H·r, Ll / r, D)
            x = x.reshape(batch, heads, local // rate, rate, d_head).transpose(0, 1, 3, 2, 4)
            return x.reshape(batch, heads * rate, local // rate, d_head)

        out = parallel.ring_attention(
            fold(q),
            fold(k),
            fold(v),
            axis=spec.axis,
            layout=spec.layout,
            is_causal=is_causal,
            scale=self.scale,
        )
        out = out.reshape(batch, heads, rate, local // rate, d_head).transpose(0, 1, 3, 2, 4)
        return out.reshape(batch, heads, local, d_head)


class DilatedSelfAttention(DilatedMechanism, SelfAttention):
    """Multi-head attention over a dilated pattern: key j visible from query i iff
    ``(p_i - s_j) % dilation_rate == 0``.

    Positions are regrouped by residue mod r into r dense attentions of length
    ``ceil(L / r)`` (a reshape): the fast path (``need_weights=False``) costs
    O(L · S · E / r) time and runs the core's query-chunked kernel on each group, never an
    ``(L, S)`` tensor. ``need_weights=True`` scatters the groups' weights into the dense
    ``(B, H, L, S)`` result.

    Example::

        attn = DilatedSelfAttention(d_model=128, dilation_rate=4, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, need_weights=False)   # (4, 8192, 128)
    """

    dilation_rate: int
    num_heads: int

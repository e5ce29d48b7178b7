"""Compact kernels shared by the sparse mechanisms (local, dilated, block).

A sparse pattern is computed on *tiles*. Query i sits at position ``query_start + i``
and key j at ``key_start + j`` (docs/semantics.md, "Positions"; both starts 0 in
self-attention). Tile t holds the query indices ``queries[t]`` ``(Q,)`` and the key indices
``keys[t]`` ``(W,)``; the mechanism chooses them so that every key a query may see lies in
that query's tile, and every query lies in exactly one tile. Indices outside ``[0, L)``
(queries) and ``[0, S)`` (keys) are padding: never visible, their outputs dropped. The
pattern and the causal rule are evaluated on positions, so a tile whose keys start
elsewhere than its queries (an offset, a longer key sequence) is handled like any other.

Each (batch, head) pair attends on its own, so they are flattened into ``G = B·H`` and the
tiles become the core's heads: ``(G, n, Q, D)`` queries against ``(G, n, W, D)`` keys.
The tilings lay tiles out with slices and reshapes (overlapping key windows with one
gather); only tiles at the ends, which hold padding, are padded. The core
(``functional.dot_product_attention``) runs on the tiles in steps: the end tiles, each
with its own mask, and the interior, whose tiles share one ``(Q, W)`` mask or none; its
fast path walks over steps of query chunks (``functional.STEP_PAIRS``), so it holds
``O(G·N·min(Q, QUERY_CHUNK)·W)`` scores at most and never an ``(L, S)`` tensor; the
weights path scatters the compact weights into the dense ``(B, H, L, S)``. Shapes are
static and positions are ``iota`` arithmetic: no tables and no Python loop over
positions (the steps are at most three).

Export mode: under ``jax.export`` with a symbolic length, sizes cannot be compared, so
nothing may be sliced, padded or counted by an amount that needs the sign of an
expression in L. The tilings then use a chunk that does not depend on L (the tile count
is a ceiling division), lay tiles out with gathers (``take_rows``), and the whole tiling
runs in one step whose mask is built from positions for every tile.

Shape legend: B batch, L query length, S key length, H heads (the sparse classes have as
many kv heads as query heads), G = B·H, D head width, N tiles, n tiles in one step,
Q queries and W keys per tile.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from . import parallel
from ._validation import validate_start
from .base import Mechanism
from .functional import dot_product_attention
from .masks import combine_masks

__all__ = [
    "TiledMechanism",
    "Tiling",
    "WindowTiling",
    "is_symbolic",
    "merge_tiles",
    "pad_positions",
    "row_range",
    "take_rows",
    "tiled_attention",
    "window_edges",
    "window_tiling",
    "windows",
]


def is_symbolic(*sizes) -> bool:
    """Some size is symbolic (``jax.export``): the plan must not compare it."""
    return not all(isinstance(size, int) for size in sizes)


def pad_positions(x: jax.Array, start: int, stop: int) -> jax.Array:
    """Rows ``start:stop`` of ``(G, L, D)``, zero rows where they fall outside ``[0, L)``."""
    length = x.shape[1]
    inside = x[:, max(start, 0) : max(min(stop, length), 0)]
    before = min(max(-start, 0), stop - start)
    after = stop - start - before - inside.shape[1]
    return inside if before == after == 0 else jnp.pad(inside, ((0, 0), (before, after), (0, 0)))


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``(G, L, D)`` at an integer ``index`` of any shape ``I``: ``(G, *I, D)``, zero rows
    where the index falls outside ``[0, L)``.

    A gather: export mode's layout, where no amount may be computed from L.
    """
    inside = (index >= 0) & (index < x.shape[1])
    rows = x[:, jnp.where(inside, index, 0)]
    return jnp.where(inside[..., None], rows, 0)


def windows(x: jax.Array, first: int, count: int, width: int, step: int) -> jax.Array:
    """``(G, L, D) -> (G, n, width, D)``: n windows of ``width`` rows every ``step`` rows from
    row ``first``, zero rows outside ``[0, L)``.

    The padded range reshaped (``width == step``) or gathered once (overlapping windows);
    rows gathered at their indices when a size is symbolic.
    """
    if is_symbolic(count, x.shape[1]):
        index = first + jnp.arange(count)[:, None] * step
        return take_rows(x, index + jnp.arange(width))
    piece = pad_positions(x, first, first + (count - 1) * step + width)
    if width == step:
        return piece.reshape(x.shape[0], count, width, x.shape[2])
    # (G, n, width, D) windows of width rows every step rows
    return piece[:, (jnp.arange(count) * step)[:, None] + jnp.arange(width)]


def row_range(x: jax.Array, start: int, length: int) -> jax.Array:
    """Rows ``start..start+L-1`` of ``(G, M, D)``, which holds them (a gather when a size is
    symbolic, where ``start + L <= M`` cannot be proven)."""
    if is_symbolic(length, x.shape[1]):
        return take_rows(x, start + jnp.arange(length))
    return x[:, start : start + length]


def merge_tiles(x: jax.Array) -> jax.Array:
    """``(G, N, Q, D) -> (G, N·Q, D)``."""
    groups, tiles, width, d_head = x.shape
    return x.reshape(groups, tiles * width, d_head)


def window_edges(tiles: int, first: int, step: int, width: int, size: int) -> tuple[int, int]:
    """How many of ``tiles`` windows (``width`` indices every ``step`` from ``first``) reach
    before 0, and how many past ``size``: the tiles at the front and at the back that hold
    padding."""
    front = min(max(-(first // step), 0), tiles) if first < 0 else 0
    # window t ends past size iff first + t·step + width > size
    inside = (size - width - first) // step + 1
    return front, min(max(tiles - inside, 0), tiles)


@dataclass(frozen=True)
class Tiling:
    """Where the tiles lie: ``queries`` ``(N, Q)`` and ``keys`` ``(N, W)`` indices.

    ``queries`` holds every index ``0..L-1`` once (others are padding). Query index i sits
    at position ``query_start + i``, key index j at ``key_start + j``. ``edges``: how many
    tiles at the front and at the back hold padding (queries outside ``[0, L)`` or keys
    outside ``[0, S)``); the others hold only indices in range. ``None`` in export mode:
    every tile gets its mask from positions. Subclasses lay the tiles out
    (``query_tiles``, ``key_tiles``, ``untile``) and state the pattern (``pattern``).
    """

    queries: jax.Array
    keys: jax.Array
    length: int
    edges: tuple[int, int] | None
    key_length: int = field(kw_only=True)
    query_start: int = field(default=0, kw_only=True)
    key_start: int = field(default=0, kw_only=True)
    tile_causal: bool = field(default=False, kw_only=True)
    """Causal is each tile's own lower triangle: query slot u and key slot u sit at the
    same position in every tile, so ``s <= p`` is ``w <= u`` (the core's ``is_causal``)."""

    interior_visible = False
    """Every pair of in-range indices of a tile is visible under the pattern (blocks,
    residue classes); local tiles hold a band."""

    def query_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        """``(G, L, D) -> (G, n, Q, D)``, the queries of ``tiles``."""
        raise NotImplementedError

    def key_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        """``(G, S, D) -> (G, n, W, D)``, the keys of ``tiles``."""
        raise NotImplementedError

    def untile(self, out: jax.Array) -> jax.Array:
        """``(G, N, Q, D) -> (G, L, D)``: each query's row back in place."""
        raise NotImplementedError

    def pattern(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
        """The mechanism's rule on positions p (queries) and s (keys), broadcasting."""
        raise NotImplementedError

    def explicit_keep(self, tiles: slice, is_causal: bool) -> jax.Array:
        """``(1, 1, n, Q, W)``: pattern AND causal on positions AND both indices in range."""
        rows, cols = self.queries[tiles][:, :, None], self.keys[tiles][:, None, :]
        queries, keys = rows + self.query_start, cols + self.key_start
        keep = (
            self.pattern(queries, keys)
            & (rows >= 0)
            & (rows < self.length)
            & (cols >= 0)
            & (cols < self.key_length)
        )
        if is_causal:
            keep = keep & (keys <= queries)
        return keep[None, None]

    def keep(self, tiles: slice, is_causal: bool) -> jax.Array | None:
        """``(1, 1, n|1, Q, W)``: what the queries of ``tiles`` may see, the causal rule
        included; ``None`` when every pair is visible up to ``tile_causal`` (the caller
        then applies ``is_causal`` to the tiles)."""
        if not self.interior(tiles):
            return self.explicit_keep(tiles, is_causal)
        if self.interior_visible and (self.tile_causal or not is_causal):
            return None
        # away from the ends the tiles sit alike (the same offsets between their query and
        # key positions): one tile's mask serves all
        return self.explicit_keep(slice(tiles.start, tiles.start + 1), is_causal)

    def interior(self, tiles: slice) -> bool:
        """``tiles`` hold no padding index."""
        if self.edges is None:
            return False
        front, back = self.edges
        return tiles.start >= front and tiles.stop <= self.queries.shape[0] - back


@dataclass(frozen=True)
class WindowTiling(Tiling):
    """Tiles of Q consecutive queries from index ``query_first``, tile t with W consecutive
    keys from index ``key_first + t·key_step`` (local windows, blocks)."""

    query_first: int
    key_first: int
    key_step: int

    def query_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        width = self.queries.shape[1]
        first = self.query_first + tiles.start * width
        return windows(x, first, tiles.stop - tiles.start, width, width)

    def key_tiles(self, x: jax.Array, tiles: slice) -> jax.Array:
        first = self.key_first + tiles.start * self.key_step
        return windows(x, first, tiles.stop - tiles.start, self.keys.shape[1], self.key_step)

    def untile(self, out: jax.Array) -> jax.Array:
        return row_range(merge_tiles(out), -self.query_first, self.length)


def window_tiling(
    cls: type[WindowTiling],
    *,
    tiles: int,
    width: int,
    key_width: int,
    key_step: int,
    query_first: int,
    key_first: int,
    length: int,
    keys: int,
    query_start: int,
    key_start: int,
    **fields,
) -> WindowTiling:
    """A ``WindowTiling`` subclass ``cls`` with its indices, edges and ``tile_causal``:
    tile t holds queries ``query_first + t·Q + (0..Q-1)`` (``Q = width``) and keys
    ``key_first + t·key_step + (0..W-1)`` (``W = key_width``)."""
    starts = jnp.arange(tiles)
    queries = (query_first + starts * width)[:, None] + jnp.arange(width)
    key_index = (key_first + starts * key_step)[:, None] + jnp.arange(key_width)
    edges = None
    if not is_symbolic(tiles, length, keys):
        query_front, query_back = window_edges(tiles, query_first, width, width, length)
        key_front, key_back = window_edges(tiles, key_first, key_step, key_width, keys)
        front = max(query_front, key_front)
        edges = (front, min(max(query_back, key_back), tiles - front))
    # slot u of the queries and of the keys sit at one position in every tile
    same_start = query_start + query_first == key_start + key_first
    one_tile = isinstance(tiles, int) and tiles == 1
    return cls(
        queries,
        key_index,
        length,
        edges,
        key_length=keys,
        query_start=query_start,
        key_start=key_start,
        tile_causal=same_start and (width == key_step or one_tile),
        query_first=query_first,
        key_first=key_first,
        key_step=key_step,
        **fields,
    )


def _steps(tiling: Tiling) -> Iterator[slice]:
    """The front edge tiles, the interior, the back edge; one step in export mode."""
    tiles = tiling.queries.shape[0]
    if tiling.edges is None:
        yield slice(0, tiles)
        return
    front, back = tiling.edges
    if front:
        yield slice(0, front)
    if front + back < tiles:
        yield slice(front, tiles - back)
    if back:
        yield slice(tiles - back, tiles)


def _gather_mask(
    mask: jax.Array | None, queries: jax.Array, keys: jax.Array, length: int, key_length: int
) -> jax.Array | None:
    """A rank-4 keep-mask ``(B', H', L|1, S|1)`` at the tiles: ``(B', H', n|1, Q|1, W|1)``.

    Padding indices are sent to an index in range; ``keep`` hides them anyway."""
    if mask is None:
        return None
    rows = jnp.clip(queries, 0, length - 1)
    cols = jnp.clip(keys, 0, key_length - 1)
    broadcast_rows, broadcast_cols = (_is_one(mask.shape[axis]) for axis in (2, 3))
    if broadcast_rows and broadcast_cols:
        return mask[:, :, :, None]
    if broadcast_rows:
        return mask[:, :, 0][:, :, cols][:, :, :, None, :]
    if broadcast_cols:
        return mask[:, :, rows]
    return mask[:, :, rows[:, :, None], cols[:, None, :]]


def _is_one(size) -> bool:
    """A size known to be 1 (a symbolic size never counts as broadcast)."""
    return isinstance(size, int) and size == 1


def _fold(keep: jax.Array, batch: int, heads: int) -> jax.Array:
    """``(B'|1, H'|1, n', Q', W') -> (G | 1, n', Q', W')``, the layout of the tiles."""
    if _is_one(keep.shape[0]) and _is_one(keep.shape[1]):
        return keep[0]
    rest = keep.shape[2:]
    return jnp.broadcast_to(keep, (batch, heads, *rest)).reshape(batch * heads, *rest)


def _scatter(tile_weights: jax.Array, tiling: Tiling) -> jax.Array:
    """The tiles' weights ``(B, H, N, Q, W)`` placed in a dense ``(B, H, L, S)``.

    Each visible pair lies in exactly one tile, so adding into zeros places it. Pairs with
    a padding index weigh exactly 0 (``keep`` hides them), so sending them to any index
    in range adds nothing.
    """
    batch, heads = tile_weights.shape[:2]
    length, keys = tiling.length, tiling.key_length
    rows = jnp.clip(tiling.queries, 0, length - 1)
    cols = jnp.clip(tiling.keys, 0, keys - 1)
    index = (rows[:, :, None] * keys + cols[:, None, :]).reshape(-1)
    weights = jnp.zeros((batch, heads, length * keys), tile_weights.dtype)
    weights = weights.at[:, :, index].add(tile_weights.reshape(batch, heads, index.size))
    return weights.reshape(batch, heads, length, keys)


def tiled_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    tiling: Tiling,
    *,
    is_causal: bool,
    scale: float,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
    need_weights: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """Attention restricted to a tiled pattern.

    Args:
      q: ``(B, H, L, D)``; k, v: ``(B, H, S, D)``.
      mask: the caller's rank-4 keep-mask ``(B', H', L|1, S|1)`` or ``None``; it is gathered
        at the tiles, so it costs ``O(N·Q·W)`` per ``(B', H')``.
      tiling: the tiles, their positions and their pattern; see ``Tiling``.
      is_causal, scale, dropout_rate, dropout_rng, need_weights: as in
        ``dot_product_attention`` (``is_causal`` and ``need_weights`` static); causal is
        ``s <= p`` on the tiling's positions.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)``; weights ``(B, H, L, S)``, exactly zero
      outside the pattern, or ``None``.
    """
    batch, heads, length, d_head = q.shape
    keys = k.shape[2]
    groups = batch * heads
    q = q.reshape(groups, length, d_head)
    k, v = (x.reshape(groups, keys, d_head) for x in (k, v))
    tiles = tiling.queries.shape[0]
    # the core's fast path walks over query chunks, so the interior needs no more steps
    steps = [slice(0, tiles)] if need_weights else list(_steps(tiling))
    outs = []
    for index, step in enumerate(steps):
        tile_keep = tiling.keep(step, is_causal)
        keep = combine_masks(
            tile_keep,
            _gather_mask(mask, tiling.queries[step], tiling.keys[step], length, keys),
        )
        out, weights = dot_product_attention(
            tiling.query_tiles(q, step),
            tiling.key_tiles(k, step),
            tiling.key_tiles(v, step),
            None if keep is None else _fold(keep, batch, heads),
            # a tile mask carries the causal rule; without one it is the tiles' triangle
            is_causal=is_causal and tile_keep is None,
            scale=scale,
            dropout_rate=dropout_rate,
            dropout_rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, index),
            need_weights=need_weights,
        )
        outs.append(out)
    out = tiling.untile(jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0])
    out = out.reshape(batch, heads, length, d_head)
    if not need_weights:
        return out, None
    weights = weights.reshape(batch, heads, *tiling.queries.shape, tiling.keys.shape[1])
    return out, _scatter(weights, tiling)


class TiledMechanism(Mechanism):
    """A mechanism whose pattern is computed on the tiles of ``tiling``."""

    positional = True
    """The patterns are stated on positions: no cross-attention (``base.Mechanism``)."""

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> Tiling:
        """The tiles of L queries at ``query_start..`` against S keys (``keys``, default L)
        at ``key_start..``; ``is_causal`` may shrink them."""
        raise NotImplementedError

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
        """Each pattern has its own sharded form (local, block, dilated): the dense ring
        would ignore the pattern."""
        raise NotImplementedError

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None,
        *,
        is_causal: bool,
        need_weights: bool,
        dropout_rng: jax.Array | None = None,
        query_positions: int | None = None,
        key_positions: int | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """As ``Mechanism.attend``, with positions given as start offsets only (Python
        ints): the tiles are planned from them."""
        validate_start("query_positions", query_positions)
        validate_start("key_positions", key_positions)
        tiling = self.tiling(
            q.shape[2],
            keys=k.shape[2],
            query_start=query_positions or 0,
            key_start=key_positions or 0,
            is_causal=is_causal,
        )
        return tiled_attention(
            q,
            k,
            v,
            mask,
            tiling,
            is_causal=is_causal,
            scale=self.scale,
            dropout_rate=self.dropout,
            dropout_rng=dropout_rng,
            need_weights=need_weights,
        )

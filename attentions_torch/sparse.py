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
The tilings lay tiles out as views of the inputs (overlapping windows included, so no key
is copied per tile); only tiles at the ends, which hold padding, are copied. The core
(``functional.dot_product_attention``) runs on the tiles in steps: the end tiles, each
with its own mask, and the interior, whose tiles share one ``(Q, W)`` mask or none. So
the fast path holds ``O(N·Q·W)`` at most and never an ``(L, S)`` tensor; the weights path
scatters the compact weights into the dense ``(B, H, L, S)``.

Export mode: under ``torch.export`` (``torch.compiler.is_exporting()``) L may be symbolic,
and plans that slice, pad or loop by amounts computed from it would pin it to the traced
value. The tilings then use a chunk that does not depend on L (the tile count is a
ceiling division, plus one tile of padding: ``tile_count``), lay tiles out and back with
gathers (``take_rows``), and the whole tiling runs in one step whose mask is built from
positions for every tile. The weights path, ``(B, H, L, S)`` anyway, runs the dense core
with the pattern's ``(L, S)`` mask (``Tiling.dense_keep``).

Shape legend: B batch, L query length, S key length, H heads (the sparse classes have as
many kv heads as query heads), G = B·H, D head width, N tiles, n tiles in one step,
Q queries and W keys per tile.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import parallel
from ._validation import validate_start
from .base import SelfAttention
from .functional import dot_product_attention
from .masks import combine_masks

__all__ = [
    "MASKED_PAIRS_PER_STEP",
    "TiledSelfAttention",
    "Tiling",
    "WindowTiling",
    "merge_tiles",
    "pad_positions",
    "sharded_chunk",
    "take_rows",
    "tile_count",
    "tiled_attention",
    "window_edges",
    "window_index",
    "window_tiling",
    "windows",
]

MASKED_PAIRS_PER_STEP = 2**23
"""Query-key pairs ``G·n·Q·W`` of one step when a caller's mask comes with the tiles.

The mask gathered at the tiles is held whole per step (and SDPA makes a float copy of it),
so those steps are bounded; without a caller's mask the interior is one step.
"""


def pad_positions(x: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``(G, L, D)``, zero rows where they fall outside ``[0, L)``.

    A view when the range lies inside the sequence; a copy of the range otherwise.
    """
    length = x.shape[1]
    inside = x[:, max(start, 0) : max(min(stop, length), 0)]
    before = min(max(-start, 0), stop - start)
    after = stop - start - before - inside.shape[1]
    return inside if before == after == 0 else F.pad(inside, (0, 0, before, after))


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``(G, L, D)`` at an integer ``index`` of any shape ``I``: ``(G, *I, D)``, zero rows
    where the index falls outside ``[0, L)``.

    A gather (a copy): export mode's layout, where no amount may be computed from L.
    """
    inside = (index >= 0) & (index < x.shape[1])
    rows = x[:, torch.where(inside, index, 0)]
    return torch.where(inside[..., None], rows, 0)


def windows(x: Tensor, first: int, count: int, width: int, step: int) -> Tensor:
    """``(G, L, D) -> (G, n, width, D)``: n windows of ``width`` rows every ``step`` rows from
    row ``first``, zero rows outside ``[0, L)``.

    Views where possible: the padded range reshaped (``width == step``) or unfolded
    (overlapping windows, so no row is copied per window).
    """
    if torch.compiler.is_exporting():
        index = first + torch.arange(count, device=x.device)[:, None] * step
        return take_rows(x, index + torch.arange(width, device=x.device))
    piece = pad_positions(x, first, first + (count - 1) * step + width)
    if width == step:
        return piece.view(x.shape[0], count, width, x.shape[2])
    if torch.compiler.is_compiling():
        # inductor (torch 2.13) miscompiles the backward of overlapping views: its
        # unfold_backward writes out of bounds. A gather of the windows compiles safely.
        index = torch.arange(count, device=x.device)[:, None] * step
        return piece[:, index + torch.arange(width, device=x.device)]
    # (G, n, D, width) windows of width rows every step rows, overlapping views
    return piece.unfold(1, width, step).transpose(2, 3)


def tile_count(length: int, width: int) -> int:
    """``ceil(L / width)`` tiles; in export mode one more (all padding), so that a symbolic
    count is provably at least 2 and no size-1 special case of a tensor op pins L."""
    tiles = -(-length // width)
    return tiles + 1 if torch.compiler.is_exporting() else tiles


def merge_tiles(x: Tensor) -> Tensor:
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

    queries: Tensor
    keys: Tensor
    length: int
    edges: tuple[int, int] | None
    key_length: int = field(kw_only=True)
    query_start: int = field(default=0, kw_only=True)
    key_start: int = field(default=0, kw_only=True)
    tile_causal: bool = field(default=False, kw_only=True)
    """Causal is each tile's own lower triangle: query slot u and key slot u sit at the
    same position in every tile, so ``s <= p`` is ``w <= u`` (SDPA's ``is_causal``)."""

    interior_visible = False
    """Every pair of in-range indices of a tile is visible under the pattern (blocks,
    residue classes); local tiles hold a band."""

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        """``(G, L, D) -> (G, n, Q, D)``, the queries of ``tiles``."""
        raise NotImplementedError

    def key_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        """``(G, S, D) -> (G, n, W, D)``, the keys of ``tiles``."""
        raise NotImplementedError

    def untile(self, out: Tensor) -> Tensor:
        """``(G, N, Q, D) -> (G, L, D)``: each query's row back in place."""
        raise NotImplementedError

    def pattern(self, queries: Tensor, keys: Tensor) -> Tensor:
        """The mechanism's rule on positions p (queries) and s (keys), broadcasting."""
        raise NotImplementedError

    def explicit_keep(self, tiles: slice, is_causal: bool) -> Tensor:
        """``(1, 1, n, Q, W)``: pattern AND causal on positions AND both indices in range.

        Tilings whose tiles each lie inside one block or class (``interior_visible``) need
        no pattern: the ranges (and causal) are the whole mask."""
        rows, cols = self.queries[tiles][:, :, None], self.keys[tiles][:, None, :]
        keep = (rows >= 0) & (rows < self.length) & (cols >= 0) & (cols < self.key_length)
        queries, keys = rows + self.query_start, cols + self.key_start
        if not self.interior_visible:
            keep = keep & self.pattern(queries, keys)
        if is_causal:
            keep = keep & (keys <= queries)
        return keep[None, None]

    def dense_keep(self, is_causal: bool) -> Tensor:
        """``(1, 1, L, S)``: pattern AND causal on the positions of all queries and keys."""
        device = self.queries.device
        queries = torch.arange(self.length, device=device)[:, None] + self.query_start
        keys = torch.arange(self.key_length, device=device)[None, :] + self.key_start
        keep = self.pattern(queries, keys)
        if is_causal:
            keep = keep & (keys <= queries)
        return keep[None, None]

    def keep(self, tiles: slice, is_causal: bool) -> Tensor | None:
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

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        width = self.queries.shape[1]
        first = self.query_first + tiles.start * width
        return windows(x, first, tiles.stop - tiles.start, width, width)

    def key_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        first = self.key_first + tiles.start * self.key_step
        return windows(x, first, tiles.stop - tiles.start, self.keys.shape[1], self.key_step)

    def untile(self, out: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            # a gather: merging the symbolic tile axis by a reshape would pin L
            index = torch.arange(self.length, device=out.device) - self.query_first
            width = self.queries.shape[1]
            return out[:, index // width, index % width]
        merged = merge_tiles(out)
        return merged[:, -self.query_first : -self.query_first + self.length]


def window_index(
    first: int, count: int, width: int, step: int, device: torch.device | None
) -> Tensor:
    """``(n, width)`` indices of n windows of ``width`` every ``step`` from ``first``."""
    if step == width and not torch.compiler.is_exporting():
        return torch.arange(first, first + count * width, device=device).view(count, width)
    starts = first + torch.arange(count, device=device) * step
    return starts[:, None] + torch.arange(width, device=device)


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
    device: torch.device | None,
    **fields,
) -> WindowTiling:
    """A ``WindowTiling`` subclass ``cls`` with its indices, edges and ``tile_causal``:
    tile t holds queries ``query_first + t·Q + (0..Q-1)`` (``Q = width``) and keys
    ``key_first + t·key_step + (0..W-1)`` (``W = key_width``)."""
    queries = window_index(query_first, tiles, width, width, device)
    key_index = queries
    if (key_first, key_step, key_width) != (query_first, width, width):
        key_index = window_index(key_first, tiles, key_width, key_step, device)
    edges = None
    if not torch.compiler.is_exporting():
        query_front, query_back = window_edges(tiles, query_first, width, width, length)
        key_front, key_back = window_edges(tiles, key_first, key_step, key_width, keys)
        front = max(query_front, key_front)
        edges = (front, min(max(query_back, key_back), tiles - front))
    # slot u of the queries and of the keys sit at one position in every tile
    same_start = query_start + query_first == key_start + key_first
    return cls(
        queries,
        key_index,
        length,
        edges,
        key_length=keys,
        query_start=query_start,
        key_start=key_start,
        tile_causal=same_start and (width == key_step or tiles == 1),
        query_first=query_first,
        key_first=key_first,
        key_step=key_step,
        **fields,
    )


def _steps(tiling: Tiling, per_step: int) -> Iterator[slice]:
    """The front edge tiles, the interior ``per_step`` tiles at a time, the back edge."""
    tiles = tiling.queries.shape[0]
    front, back = tiling.edges
    if front:
        yield slice(0, front)
    for start in range(front, tiles - back, per_step):
        yield slice(start, min(start + per_step, tiles - back))
    if back:
        yield slice(tiles - back, tiles)


def _gather_mask(
    mask: Tensor | None, queries: Tensor, keys: Tensor, length: int, key_length: int
) -> Tensor | None:
    """A rank-4 keep-mask ``(B', H', L|1, S|1)`` at the tiles: ``(B', H', n|1, Q|1, W|1)``.

    Padding indices are sent to an index in range; ``keep`` hides them anyway."""
    if mask is None:
        return None
    rows = queries.clamp(0, length - 1)
    cols = keys.clamp(0, key_length - 1)
    if mask.shape[2] == 1 and mask.shape[3] == 1:
        return mask[:, :, :, None]
    if mask.shape[2] == 1:
        return mask[:, :, 0][:, :, cols][:, :, :, None, :]
    if mask.shape[3] == 1:
        return mask[:, :, rows]
    return mask[:, :, rows[:, :, None], cols[:, None, :]]


def _fold(keep: Tensor, batch: int, heads: int) -> Tensor:
    """``(B'|1, H'|1, n', Q', W') -> (G | 1, n', Q', W')``, the layout of the tiles."""
    if keep.shape[0] * keep.shape[1] == 1:
        return keep[0]
    rest = keep.shape[2:]
    return keep.expand(batch, heads, *rest).reshape(batch * heads, *rest)


def _scatter(tile_weights: Tensor, tiling: Tiling) -> Tensor:
    """The tiles' weights ``(B, H, N, Q, W)`` placed in a dense ``(B, H, L, S)``.

    Each visible pair lies in exactly one tile, so adding into zeros places it. Pairs with
    a padding index weigh exactly 0 (``keep`` hides them), so sending them to any index
    in range adds nothing.
    """
    batch, heads = tile_weights.shape[:2]
    length, keys = tiling.length, tiling.key_length
    rows = tiling.queries.clamp(0, length - 1)[:, :, None]
    cols = tiling.keys.clamp(0, keys - 1)[:, None, :]
    index = (rows * keys + cols).reshape(1, 1, -1)
    pairs = index.shape[2]
    weights = tile_weights.new_zeros(batch, heads, length * keys)
    weights.scatter_add_(
        2, index.expand(batch, heads, pairs), tile_weights.reshape(batch, heads, pairs)
    )
    return weights.view(batch, heads, length, keys)


def _plan(tiling: Tiling, mask: Tensor | None, groups: int, need_weights: bool) -> list[slice]:
    """The steps over the tiles: one for the weights path and in export mode; the fast
    path's are the edges and the interior, bounded with a caller's mask."""
    tiles, queries = tiling.queries.shape
    if need_weights or tiling.edges is None:
        return [slice(0, tiles)]
    per_step = tiles
    if mask is not None:
        pairs = max(1, groups * queries * tiling.keys.shape[1])  # B may be 0
        per_step = max(1, MASKED_PAIRS_PER_STEP // pairs)
    return list(_steps(tiling, per_step))


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    tiling: Tiling,
    *,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    need_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """Attention restricted to a tiled pattern.

    Args:
      q: ``(B, H, L, D)``; k, v: ``(B, H, S, D)``.
      mask: the caller's rank-4 keep-mask ``(B', H', L|1, S|1)`` or ``None``; it is gathered
        at the tiles, so it costs ``O(N·Q·W)`` per ``(B', H')``.
      tiling: the tiles, their positions and their pattern; see ``Tiling``.
      is_causal, scale, dropout_p, need_weights: as in ``dot_product_attention``; causal is
        ``s <= p`` on the tiling's positions.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)``; weights ``(B, H, L, S)``, exactly zero
      outside the pattern, or ``None``.
    """
    if need_weights and torch.compiler.is_exporting():
        # the weights are (B, H, L, S) anyway; the tiles' scores would need reshapes that
        # merge the symbolic tile axis, which pin L
        keep = combine_masks(tiling.dense_keep(is_causal), mask)
        return dot_product_attention(
            q, k, v, keep, scale=scale, dropout_p=dropout_p, need_weights=True
        )
    batch, heads, length, d_head = q.shape
    keys = k.shape[2]
    groups = batch * heads
    q = q.reshape(groups, length, d_head)
    k, v = (x.reshape(groups, keys, d_head) for x in (k, v))
    outs = []
    for step in _plan(tiling, mask, groups, need_weights):
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
            dropout_p=dropout_p,
            need_weights=need_weights,
        )
        outs.append(out)
    out = tiling.untile(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    out = out.reshape(batch, heads, length, d_head)
    if not need_weights:
        return out, None
    weights = weights.view(batch, heads, *tiling.queries.shape, tiling.keys.shape[1])
    return out, _scatter(weights, tiling)


def sharded_chunk(spec: parallel.SequenceParallel, local: int) -> tuple[int, str]:
    """The chunk length c of a shard of ``local`` positions (``Ll`` contiguous, ``Ll / 2``
    zigzag) and its name in an error, e.g. ``"L/2N = 2 (L = 16, N = 4, zigzag)"``."""
    shards = dist.get_world_size(spec.group)
    length = local * shards
    if spec.layout == "zigzag":
        return local // 2, f"L/2N = {local // 2} (L = {length}, N = {shards}, zigzag)"
    return local, f"L/N = {local} (L = {length}, N = {shards})"


class TiledSelfAttention(SelfAttention):
    """A ``SelfAttention`` whose pattern is computed on the tiles of ``tiling``."""

    positional = True

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
        """The tiles of L queries at ``query_start..`` against S keys (``keys``, default L)
        at ``key_start..``; ``is_causal`` may shrink them."""
        raise NotImplementedError

    def attend_chunks(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        spec: parallel.SequenceParallel,
        *,
        is_causal: bool,
        before: int,
        after: int,
        query_start: int,
        key_start: int,
    ) -> Tensor:
        """Each chunk of this rank's shard attending, through the compact kernel, to its
        keys between ``before`` keys of the previous chunk and ``after`` of the next
        (``parallel.halo_exchange``; no exchange when both are 0).

        q, k, v ``(B, H, Ll, D)``, n chunks of c (``parallel.shard_chunks``). A chunk's
        queries sit at ``query_start``, its extended keys at ``key_start``: offsets that
        keep the pattern of the global positions (it depends on their differences, and
        for blocks on a start that is a multiple of the block size). Halo keys past an
        end of the sequence are hidden by a key-only keep-mask. Returns ``(B, H, Ll, D)``.
        """
        group, layout = spec.group, spec.layout
        rank, shards = dist.get_rank(group), dist.get_world_size(group)
        held = parallel.shard_chunks(rank, shards, layout)
        if shards > 1:
            parallel.check_equal_shards(q, k, group)
        kv = torch.stack((k, v))  # (2, B, H, Ll, D): one exchange for both
        if before or after:
            kv = parallel.halo_exchange(kv, group=group, layout=layout, before=before, after=after)
        else:
            kv = kv.unflatten(-2, (len(held), -1))
        queries = q.unflatten(2, (len(held), -1))  # (B, H, n, c, D)
        outs = []
        for slot, index in enumerate(held):
            keep = parallel.chunk_keep(
                index,
                shards * len(held),
                before=before,
                length=queries.shape[3],
                after=after,
                device=q.device,
            )
            out, _ = self.attend(
                queries[:, :, slot],
                kv[0, :, :, slot],
                kv[1, :, :, slot],
                keep,
                is_causal=is_causal,
                need_weights=False,
                query_positions=query_start,
                key_positions=key_start,
            )
            outs.append(out)
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        *,
        is_causal: bool,
        need_weights: bool,
        query_positions: int | None = None,
        key_positions: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``SelfAttention.attend``, with positions given as start offsets only (Python
        ints): the tiles are planned from them."""
        validate_start("query_positions", query_positions)
        validate_start("key_positions", key_positions)
        tiling = self.tiling(
            q.shape[2],
            keys=k.shape[2],
            query_start=query_positions or 0,
            key_start=key_positions or 0,
            is_causal=is_causal,
            device=q.device,
        )
        return tiled_attention(
            q,
            k,
            v,
            mask,
            tiling,
            is_causal=is_causal,
            scale=self.scale,
            dropout_p=self.dropout_p,
            need_weights=need_weights,
        )

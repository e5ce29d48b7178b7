"""Compact kernels shared by the sparse mechanisms (local, dilated, block).

A sparse pattern is computed on *tiles*. Tile t holds the query positions ``queries[t]``
``(Q,)`` and the key positions ``keys[t]`` ``(S,)``; the mechanism chooses them so that
every key a query may see lies in that query's tile, and every query lies in exactly one
tile. Positions outside ``[0, L)`` are padding: never visible, their outputs dropped.

Each (batch, head) pair attends on its own, so they are flattened into ``G = B·H`` and the
tiles become the core's heads: ``(G, n, Q, D)`` queries against ``(G, n, S, D)`` keys.
The tilings lay tiles out as views of the inputs (overlapping windows included, so no key
is copied per tile); only tiles at the ends, which hold padding, are copied. The core
(``functional.dot_product_attention``) runs on the tiles in steps: the end tiles, each
with its own mask, and the interior, whose tiles share one ``(Q, S)`` mask or none. So
the fast path holds ``O(N·Q·S)`` at most and never an ``(L, L)`` tensor; the weights path
scatters the compact weights into the dense ``(B, H, L, L)``.

Shape legend: B batch, L length, H heads (the sparse classes have as many kv heads as
query heads), G = B·H, D head width, N tiles, n tiles in one step, Q queries and S keys
per tile.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import SelfAttention
from .functional import dot_product_attention
from .masks import combine_masks

__all__ = [
    "MASKED_PAIRS_PER_STEP",
    "AlignedTiling",
    "TiledSelfAttention",
    "Tiling",
    "merge_tiles",
    "pad_positions",
    "tiled_attention",
]

MASKED_PAIRS_PER_STEP = 2**23
"""Query-key pairs ``G·n·Q·S`` of one step when a caller's mask comes with the tiles.

The mask gathered at the tiles is held whole per step (and SDPA makes a float copy of it),
so those steps are bounded; without a caller's mask the interior is one step.
"""


def pad_positions(x: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``(G, L, D)``, zero rows where they fall outside ``[0, L)``.

    A view when the range lies inside the sequence; a copy of the range otherwise.
    """
    length = x.shape[1]
    inside = x[:, max(start, 0) : min(stop, length)]
    before, after = max(-start, 0), max(stop - length, 0)
    return inside if before == after == 0 else F.pad(inside, (0, 0, before, after))


def merge_tiles(x: Tensor) -> Tensor:
    """``(G, N, Q, D) -> (G, N·Q, D)``."""
    groups, tiles, width, d_head = x.shape
    return x.reshape(groups, tiles * width, d_head)


@dataclass(frozen=True)
class Tiling:
    """Where the tiles lie: ``queries`` ``(N, Q)`` and ``keys`` ``(N, S)`` positions.

    ``queries`` holds every position ``0..N·Q-1`` once (those ``>= L`` are padding).
    ``edges``: how many tiles at the front and at the back hold padding positions; the
    others hold only positions in range. Subclasses lay the tiles out (``query_tiles``,
    ``key_tiles``, ``untile``) and say which pairs of a tile are visible (``keep``).
    """

    queries: Tensor
    keys: Tensor
    length: int
    edges: tuple[int, int]

    tile_causal = False
    """``is_causal`` is the tiles' own lower triangle (keys are the queries, in order)."""

    def query_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        """``(G, L, D) -> (G, n, Q, D)``, the queries of ``tiles``."""
        raise NotImplementedError

    def key_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        """``(G, L, D) -> (G, n, S, D)``, the keys of ``tiles``."""
        raise NotImplementedError

    def untile(self, out: Tensor) -> Tensor:
        """``(G, N, Q, D) -> (G, L, D)``: each position's row back in place."""
        raise NotImplementedError

    def keep(self, tiles: slice, is_causal: bool) -> Tensor | None:
        """``(1, 1, n|1, Q|1, S)``: the pattern and causal mask at ``tiles``, with every pair
        that involves a padding position hidden.

        ``None`` when every pair of these tiles is visible (up to ``tile_causal``).
        """
        raise NotImplementedError

    def interior(self, tiles: slice) -> bool:
        """``tiles`` hold no padding position."""
        front, back = self.edges
        return tiles.start >= front and tiles.stop <= self.queries.shape[0] - back


@dataclass(frozen=True)
class AlignedTiling(Tiling):
    """Tiles whose keys are their queries, every pair visible (blocks, residue classes);
    the padded tiles are the last ones."""

    tile_causal = True

    def key_tiles(self, x: Tensor, tiles: slice) -> Tensor:
        return self.query_tiles(x, tiles)

    def keep(self, tiles: slice, is_causal: bool) -> Tensor | None:
        if self.interior(tiles):
            return None
        # keys are the queries, all >= 0: padding is what lies past the end
        queries, keys = self.queries[tiles], self.keys[tiles]
        return ((queries[:, :, None] < self.length) & (keys[:, None, :] < self.length))[None, None]


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


def _gather_mask(mask: Tensor | None, queries: Tensor, keys: Tensor) -> Tensor | None:
    """A rank-4 keep-mask ``(B', H', L|1, L|1)`` at the tiles: ``(B', H', n|1, Q|1, S|1)``."""
    if mask is None:
        return None
    length = max(mask.shape[2], mask.shape[3])
    rows = queries.clamp(0, length - 1)
    cols = keys.clamp(0, length - 1)
    if mask.shape[2] == 1 and mask.shape[3] == 1:
        return mask[:, :, :, None]
    if mask.shape[2] == 1:
        return mask[:, :, 0][:, :, cols][:, :, :, None, :]
    if mask.shape[3] == 1:
        return mask[:, :, rows]
    return mask[:, :, rows[:, :, None], cols[:, None, :]]


def _fold(keep: Tensor, batch: int, heads: int) -> Tensor:
    """``(B'|1, H'|1, n', Q', S') -> (G | 1, n', Q', S')``, the layout of the tiles."""
    if keep.shape[0] * keep.shape[1] == 1:
        return keep[0]
    rest = keep.shape[2:]
    return keep.expand(batch, heads, *rest).reshape(batch * heads, *rest)


def _scatter(tile_weights: Tensor, tiling: Tiling) -> Tensor:
    """The tiles' weights ``(B, H, N, Q, S)`` placed in a dense ``(B, H, L, L)``.

    Each visible pair lies in exactly one tile, so adding into zeros places it. Pairs with
    a padding position weigh exactly 0 (``keep`` hides them), so sending them to any index
    in range, as clamping does, adds nothing.
    """
    batch, heads = tile_weights.shape[:2]
    length = tiling.length
    index = tiling.queries[:, :, None] * length + tiling.keys[:, None, :]
    index = index.clamp(0, length * length - 1).reshape(1, 1, -1)
    pairs = index.shape[2]
    weights = tile_weights.new_zeros(batch, heads, length * length)
    weights.scatter_add_(
        2, index.expand(batch, heads, pairs), tile_weights.reshape(batch, heads, pairs)
    )
    return weights.view(batch, heads, length, length)


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
      q, k, v: ``(B, H, L, D)``.
      mask: the caller's rank-4 keep-mask ``(B', H', L|1, L|1)`` or ``None``; it is gathered
        at the tiles, so it costs ``O(N·Q·S)`` per ``(B', H')``.
      tiling: the tiles and their pattern; see ``Tiling``.
      is_causal, scale, dropout_p, need_weights: as in ``dot_product_attention``.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)``; weights ``(B, H, L, L)``, exactly zero
      outside the pattern, or ``None``.
    """
    batch, heads, length, d_head = q.shape
    groups = batch * heads
    q, k, v = (x.reshape(groups, length, d_head) for x in (q, k, v))
    tiles, queries = tiling.queries.shape
    steps = [slice(0, tiles)]
    if not need_weights:
        per_step = tiles
        if mask is not None:
            pairs = max(1, groups * queries * tiling.keys.shape[1])  # B may be 0
            per_step = max(1, MASKED_PAIRS_PER_STEP // pairs)
        steps = list(_steps(tiling, per_step))
    outs = []
    for step in steps:
        keep = combine_masks(
            tiling.keep(step, is_causal),
            _gather_mask(mask, tiling.queries[step], tiling.keys[step]),
        )
        out, weights = dot_product_attention(
            tiling.query_tiles(q, step),
            tiling.key_tiles(k, step),
            tiling.key_tiles(v, step),
            None if keep is None else _fold(keep, batch, heads),
            is_causal=is_causal and tiling.tile_causal,
            scale=scale,
            dropout_p=dropout_p,
            need_weights=need_weights,
        )
        outs.append(out)
    out = tiling.untile(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    out = out.reshape(batch, heads, length, d_head)
    if not need_weights:
        return out, None
    weights = weights.view(batch, heads, tiles, queries, tiling.keys.shape[1])
    return out, _scatter(weights, tiling)


class TiledSelfAttention(SelfAttention):
    """A ``SelfAttention`` whose pattern is computed on the tiles of ``tiling``."""

    def tiling(self, length: int, *, is_causal: bool, device: torch.device) -> Tiling:
        """The tiles of a length-L sequence; ``is_causal`` may shrink them."""
        raise NotImplementedError

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        *,
        is_causal: bool,
        need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        return tiled_attention(
            q,
            k,
            v,
            mask,
            self.tiling(q.shape[2], is_causal=is_causal, device=q.device),
            is_causal=is_causal,
            scale=self.scale,
            dropout_p=self.dropout_p,
            need_weights=need_weights,
        )

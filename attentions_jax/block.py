"""Block self-attention: query i sees key j iff ``p_i // block_size == s_j // block_size``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import parallel
from ._validation import validate_positive
from .base import SelfAttention
from .cache import CacheRule
from .masks import block_keep
from .sparse import TiledMechanism, WindowTiling, is_symbolic, window_tiling

__all__ = ["BlockMechanism", "BlockSelfAttention", "BlockTiling", "block_tiling"]


@dataclass(frozen=True)
class BlockTiling(WindowTiling):
    """One tile per block of absolute positions (the first and last may be partial)."""

    block_size: int
    interior_visible = True

    def pattern(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
        return block_keep(queries, keys, self.block_size)


def block_tiling(
    length: int,
    block_size: int,
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
    if not is_symbolic(length):
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
        tiles=-(-(length - query_first) // width),
        width=width,
        key_width=key_width,
        key_step=key_step,
        query_first=query_first,
        key_first=key_first,
        length=length,
        keys=keys,
        query_start=query_start,
        key_start=key_start,
        block_size=block_size,
    )


class BlockMechanism(TiledMechanism):
    """Keys in the query's block of ``block_size`` positions, on tiles."""

    def validate(self) -> None:
        validate_positive("block_size", self.block_size)
        super().validate()

    def cache_rule(self) -> CacheRule:
        """Decoding: a ring of ``block_size`` slots: the current block."""
        return CacheRule(
            ring=self.block_size, pattern=partial(block_keep, block_size=self.block_size)
        )

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> BlockTiling:
        return block_tiling(
            length, self.block_size, keys=keys, query_start=query_start, key_start=key_start
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
        """The blocks of the shard: q, k, v ``(B, H, Ll, D)`` -> ``(B, H, Ll, D)``.

        When ``block_size`` divides the chunk length every chunk starts on a block
        boundary and attends alone: nothing is exchanged. Otherwise (contiguous layout
        only) the shard starts at residue ``a = r·Ll mod b`` of a block, and its keys
        gain the ``b - 1`` rows on either side (before only when causal,
        ``parallel.with_halos``): the queries sit at ``a + b``, the keys from ``a + 1``
        (positions shifted by a multiple of b, so the blocks are the same), one branch of
        ``lax.switch`` per residue the shards have.
        """
        size = self.block_size
        chunk, name = parallel.chunk_length(q.shape[2], spec.layout)
        if chunk % size == 0:
            outs = [
                self.attend(
                    *(x[:, :, at : at + chunk] for x in (q, k, v)),
                    None,
                    is_causal=is_causal,
                    need_weights=False,
                )[0]
                for at in range(0, q.shape[2], chunk)
            ]
            return jnp.concatenate(outs, axis=2)
        if spec.layout == "zigzag":
            raise ValueError(
                f"{type(self).__name__}: sequence_parallel with layout='zigzag' needs "
                f"block_size = {size} to divide the chunk length {name} = {chunk} (chunks "
                "that start on block boundaries); use layout='contiguous', or a length and "
                "shard count whose chunks hold whole blocks"
            )
        if size - 1 > chunk:
            raise ValueError(
                f"{type(self).__name__}: sequence_parallel needs block_size - 1 = {size - 1} "
                f"<= the shard length {name} = {chunk} when shard boundaries cut blocks (a "
                "block then reaches into one neighbouring shard only); use fewer shards or a "
                "longer sequence"
            )
        halo = size - 1
        [((keys, values), keep)] = parallel.with_halos(
            (k, v), axis=spec.axis, layout=spec.layout, before=halo, after=0 if is_causal else halo
        )
        shards = lax.axis_size(spec.axis)
        residues = sorted({rank * chunk % size for rank in range(shards)})

        def attend(residue: int, q, keys, values, keep) -> jax.Array:
            return self.attend(
                q,
                keys,
                values,
                keep,
                is_causal=is_causal,
                need_weights=False,
                query_positions=residue + size,
                key_positions=residue + 1,
            )[0]

        branches = [partial(attend, residue) for residue in residues]
        which = np.array([residues.index(rank * chunk % size) for rank in range(shards)])
        index = jnp.asarray(which)[lax.axis_index(spec.axis)]
        return lax.switch(index, branches, q, keys, values, keep)


class BlockSelfAttention(BlockMechanism, SelfAttention):
    """Multi-head attention within fixed blocks: key j visible from query i iff
    ``p_i // block_size == s_j // block_size``; the last block may be shorter.

    The fast path (``need_weights=False``) attends block by block on reshaped q, k, v:
    time and memory O(L · b · E), never an ``(L, S)`` tensor. ``need_weights=True``
    scatters the blocks' weights into the dense ``(B, H, L, S)`` result (block diagonal).

    Example::

        attn = BlockSelfAttention(d_model=128, block_size=64, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, need_weights=False)   # (4, 16384, 128)
    """

    block_size: int
    num_heads: int

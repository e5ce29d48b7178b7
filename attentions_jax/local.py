"""Local (sliding-window) self-attention: query i sees key j iff
``|p_i - s_j| <= window_size // 2``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from . import parallel
from ._validation import validate_positive
from .base import SelfAttention
from .cache import CacheRule
from .masks import window_keep
from .sparse import TiledMechanism, WindowTiling, is_symbolic, window_tiling

__all__ = ["LocalMechanism", "LocalSelfAttention", "LocalTiling", "local_tiling"]

MIN_CHUNK = 32
"""Fewest queries per tile: smaller tiles make too many small matrix products."""


@dataclass(frozen=True)
class LocalTiling(WindowTiling):
    """Chunks of ``c`` queries, each with the window of keys from ``t·c + d - h``.

    ``half`` is ``h = window_size // 2``, ``d = query_start - key_start``. The key windows
    overlap: one gather lays them out from the keys (only the end tiles' windows are
    padded).
    """

    window_size: int

    def pattern(self, queries: jax.Array, keys: jax.Array) -> jax.Array:
        return window_keep(queries, keys, self.window_size)


def local_tiling(
    length: int,
    window_size: int,
    *,
    is_causal: bool,
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
    if not is_symbolic(length):
        chunk = min(chunk, length)
    return window_tiling(
        LocalTiling,
        tiles=-(-length // chunk),
        width=chunk,
        key_width=chunk + half + (0 if is_causal else half),
        key_step=chunk,
        query_first=0,
        key_first=query_start - key_start - half,
        length=length,
        keys=keys,
        query_start=query_start,
        key_start=key_start,
        window_size=window_size,
    )


class LocalMechanism(TiledMechanism):
    """Keys within ``window_size // 2`` positions of the query, on tiles."""

    def validate(self) -> None:
        validate_positive("window_size", self.window_size)
        super().validate()

    def cache_rule(self) -> CacheRule:
        """Decoding: a ring of the ``window_size // 2`` keys before a query (at least one slot)."""
        return CacheRule(
            ring=max(1, self.window_size // 2),
            pattern=partial(window_keep, window_size=self.window_size),
        )

    def tiling(
        self,
        length: int,
        *,
        is_causal: bool,
        keys: int | None = None,
        query_start: int = 0,
        key_start: int = 0,
    ) -> LocalTiling:
        return local_tiling(
            length,
            self.window_size,
            is_causal=is_causal,
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
        """Each chunk of the shard against its own keys and the ``h = window_size // 2``
        keys on either side (before only when causal), exchanged with the neighbouring
        chunks (``parallel.with_halos``): q, k, v ``(B, H, Ll, D)`` -> ``(B, H, Ll, D)``.

        The pattern depends on position differences only, so the chunk's queries sit at
        ``h`` and its keys from 0, whatever the chunk's place in the sequence.
        """
        half = self.window_size // 2
        chunk, name = parallel.chunk_length(q.shape[2], spec.layout)
        if half > chunk:
            raise ValueError(
                f"{type(self).__name__}: sequence_parallel needs window_size // 2 = {half} "
                f"<= the chunk length {name} = {chunk} (a window reaches into one "
                "neighbouring chunk only); use fewer shards or a longer sequence"
            )
        halos = parallel.with_halos(
            (k, v), axis=spec.axis, layout=spec.layout, before=half, after=0 if is_causal else half
        )
        outs = [
            self.attend(
                q[:, :, slot * chunk : (slot + 1) * chunk],
                keys,
                values,
                keep,
                is_causal=is_causal,
                need_weights=False,
                query_positions=half,
                key_positions=0,
            )[0]
            for slot, ((keys, values), keep) in enumerate(halos)
        ]
        return jnp.concatenate(outs, axis=2)


class LocalSelfAttention(LocalMechanism, SelfAttention):
    """Multi-head attention within a sliding window: key j visible from query i iff
    ``|p_i - s_j| <= window_size // 2`` (a window of ``window_size`` keys for odd sizes).

    The fast path (``need_weights=False``) computes only the band, chunk by chunk: time and
    memory O(L · w · E), never an ``(L, S)`` tensor. ``need_weights=True`` scatters the
    band's weights into the dense ``(B, H, L, S)`` result (zero outside the window).

    Example::

        attn = LocalSelfAttention(d_model=128, window_size=64, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, need_weights=False)   # (4, 16384, 128)
    """

    window_size: int
    num_heads: int

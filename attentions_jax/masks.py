"""Keep-mask builders (docs/semantics.md, "Masks"): ``True`` means "may attend".

Shape legend (the whole project): B batch, L length, H query heads, K kv heads,
D head width, E model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._validation import validate_mask, validate_positive

__all__ = [
    "as_keep_mask",
    "block_mask",
    "causal_mask",
    "combine_masks",
    "dilated_mask",
    "local_mask",
    "padding_mask",
]


def window_keep(queries: jax.Array, keys: jax.Array, window_size: int) -> jax.Array:
    """Local attention's rule on positions (broadcasting): ``abs(i - j) <= window_size // 2``.

    The one statement of the pattern: ``local_mask`` and the local tiles both use it.
    """
    return abs(queries - keys) <= window_size // 2


def dilation_keep(queries: jax.Array, keys: jax.Array, dilation_rate: int) -> jax.Array:
    """Dilated attention's rule on positions: ``(i - j) % dilation_rate == 0``."""
    return (queries - keys) % dilation_rate == 0


def block_keep(queries: jax.Array, keys: jax.Array, block_size: int) -> jax.Array:
    """Block attention's rule on positions: ``i // block_size == j // block_size``."""
    return queries // block_size == keys // block_size


def _positions(length: int) -> tuple[jax.Array, jax.Array]:
    """Query positions ``(L, 1)`` and key positions ``(1, L)`` of a self-attention call."""
    pos = jnp.arange(length)
    return pos[:, None], pos[None, :]


def causal_mask(length: int) -> jax.Array:
    """``(L, L)``: key j visible from query i iff ``j <= i``."""
    queries, keys = _positions(length)
    return keys <= queries


def padding_mask(lengths: jax.Array, length: int) -> jax.Array:
    """``(B, 1, 1, L)`` key-padding mask from the true lengths ``(B,)`` of each sequence."""
    pos = jnp.arange(length)
    return (pos[None, :] < jnp.asarray(lengths)[:, None])[:, None, None, :]


def local_mask(length: int, window_size: int) -> jax.Array:
    """``(L, L)``: visible iff ``abs(i - j) <= window_size // 2``."""
    validate_positive("window_size", window_size)
    return window_keep(*_positions(length), window_size)


def dilated_mask(length: int, dilation_rate: int) -> jax.Array:
    """``(L, L)``: visible iff ``(i - j) % dilation_rate == 0``."""
    validate_positive("dilation_rate", dilation_rate)
    return dilation_keep(*_positions(length), dilation_rate)


def block_mask(length: int, block_size: int) -> jax.Array:
    """``(L, L)``: visible iff ``i // block_size == j // block_size``."""
    validate_positive("block_size", block_size)
    return block_keep(*_positions(length), block_size)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """AND of the given keep-masks (broadcasting), skipping ``None``; ``None`` if all are."""
    kept = [m for m in masks if m is not None]
    if not kept:
        return None
    out = kept[0].astype(bool)
    for m in kept[1:]:
        out = out & m.astype(bool)
    return out


def as_keep_mask(
    mask: jax.Array | None, batch: int, heads: int, length: int, keys: int | None = None
) -> jax.Array | None:
    """Validate a user mask and return it as a rank-4 bool keep-mask.

    Accepts ``(L, S)``, ``(B, L, S)`` or rank 4 broadcastable to ``(B, H, L, S)``
    (``keys = S``, ``None`` for self-attention, ``S = L``); any non-zero number counts as
    "keep", so a 0/1 float mask such as ``jnp.tril(jnp.ones((L, L)))`` works.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    validate_mask(mask.shape, batch, heads, length, keys)
    keep = mask if mask.dtype == jnp.bool_ else mask != 0
    if keep.ndim == 2:
        return keep[None, None]
    if keep.ndim == 3:
        return keep[:, None]
    return keep

"""Keep-mask builders (SPEC §4): ``True`` means "query i may attend to key j".

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


def _offsets(length: int) -> jax.Array:
    """``(L, L)`` matrix of ``i - j`` (query minus key position)."""
    pos = jnp.arange(length)
    return pos[:, None] - pos[None, :]


def causal_mask(length: int) -> jax.Array:
    """``(L, L)``: key j visible from query i iff ``j <= i``."""
    return _offsets(length) >= 0


def padding_mask(lengths: jax.Array, length: int) -> jax.Array:
    """``(B, 1, 1, L)`` key-padding mask from the true lengths ``(B,)`` of each sequence."""
    pos = jnp.arange(length)
    return (pos[None, :] < jnp.asarray(lengths)[:, None])[:, None, None, :]


def local_mask(length: int, window_size: int) -> jax.Array:
    """``(L, L)``: visible iff ``abs(i - j) <= window_size // 2``."""
    validate_positive("window_size", window_size)
    return jnp.abs(_offsets(length)) <= window_size // 2


def dilated_mask(length: int, dilation_rate: int) -> jax.Array:
    """``(L, L)``: visible iff ``(i - j) % dilation_rate == 0``."""
    validate_positive("dilation_rate", dilation_rate)
    return _offsets(length) % dilation_rate == 0


def block_mask(length: int, block_size: int) -> jax.Array:
    """``(L, L)``: visible iff ``i // block_size == j // block_size``."""
    validate_positive("block_size", block_size)
    block = jnp.arange(length) // block_size
    return block[:, None] == block[None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """AND of the given keep-masks (broadcasting), skipping ``None``; ``None`` if all are."""
    kept = [m for m in masks if m is not None]
    if not kept:
        return None
    out = kept[0].astype(bool)
    for m in kept[1:]:
        out = out & m.astype(bool)
    return out


def as_keep_mask(mask: jax.Array | None, batch: int, heads: int, length: int) -> jax.Array | None:
    """Validate a user mask and return it as a rank-4 bool keep-mask.

    Accepts ``(L, L)``, ``(B, L, L)`` or rank 4 broadcastable to ``(B, H, L, L)``; any
    non-zero number counts as "keep", so a 0/1 float mask such as
    ``jnp.tril(jnp.ones((L, L)))`` works.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    validate_mask(mask.shape, batch, heads, length)
    keep = mask if mask.dtype == jnp.bool_ else mask != 0
    if keep.ndim == 2:
        return keep[None, None]
    if keep.ndim == 3:
        return keep[:, None]
    return keep

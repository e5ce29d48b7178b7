"""Rotary position embedding (RoPE), as docs/semantics.md states it.

Inverse frequencies ``rope_base ** (-2i / D)`` for i = 0..D/2-1; each row of ``x`` turns by
the angles of its own position (``0..L-1`` unless given). The angles are computed in
float64 and the rotation runs in float32 or wider, then is cast back to the input dtype:

* positions known when tracing (``None``, an int start, a concrete array) and a static L:
  NumPy float64 tables, jit constants;
* traced positions or a symbolic L (``jax.export``): float64 ``jnp`` when 64-bit mode is
  on; otherwise the angles are composed from float64-built tables of the position's
  base-16 digits (``_digit_tables``), a few float32 ulps from the float64 cos and sin at
  any int32 position, where ``position * inv_freq`` in float32 is ~1e-3 rad off at
  position 16k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .functional import check_positions

__all__ = ["apply_rope", "rope_angles", "rotate"]

_DIGIT_BITS = 4
"""Bits per digit of a traced position in float32 mode: 8 digits cover an int32, each a
lookup in a ``(16, D/2)`` table and a rotation (the error grows by ~1/2 ulp a digit)."""


def _inverse_frequencies(d_head: int, base: float) -> np.ndarray:
    """``(D/2,)`` float64 ``rope_base ** (-2i / D)``."""
    return base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)


def rope_angles(length: int, d_head: int, base: float) -> np.ndarray:
    """``(L, D/2)`` float64 angles ``position * rope_base ** (-2i / D)``, positions 0..L-1."""
    positions = np.arange(length, dtype=np.float64)
    return positions[:, None] * _inverse_frequencies(d_head, base)[None, :]


def apply_rope(
    x: jax.Array,
    *,
    positions: jax.Array | int | None = None,
    base: float = 10000.0,
    interleaved: bool = True,
) -> jax.Array:
    """Rotate ``x`` of shape ``(B, H, L, D)`` by the positions of its rows.

    ``positions``: ``None`` for ``0..L-1``, an int start (``start..start+L-1``; may be a
    traced integer scalar), or integer positions ``(L,)`` or ``(B, L)``.
    ``interleaved=True`` rotates the pairs ``(x[2i], x[2i+1])`` (RoFormer, GPT-J);
    ``False`` rotates ``(x[i], x[i + D/2])`` (GPT-NeoX, LLaMA).
    """
    length, d_head = x.shape[-2], x.shape[-1]
    check_positions("positions", positions, length, x.shape[0])
    known = _known_positions(positions, length)
    if known is not None:
        angles = known[..., None] * _inverse_frequencies(d_head, base)
        cos, sin = np.cos(angles), np.sin(angles)
    else:
        cos, sin = _traced_cos_sin(_traced_positions(positions, length), d_head, base)
    if cos.ndim == 3:  # (B, L, D/2) -> (B, 1, L, D/2), one row of angles per sequence
        cos, sin = cos[:, None], sin[:, None]
    return rotate(x, cos, sin, interleaved=interleaved)


def _known_positions(positions, length) -> np.ndarray | None:
    """Float64 positions ``(L,)`` / ``(B, L)`` when they are known while tracing, else
    ``None`` (traced positions, or a symbolic L)."""
    if positions is None or isinstance(positions, int):
        if not isinstance(length, int):
            return None
        start = 0 if positions is None else positions
        return start + np.arange(length, dtype=np.float64)
    try:
        known = np.asarray(positions, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if known.ndim == 0:
        return None if not isinstance(length, int) else known + np.arange(length)
    return known


def _traced_positions(positions, length) -> jax.Array:
    """Integer positions ``(L,)`` / ``(B, L)`` as a traced array."""
    if positions is None or jnp.ndim(positions) == 0:
        start = 0 if positions is None else positions
        return start + jnp.arange(length)
    return jnp.asarray(positions)


def _traced_cos_sin(positions: jax.Array, d_head: int, base: float):
    """cos and sin ``(..., D/2)`` of traced positions' angles, float64 when 64-bit mode is
    on, else float32 composed from digit tables."""
    inv_freq = _inverse_frequencies(d_head, base)
    if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64:
        angles = positions.astype(jnp.float64)[..., None] * inv_freq
        return jnp.cos(angles), jnp.sin(angles)
    return _digit_cos_sin(positions, inv_freq)


def _digit_tables(inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``(n, 16, D/2)`` float32 of the angles ``d * 16**m * inv_freq``, digit
    ``d`` in place ``m``, computed in float64 (NumPy: jit constants)."""
    places = -(-31 // _DIGIT_BITS)  # enough for any int32 magnitude
    values = (
        np.arange(1 << _DIGIT_BITS)[None, :] * 2.0 ** (_DIGIT_BITS * np.arange(places))[:, None]
    )
    angles = values[..., None] * inv_freq
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _digit_cos_sin(positions: jax.Array, inv_freq: np.ndarray):
    """cos and sin of ``positions * inv_freq`` in float32 by composing the rotations of the
    base-16 digits of ``|position|``; sin is odd, so a negative position flips it."""
    cos_table, sin_table = _digit_tables(inv_freq)
    magnitude = jnp.abs(positions).astype(jnp.int32)
    cos = sin = None
    for place in range(cos_table.shape[0]):
        digit = (magnitude >> (_DIGIT_BITS * place)) & ((1 << _DIGIT_BITS) - 1)
        c, s = jnp.asarray(cos_table[place])[digit], jnp.asarray(sin_table[place])[digit]
        # (cos + i sin)(c + i s): the angles add
        cos, sin = (c, s) if cos is None else (cos * c - sin * s, sin * c + cos * s)
    return cos, jnp.where(positions[..., None] < 0, -sin, sin)


def rotate(x: jax.Array, cos, sin, *, interleaved: bool) -> jax.Array:
    """Rotate the pairs of ``x`` ``(..., D)`` by angles whose cos and sin broadcast to
    ``(..., D/2)``; in float32 or wider, cast back to ``x``'s dtype."""
    d_head = x.shape[-1]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    cos, sin, xa = jnp.asarray(cos, acc), jnp.asarray(sin, acc), x.astype(acc)
    if interleaved:
        even, odd = xa[..., 0::2], xa[..., 1::2]
        rotated = jnp.stack((even * cos - odd * sin, even * sin + odd * cos), axis=-1)
        return rotated.reshape(x.shape).astype(x.dtype)
    first, second = xa[..., : d_head // 2], xa[..., d_head // 2 :]
    rotated = jnp.concatenate((first * cos - second * sin, first * sin + second * cos), axis=-1)
    return rotated.astype(x.dtype)

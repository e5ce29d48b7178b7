"""Rotary position embedding (RoPE), as docs/semantics.md states it.

Inverse frequencies ``rope_base ** (-2i / D)`` for i = 0..D/2-1, positions 0..L-1. The
tables are computed in float64 (NumPy: L and D are static, so they are jit constants) and
the rotation runs in float32 or wider, then is cast back to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["apply_rope", "rope_angles", "rotate"]


def rope_angles(length: int, d_head: int, base: float) -> np.ndarray:
    """``(L, D/2)`` float64 angles ``position * rope_base ** (-2i / D)``."""
    inv_freq = base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    positions = np.arange(length, dtype=np.float64)
    return positions[:, None] * inv_freq[None, :]


def apply_rope(x: jax.Array, *, base: float = 10000.0, interleaved: bool = True) -> jax.Array:
    """Rotate ``x`` of shape ``(B, H, L, D)`` by its positions along L.

    ``interleaved=True`` rotates the pairs ``(x[2i], x[2i+1])`` (RoFormer, GPT-J);
    ``False`` rotates ``(x[i], x[i + D/2])`` (GPT-NeoX, LLaMA).
    """
    angles = rope_angles(x.shape[-2], x.shape[-1], base)
    return rotate(x, np.cos(angles), np.sin(angles), interleaved=interleaved)


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

"""Rotary position embedding (RoPE), as docs/semantics.md states it.

Inverse frequencies ``rope_base ** (-2i / D)`` for i = 0..D/2-1, positions 0..L-1. The
tables are computed in float64 and the rotation runs in float32 or wider, then is cast
back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rope", "rope_angles", "rotate"]


def rope_angles(length: int, d_head: int, base: float, device=None) -> Tensor:
    """``(L, D/2)`` float64 angles ``position * rope_base ** (-2i / D)``."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64, device=device) / d_head)
    positions = torch.arange(length, dtype=torch.float64, device=device)
    return positions[:, None] * inv_freq[None, :]


def apply_rope(x: Tensor, *, base: float = 10000.0, interleaved: bool = True) -> Tensor:
    """Rotate ``x`` of shape ``(B, H, L, D)`` by its positions along L.

    ``interleaved=True`` rotates the pairs ``(x[2i], x[2i+1])`` (RoFormer, GPT-J);
    ``False`` rotates ``(x[i], x[i + D/2])`` (GPT-NeoX, LLaMA).
    """
    angles = rope_angles(x.shape[-2], x.shape[-1], base, x.device)
    return rotate(x, angles.cos(), angles.sin(), interleaved=interleaved)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> Tensor:
    """Rotate the pairs of ``x`` ``(..., D)`` by angles whose cos and sin broadcast to
    ``(..., D/2)``; in float32 or wider, cast back to ``x``'s dtype."""
    d_head = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    cos, sin, xa = cos.to(acc), sin.to(acc), x.to(acc)
    if interleaved:
        even, odd = xa[..., 0::2], xa[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)
    first, second = xa[..., : d_head // 2], xa[..., d_head // 2 :]
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.to(x.dtype)

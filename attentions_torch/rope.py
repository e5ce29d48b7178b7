"""Rotary position embedding (RoPE), as docs/semantics.md states it.

Inverse frequencies ``rope_base ** (-2i / D)`` for i = 0..D/2-1; each row is rotated by
the angle of its own position (``0..L-1`` unless given: docs/semantics.md, "Positions").
The angles are computed in float64 and the rotation runs in float32 or wider, then is cast
back to the input dtype.

Shape legend: B batch, H heads, L length, D head width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import check_positions

__all__ = ["apply_rope", "rope_angles", "rotate"]


def _inverse_frequencies(d_head: int, base: float, device=None) -> Tensor:
    """``(D/2,)`` float64 ``base ** (-2i / D)``."""
    return base ** (-torch.arange(0, d_head, 2, dtype=torch.float64, device=device) / d_head)


def rope_angles(length: int, d_head: int, base: float, device=None) -> Tensor:
    """``(L, D/2)`` float64 angles ``position * rope_base ** (-2i / D)`` at positions 0..L-1."""
    positions = torch.arange(length, dtype=torch.float64, device=device)
    return positions[:, None] * _inverse_frequencies(d_head, base, device)[None, :]


def _position_angles(
    positions: Tensor | int | None, length: int, d_head: int, base: float, device
) -> Tensor:
    """Angles that broadcast against ``(B, H, L, D/2)``: ``(L, D/2)`` or ``(B, 1, L, D/2)``.

    Positions are integers, exact in float64 up to 2**53, so an offset start gives the
    very angles its rows get in a longer sequence that starts at 0.
    """
    if positions is None:
        return rope_angles(length, d_head, base, device)
    if isinstance(positions, Tensor) and positions.dim() > 0:
        rows = positions.to(device=device, dtype=torch.float64)
        angles = rows[..., None] * _inverse_frequencies(d_head, base, device)
        return angles if rows.dim() == 1 else angles[:, None]
    start = positions.to(device) if isinstance(positions, Tensor) else positions
    rows = (torch.arange(length, device=device) + start).to(torch.float64)
    return rows[:, None] * _inverse_frequencies(d_head, base, device)[None, :]


def apply_rope(
    x: Tensor,
    *,
    positions: Tensor | int | None = None,
    base: float = 10000.0,
    interleaved: bool = True,
) -> Tensor:
    """Rotate ``x`` of shape ``(B, H, L, D)``, each row by the angle of its position.

    ``positions``: ``None`` (``0..L-1``), a start offset (an int or a 0-dim integer tensor:
    ``start..start+L-1``), or integer positions ``(L,)`` or ``(B, L)``.
    ``interleaved=True`` rotates the pairs ``(x[2i], x[2i+1])`` (RoFormer, GPT-J);
    ``False`` rotates ``(x[i], x[i + D/2])`` (GPT-NeoX, LLaMA).
    """
    check_positions("positions", positions, x.shape[-2], x.shape[0])
    angles = _position_angles(positions, x.shape[-2], x.shape[-1], base, x.device)
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

"""Vanilla self-attention: one head as wide as the model."""

from __future__ import annotations

from typing import Any

from .base import SelfAttention

__all__ = ["VanillaSelfAttention"]


class VanillaSelfAttention(SelfAttention):
    """Single-head scaled dot-product self-attention, head width ``D = E``.

    Complexity: O(L² · E) time; weights are ``(B, 1, L, L)``.

    Example::

        attn = VanillaSelfAttention(d_model=128)
        out, weights = attn(torch.randn(4, 512, 128))   # (4, 512, 128), (4, 1, 512, 512)
    """

    def __init__(self, d_model: int, **options: Any) -> None:
        super().__init__(d_model, 1, 1, **options)

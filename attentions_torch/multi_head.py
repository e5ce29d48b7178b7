"""Multi-head self-attention: dense, H heads of width D = E / H."""

from __future__ import annotations

from typing import Any

from .base import SelfAttention

__all__ = ["MultiHeadSelfAttention"]


class MultiHeadSelfAttention(SelfAttention):
    """Dense multi-head self-attention (Vaswani et al. 2017).

    Complexity: O(L² · E) time; the fast path (``need_weights=False``) is
    ``F.scaled_dot_product_attention``.

    Example::

        attn = MultiHeadSelfAttention(d_model=128, num_heads=8)
        out, weights = attn(torch.randn(4, 512, 128))   # (4, 512, 128), (4, 8, 512, 512)
    """

    def __init__(self, d_model: int, num_heads: int, **options: Any) -> None:
        super().__init__(d_model, num_heads, num_heads, **options)

"""Rotary self-attention (RoFormer, Su et al. 2021): dense, RoPE on q and k."""

from __future__ import annotations

from typing import Any

from .base import SelfAttention

__all__ = ["RotarySelfAttention"]


class RotarySelfAttention(SelfAttention):
    """Multi-head self-attention with rotary position embedding on queries and keys.

    Every head's q and k are rotated by their positions (inverse frequencies
    ``rope_base ** (-2i / D)``), so a score depends on the tokens and on ``i - j`` only.
    ``rope_interleaved=True`` rotates the pairs ``(2i, 2i+1)`` (RoFormer, GPT-J); ``False``
    the pairs ``(i, i + D/2)`` (GPT-NeoX, LLaMA). This is the dense class with ``rope=True``
    (the default here); D must be even. Complexity: O(L² · E) time plus O(L · E) for the
    rotation; the fast path (``need_weights=False``) is ``F.scaled_dot_product_attention``.

    Example::

        attn = RotarySelfAttention(d_model=128, num_heads=8, rope_base=10000.0)
        out, weights = attn(torch.randn(4, 512, 128))   # (4, 512, 128), (4, 8, 512, 512)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rope: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(d_model, num_heads, num_heads, rope=rope, **options)

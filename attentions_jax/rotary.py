"""Rotary self-attention (RoFormer, Su et al. 2021): dense, RoPE on q and k."""

from __future__ import annotations

from .base import SelfAttention, _option

__all__ = ["RotarySelfAttention"]


class RotarySelfAttention(SelfAttention):
    """Multi-head self-attention with rotary position embedding on queries and keys.

    Every head's q and k are rotated by their positions (inverse frequencies
    ``rope_base ** (-2i / D)``), so a score depends on the tokens and on ``i - j`` only.
    ``rope_interleaved=True`` rotates the pairs ``(2i, 2i+1)`` (RoFormer, GPT-J); ``False``
    the pairs ``(i, i + D/2)`` (GPT-NeoX, LLaMA). This is the dense class with ``rope=True``
    (the default here); D must be even. Complexity: O(L² · E) time plus O(L · E) for the
    rotation; the fast path (``need_weights=False``) is the query-chunked core.

    Example::

        attn = RotarySelfAttention(d_model=128, num_heads=8, rope_base=10000.0)
        variables = attn.init(jax.random.key(0), x)
        out, weights = attn.apply(variables, x)   # (4, 512, 128), (4, 8, 512, 512)
    """

    num_heads: int
    rope: bool = _option(True)

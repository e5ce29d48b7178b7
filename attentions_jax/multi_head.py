"""Multi-head self-attention: dense, H heads of width D = E / H."""

from __future__ import annotations

from .base import SelfAttention

__all__ = ["MultiHeadSelfAttention"]


class MultiHeadSelfAttention(SelfAttention):
    """Dense multi-head self-attention (Vaswani et al. 2017).

    Complexity: O(L² · E) time; the fast path (``need_weights=False``) is the
    query-chunked core, O(H · chunk · L) memory.

    Example::

        attn = MultiHeadSelfAttention(d_model=128, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, weights = attn.apply(variables, x)   # (4, 512, 128), (4, 8, 512, 512)
    """

    num_heads: int

"""Grouped-query self-attention (GQA, Ainslie et al. 2023); one kv head is MQA."""

from __future__ import annotations

from typing import Any

from .base import SelfAttention

__all__ = ["GroupedSelfAttention"]


class GroupedSelfAttention(SelfAttention):
    """Dense attention where groups of query heads share a key/value head.

    Query head h reads kv head ``h // (num_query_heads // num_kv_heads)`` (contiguous
    groups, as ``repeat_interleave``); ``w_k`` and ``w_v`` are ``num_kv_heads * D`` wide.
    ``num_kv_heads=1`` is multi-query attention, ``num_kv_heads=num_query_heads`` is
    multi-head attention. Complexity: O(L² · E) time; the fast path
    (``need_weights=False``) is ``F.scaled_dot_product_attention(..., enable_gqa=True)``,
    which reads the K kv heads without repeating them.

    Example::

        attn = GroupedSelfAttention(d_model=128, num_query_heads=8, num_kv_heads=2)
        out, weights = attn(torch.randn(4, 512, 128))   # (4, 512, 128), (4, 8, 512, 512)
    """

    def __init__(
        self, d_model: int, num_query_heads: int, num_kv_heads: int, **options: Any
    ) -> None:
        super().__init__(d_model, num_query_heads, num_kv_heads, **options)
        self.num_query_heads = num_query_heads

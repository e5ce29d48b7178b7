"""GroupedMechanism-query self-attention (GQA, Ainslie et al. 2023); one kv head is MQA."""

from __future__ import annotations

from .base import Mechanism, SelfAttention

__all__ = ["GroupedMechanism", "GroupedSelfAttention"]


class GroupedMechanism(Mechanism):
    """Groups of query heads share a key/value head."""

    def head_counts(self) -> tuple[int, int]:
        return self.num_query_heads, self.num_kv_heads


class GroupedSelfAttention(GroupedMechanism, SelfAttention):
    """Dense attention where groups of query heads share a key/value head.

    Query head h reads kv head ``h // (num_query_heads // num_kv_heads)`` (contiguous
    groups, as ``repeat_interleave``); ``w_k`` and ``w_v`` are ``num_kv_heads * D`` wide.
    ``num_kv_heads=1`` is multi-query attention, ``num_kv_heads=num_query_heads`` is
    multi-head attention. Complexity: O(L² · E) time; the fast path
    (``need_weights=False``) is the query-chunked core, whose grouped einsum reads the K
    kv heads without repeating them, O(H · chunk · L) memory.

    Example::

        attn = GroupedSelfAttention(d_model=128, num_query_heads=8, num_kv_heads=2)
        variables = attn.init(jax.random.key(0), x)
        out, weights = attn.apply(variables, x)   # (4, 512, 128), (4, 8, 512, 512)
    """

    num_query_heads: int
    num_kv_heads: int

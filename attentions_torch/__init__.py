"""PyTorch attention mechanisms that compute the same functions as ``attentions_jax``."""

from .alibi import ALiBiSelfAttention, AlibiSelfAttention, alibi_slopes
from .base import SelfAttention
from .block import BlockSelfAttention
from .cache import NO_LIMIT, KVCache, LinearCache, WindowCache
from .dilated import DilatedSelfAttention
from .functional import dot_product_attention, dot_product_attention_weights
from .grouped import GroupedSelfAttention
from .linear import LinearSelfAttention, linear_attention
from .local import LocalSelfAttention
from .masks import (
    block_mask,
    causal_mask,
    combine_masks,
    dilated_mask,
    local_mask,
    padding_mask,
)
from .multi_head import MultiHeadSelfAttention
from .rope import apply_rope
from .rotary import RotarySelfAttention
from .vanilla import VanillaSelfAttention

__all__ = [
    "NO_LIMIT",
    "ALiBiSelfAttention",
    "AlibiSelfAttention",
    "BlockSelfAttention",
    "DilatedSelfAttention",
    "GroupedSelfAttention",
    "KVCache",
    "LinearCache",
    "LinearSelfAttention",
    "LocalSelfAttention",
    "MultiHeadSelfAttention",
    "RotarySelfAttention",
    "SelfAttention",
    "VanillaSelfAttention",
    "WindowCache",
    "alibi_slopes",
    "apply_rope",
    "block_mask",
    "causal_mask",
    "combine_masks",
    "dilated_mask",
    "dot_product_attention",
    "dot_product_attention_weights",
    "linear_attention",
    "local_mask",
    "padding_mask",
]

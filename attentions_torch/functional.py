"""The functional core: scaled dot-product attention with keep-masks, GQA and zero rows.

Shape legend: B batch, L query length, S key length (``S == L`` in self-attention),
H query heads, K kv heads (``H % K == 0``; query head h reads kv head ``h // (H // K)``),
D head width.

Semantics shared with ``attentions_jax.functional``:

* ``mask`` is a boolean keep-mask broadcastable to ``(B, H, L, S)``; ``is_causal`` ANDs
  the causal mask ``j <= i`` into it.
* ``bias`` is added to the scaled scores (ALiBi), broadcastable to ``(B, H, L, S)``.
* The softmax runs in float32 or wider and the result is cast back to the input dtype.
* A query that sees no key gets a zero row of weights and a zero output, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import causal_mask, combine_masks

__all__ = ["dot_product_attention", "dot_product_attention_weights", "merge_heads", "split_heads"]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, L, H*D) -> (B, H, L, D)``."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, L, D) -> (B, L, H*D)``."""
    batch, heads, length, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * d_head)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _full_keep(
    mask: Tensor | None, is_causal: bool, length: int, keys: int, device
) -> Tensor | None:
    causal = causal_mask(max(length, keys), device)[:length, :keys] if is_causal else None
    return combine_masks(mask, causal)


def dot_product_attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention weights ``(B, H, L, S)`` in float32 or wider.

    q: ``(B, H, L, D)``; k: ``(B, K, S, D)``. Rows sum to 1 over visible keys and are
    exactly 0 where a key is hidden (the whole row for a query that sees nothing).
    """
    batch, heads, length, d_head = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d_head) if scale is None else scale
    acc = _accumulation_dtype(q.dtype)
    # (B, K, G, L, D) @ (B, K, 1, D, S) -> (B, K, G, L, S): grouped heads share one kv head
    grouped = (q.to(acc) * scale).reshape(batch, kv_heads, heads // kv_heads, length, d_head)
    scores = grouped @ k.to(acc).transpose(-1, -2)[:, :, None]
    scores = scores.reshape(batch, heads, length, keys)
    if bias is not None:
        scores = scores + bias.to(acc)
    keep = _full_keep(mask, is_causal, length, keys, q.device)
    if keep is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~keep, torch.finfo(acc).min)
    # a fully hidden row softmaxes to uniform over min-filled scores; the where zeroes it
    return torch.where(keep, torch.softmax(scores, dim=-1), 0.0)


def _apply_weights(weights: Tensor, v: Tensor) -> Tensor:
    """``(B, H, L, S) x (B, K, S, D) -> (B, H, L, D)`` in the weights' dtype."""
    batch, heads, length, keys = weights.shape
    kv_heads = v.shape[1]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, length, keys)
    out = grouped @ v.to(weights.dtype)[:, :, None]
    return out.reshape(batch, heads, length, v.shape[-1])


def dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention.

    Args:
      q: ``(B, H, L, D)``.
      k, v: ``(B, K, S, D)`` with ``H % K == 0``.
      mask: boolean keep-mask broadcastable to ``(B, H, L, S)``, or ``None``.
      bias: additive score bias broadcastable to ``(B, H, L, S)``, or ``None``.
      is_causal: AND the causal pattern ``j <= i`` into ``mask``.
      scale: score scale, default ``1 / sqrt(D)``.
      dropout_p: dropout on the attention weights (pass 0.0 outside training).
      need_weights: ``True`` returns the ``(B, H, L, S)`` weights (before dropout);
        ``False`` runs ``F.scaled_dot_product_attention`` and returns ``None``.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)`` in q's dtype.
    """
    if need_weights:
        weights = dot_product_attention_weights(
            q, k, mask, bias=bias, is_causal=is_causal, scale=scale
        )
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0.0 else weights
        return _apply_weights(dropped, v).to(q.dtype), weights.to(q.dtype)

    gqa = q.shape[1] != k.shape[1]
    if mask is None and bias is None:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
        return out, None
    keep = _full_keep(mask, is_causal, q.shape[2], k.shape[2], q.device)
    attn_mask = keep
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if keep is not None:
            attn_mask = attn_mask.masked_fill(~keep, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )
    if keep is not None:
        # SDPA gives a fully hidden row mean(V) (float mask) or version-dependent zeros
        out = out * keep.any(dim=-1, keepdim=True)
    return out, None

"""The functional core: scaled dot-product attention with keep-masks, GQA and zero rows.

Shape legend: B batch, L query length, S key length (``S == L`` in self-attention),
H query heads, K kv heads (``H % K == 0``; query head h reads kv head ``h // (H // K)``),
D head width.

Semantics shared with ``attentions_jax.functional``:

* ``mask`` is a boolean keep-mask broadcastable to ``(B, H, L, S)``; ``is_causal`` ANDs
  the causal mask ``j <= i`` into it.
* ``bias`` is added to the scaled scores, broadcastable to ``(B, H, L, S)``.
* ``alibi_slopes`` ``(H,)`` adds the ALiBi bias ``-m_h * abs(i - j)`` after ``bias``; it is
  built from positions for the queries at hand, so the fast path never holds it whole.
* The softmax runs in float32 or wider and the result is cast back to the input dtype.
* A query that sees no key gets a zero row of weights and a zero output, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import combine_masks

__all__ = [
    "QUERY_CHUNK",
    "alibi_bias",
    "dot_product_attention",
    "dot_product_attention_weights",
    "merge_heads",
    "split_heads",
]

QUERY_CHUNK = 1024
"""Queries per SDPA call when the fast path builds a mask or bias per query: ALiBi with a
user mask or bias, or a mask together with ``is_causal``. The mask or bias SDPA sees is
then ``(B, H, chunk, S)``, O(chunk·S) memory instead of O(L·S).

On CPU (H = 8, D = 64, L = 2048 and 4096) one call with the whole ``(H, L, S)`` bias was
no faster than calls on 512 to 2048 queries.
"""

BIAS_ROWS = 128
"""Queries whose bias the weights path makes at once: ``(H, 128, S)`` stays small enough
for the allocator to reuse its memory from one row block to the next."""


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


def _causal(query_positions: Tensor, keys: int) -> Tensor:
    """``(l, S)`` keep-mask ``j <= i`` for the given query positions."""
    return query_positions[:, None] >= torch.arange(keys, device=query_positions.device)


def alibi_bias(slopes: Tensor, query_positions: Tensor, keys: int) -> Tensor:
    """``(H, l, S)`` ALiBi bias ``-m_h * abs(i - j)`` in the slopes' dtype.

    slopes: ``(H,)``; query_positions: ``(l,)`` positions i; keys j are ``0..S-1``.
    """
    keys_positions = torch.arange(keys, device=query_positions.device)
    distance = (query_positions[:, None] - keys_positions[None, :]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance


def _with_alibi(
    bias: Tensor | None, slopes: Tensor | None, query_positions: Tensor, keys: int, dtype
) -> Tensor | None:
    """``bias + alibi_bias`` in ``dtype``, broadcastable to ``(B, H, l, S)``; either may be
    absent."""
    if slopes is None:
        return bias
    # (1, H, l, S): a rank-4 float mask keeps SDPA on its fused kernel
    alibi = alibi_bias(
        slopes.to(device=query_positions.device, dtype=dtype), query_positions, keys
    )[None]
    return alibi if bias is None else bias.to(dtype) + alibi


def _as_rank4(x: Tensor | None) -> Tensor | None:
    """Left-pad a broadcastable operand to rank 4, so axis 2 is the query axis."""
    return None if x is None else x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def _query_rows(x: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of axis 2 (queries) of a rank-4 operand that has that axis."""
    return x if x is None or x.shape[2] == 1 else x[:, :, start:stop]


def dot_product_attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention weights ``(B, H, L, S)`` in float32 or wider.

    q: ``(B, H, L, D)``; k: ``(B, K, S, D)``; alibi_slopes: ``(H,)``. Rows sum to 1 over
    visible keys and are exactly 0 where a key is hidden (the whole row for a query that
    sees nothing).
    """
    batch, heads, length, d_head = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d_head) if scale is None else scale
    acc = _accumulation_dtype(q.dtype)
    positions = torch.arange(length, device=q.device)
    # (B, K, G, L, D) @ (B, K, 1, D, S) -> (B, K, G, L, S): grouped heads share one kv head
    grouped = (q.to(acc) * scale).reshape(batch, kv_heads, heads // kv_heads, length, d_head)
    scores = grouped @ k.to(acc).transpose(-1, -2)[:, :, None]
    scores = scores.reshape(batch, heads, length, keys)
    # the scores are a fresh tensor that backward does not read (the product's backward
    # reads q and k): the bias and the mask go in in place, with no second (B, H, L, S)
    if bias is not None or alibi_slopes is not None:
        bias = _as_rank4(bias)
        for start in range(0, length, BIAS_ROWS):
            stop = min(start + BIAS_ROWS, length)
            rows = _query_rows(bias, start, stop)
            scores[:, :, start:stop] += _with_alibi(
                rows, alibi_slopes, positions[start:stop], keys, acc
            ).to(acc)
    keep = combine_masks(mask, _causal(positions, keys) if is_causal else None)
    if keep is None:
        return torch.softmax(scores, dim=-1)
    hidden = ~keep
    weights = torch.softmax(scores.masked_fill_(hidden, torch.finfo(acc).min), dim=-1)
    # a fully hidden row softmaxes to uniform over min-filled scores: zero it (in place
    # unless autograd needs the softmax's output for its backward)
    if weights.requires_grad:
        return weights.masked_fill(hidden, 0.0)
    return weights.masked_fill_(hidden, 0.0)


def _apply_weights(weights: Tensor, v: Tensor) -> Tensor:
    """``(B, H, L, S) x (B, K, S, D) -> (B, H, L, D)`` in the weights' dtype."""
    batch, heads, length, keys = weights.shape
    kv_heads = v.shape[1]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, length, keys)
    out = grouped @ v.to(weights.dtype)[:, :, None]
    return out.reshape(batch, heads, length, v.shape[-1])


def _alibi_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    """ALiBi without a user mask: SDPA reads its bias from ``H·(L + S − 1)`` numbers.

    The bias ``-m_h * abs(i - j)`` depends on ``i - j`` alone. With the queries in reverse
    order (row r is query ``i = L − 1 − r``) it depends on ``t = r + j``, so the
    ``(1, H, L, S)`` bias is a strided view (strides 1 and 1) of the vector
    ``w[h, t] = -m_h * abs(L − 1 − t)``; ``j <= i`` is ``t <= L − 1``. The fused kernel reads
    it in place: O(H·(L + S)) memory and no per-call ``(H, L, S)`` tensor to fill.
    """
    heads, length, keys = q.shape[1], q.shape[2], k.shape[2]
    acc = _accumulation_dtype(q.dtype)
    offsets = torch.arange(length + keys - 1, device=q.device)
    distance = (offsets - (length - 1)).abs().to(acc)
    toeplitz = (-slopes.to(device=q.device, dtype=acc)[:, None] * distance).to(q.dtype)
    if is_causal:
        toeplitz = toeplitz.masked_fill(offsets > length - 1, torch.finfo(q.dtype).min)
    bias = toeplitz.as_strided((1, heads, length, keys), (0, length + keys - 1, 1, 1))
    out = F.scaled_dot_product_attention(
        q.flip(2),
        k,
        v,
        attn_mask=bias,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=heads != k.shape[1],
    )
    return out.flip(2)


def _masked_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    bias: Tensor | None,
    *,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    """SDPA with a keep-mask and a float bias; queries that see no key get zeros.

    q: ``(B, H, l, D)``; k, v: ``(B, K, S, D)``; keep, bias broadcastable to ``(B, H, l, S)``.
    """
    attn_mask = keep
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if keep is not None:
            attn_mask = attn_mask.masked_fill(~keep, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    if keep is not None:
        # SDPA gives a fully hidden row mean(V) (float mask) or version-dependent zeros
        out = out * keep.any(dim=-1, keepdim=True)
    return out


def dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
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
      alibi_slopes: ``(H,)`` ALiBi slopes m_h, adding ``-m_h * abs(i - j)`` to the scores,
        or ``None``.
      is_causal: AND the causal pattern ``j <= i`` into ``mask``.
      scale: score scale, default ``1 / sqrt(D)``.
      dropout_p: dropout on the attention weights (pass 0.0 outside training).
      need_weights: ``True`` returns the ``(B, H, L, S)`` weights (before dropout);
        ``False`` runs ``F.scaled_dot_product_attention`` and returns ``None``: ALiBi alone
        as a strided view of ``H·(L + S − 1)`` bias values, and on ``QUERY_CHUNK`` queries
        at a time when a mask or bias has to be built per query (ALiBi with a mask or
        bias, a mask with ``is_causal``).

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)`` in q's dtype.
    """
    if need_weights:
        weights = dot_product_attention_weights(
            q, k, mask, bias=bias, alibi_slopes=alibi_slopes, is_causal=is_causal, scale=scale
        )
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0.0 else weights
        return _apply_weights(dropped, v).to(q.dtype), weights.to(q.dtype)

    if mask is None and bias is None and alibi_slopes is None:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out, None
    if mask is None and bias is None:
        out = _alibi_sdpa(
            q, k, v, alibi_slopes, is_causal=is_causal, scale=scale, dropout_p=dropout_p
        )
        return out, None
    length, keys = q.shape[2], k.shape[2]
    mask, bias = _as_rank4(mask), _as_rank4(bias)
    acc = _accumulation_dtype(q.dtype)
    positions = torch.arange(length, device=q.device)
    # a mask or bias made per query (ALiBi, causal) goes in chunks; a given one in one call
    chunk = QUERY_CHUNK if alibi_slopes is not None or is_causal else length
    outs = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        rows = positions[start:stop]
        keep = combine_masks(
            _query_rows(mask, start, stop), _causal(rows, keys) if is_causal else None
        )
        chunk_bias = _with_alibi(_query_rows(bias, start, stop), alibi_slopes, rows, keys, acc)
        outs.append(
            _masked_sdpa(
                q[:, :, start:stop], k, v, keep, chunk_bias, scale=scale, dropout_p=dropout_p
            )
        )
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), None

"""The functional core: scaled dot-product attention with keep-masks, GQA and zero rows.

Shape legend: B batch, L query length, S key length (``S == L`` in self-attention),
H query heads, K kv heads (``H % K == 0``; query head h reads kv head ``h // (H // K)``),
D head width.

Semantics shared with ``attentions_jax.functional``:

* Query i sits at position ``p_i`` and key j at ``s_j`` (docs/semantics.md, "Positions"):
  ``0..L-1`` and ``0..S-1`` by default, else a start offset or integer positions
  ``(L,)`` / ``(B, L)`` (``query_positions``, ``key_positions``). Every position rule below
  is stated on them.
* ``mask`` is a boolean keep-mask broadcastable to ``(B, H, L, S)``; ``is_causal`` ANDs
  the causal mask ``s_j <= p_i`` into it.
* ``bias`` is added to the scaled scores, broadcastable to ``(B, H, L, S)``.
* ``alibi_slopes`` ``(H,)`` adds the ALiBi bias ``-m_h * abs(p_i - s_j)`` after ``bias``; it
  is built from positions for the queries at hand, so the fast path never holds it whole.
* The softmax runs in float32 or wider and the result is cast back to the input dtype.
* A query that sees no key gets a zero row of weights and a zero output, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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

Positions = Tensor | int | None
"""Where n tokens sit: ``None`` (``0..n-1``), a start offset (an int or a 0-dim integer
tensor: ``start..start+n-1``) or integer positions ``(n,)`` or ``(B, n)``."""

QUERY_CHUNK = 1024
"""Queries per SDPA call when the fast path builds a mask or bias per query: ALiBi with a
user mask or bias, a mask together with ``is_causal``, or positions given as a tensor. The
mask or bias SDPA sees is then ``(B, H, chunk, S)``, O(chunk·S) memory instead of O(L·S).

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


def _is_start(positions: Positions) -> bool:
    """``positions`` is a start offset known to Python (``None`` is the start 0)."""
    return positions is None or (isinstance(positions, int) and not isinstance(positions, bool))


def _offset(query_positions: Positions, key_positions: Positions) -> int | None:
    """``d`` with ``p_i - s_j = d + i - j`` when both positions are Python starts; ``None``
    when either is a tensor (then the rules are built from the positions themselves)."""
    if not (_is_start(query_positions) and _is_start(key_positions)):
        return None
    return (query_positions or 0) - (key_positions or 0)


def check_positions(name: str, positions: Positions, count: int, batch: int) -> None:
    """``positions`` of n tokens must be ``None``, an int, or an integer tensor of shape
    ``()``, ``(n,)`` or ``(B|1, n)``; ``ValueError`` otherwise."""
    if _is_start(positions):
        return
    if isinstance(positions, Tensor) and not positions.is_floating_point():
        shape = tuple(positions.shape)
        if positions.dtype != torch.bool and (
            shape in ((), (count,), (1, count)) or shape == (batch, count)
        ):
            return
        given = f"a {positions.dtype} tensor of shape {shape}"
    elif isinstance(positions, Tensor):
        given = f"a {positions.dtype} tensor of shape {tuple(positions.shape)}"
    else:
        given = type(positions).__name__
    raise ValueError(
        f"{name} must be None, a start offset (an int or a 0-dim integer tensor) or integer "
        f"positions of shape ({count},) or ({batch}, {count}), got {given}"
    )


def _position_rows(positions: Positions, count: int, device: torch.device) -> Tensor:
    """``(B|1, n)`` integer positions of n tokens (see ``Positions``)."""
    if positions is None:
        return torch.arange(count, device=device)[None]
    if isinstance(positions, Tensor) and positions.dim() > 0:
        rows = positions.to(device)
        return rows[None] if rows.dim() == 1 else rows
    start = positions.to(device) if isinstance(positions, Tensor) else positions
    return (torch.arange(count, device=device) + start)[None]


def _causal(query_rows: Tensor, key_rows: Tensor) -> Tensor:
    """``(B|1, 1, l, S)`` keep-mask ``s_j <= p_i`` from positions ``(B|1, l)``, ``(B|1, S)``."""
    return key_rows[:, None, None, :] <= query_rows[:, None, :, None]


def _alibi(slopes: Tensor, query_rows: Tensor, key_rows: Tensor) -> Tensor:
    """``(B|1, H, l, S)`` ALiBi bias ``-m_h * abs(p_i - s_j)`` in the slopes' dtype."""
    distance = (query_rows[:, None, :, None] - key_rows[:, None, None, :]).abs()
    return -slopes[None, :, None, None] * distance.to(slopes.dtype)


def alibi_bias(slopes: Tensor, query_positions: Tensor, keys: int | Tensor) -> Tensor:
    """``(H, l, S)`` ALiBi bias ``-m_h * abs(p_i - s_j)`` in the slopes' dtype.

    slopes: ``(H,)``; query_positions: ``(l,)`` positions p_i, or ``(B, l)``; keys: the
    count S of keys at ``0..S-1``, or their positions ``(S,)`` / ``(B, S)``. With positions of
    rank 2 the result is ``(B, H, l, S)``.
    """
    if not isinstance(keys, Tensor):
        keys = torch.arange(keys, device=query_positions.device)
    batched = query_positions.dim() == 2 or keys.dim() == 2
    query_rows = query_positions if query_positions.dim() == 2 else query_positions[None]
    bias = _alibi(slopes, query_rows, keys if keys.dim() == 2 else keys[None])
    return bias if batched else bias[0]


def _with_alibi(
    bias: Tensor | None,
    slopes: Tensor | None,
    query_rows: Tensor,
    key_rows: Tensor,
    dtype: torch.dtype,
) -> Tensor | None:
    """``bias + ALiBi`` in ``dtype``, broadcastable to ``(B, H, l, S)``; either may be
    absent. Positions: ``(B|1, l)`` and ``(B|1, S)``."""
    if slopes is None:
        return bias
    # (B|1, H, l, S): a rank-4 float mask keeps SDPA on its fused kernel
    alibi = _alibi(slopes.to(device=query_rows.device, dtype=dtype), query_rows, key_rows)
    return alibi if bias is None else bias.to(dtype) + alibi


def _as_rank4(x: Tensor | None) -> Tensor | None:
    """Left-pad a broadcastable operand to rank 4, so axis 2 is the query axis."""
    return None if x is None else x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def _query_rows(x: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of axis 2 (queries) of a rank-4 operand that has that axis."""
    return x if x is None or x.shape[2] == 1 else x[:, :, start:stop]


def _row_blocks(length: int, rows: int | None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the blocks of ``rows`` queries (one block for ``None``).

    Under ``torch.export`` the length may be symbolic and a Python loop over it would pin
    it to the traced value: the exported program then takes all queries in one block (its
    masks and biases are ``(l, S)`` for the whole length).
    """
    if rows is None or torch.compiler.is_exporting():
        yield 0, length
        return
    for start in range(0, length, rows):
        yield start, min(start + rows, length)


def _grouped(q: Tensor, k: Tensor) -> bool:
    """Query heads share kv heads (``H != K``): SDPA's ``enable_gqa``. A plain bool also
    when the head axes are symbolic (the sparse tilings put their tiles there)."""
    return bool(q.shape[1] != k.shape[1])


def dot_product_attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_positions: Positions = None,
    key_positions: Positions = None,
) -> Tensor:
    """Attention weights ``(B, H, L, S)`` in float32 or wider.

    q: ``(B, H, L, D)``; k: ``(B, K, S, D)``; alibi_slopes: ``(H,)``; positions as in
    ``dot_product_attention``. Rows sum to 1 over visible keys and are exactly 0 where a
    key is hidden (the whole row for a query that sees nothing).
    """
    batch, heads, length, d_head = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    check_positions("query_positions", query_positions, length, batch)
    check_positions("key_positions", key_positions, keys, batch)
    scale = 1.0 / math.sqrt(d_head) if scale is None else scale
    acc = _accumulation_dtype(q.dtype)
    query_rows = _position_rows(query_positions, length, q.device)
    key_rows = _position_rows(key_positions, keys, q.device)
    # (B, K, G, L, D) @ (B, K, 1, D, S) -> (B, K, G, L, S): grouped heads share one kv head
    grouped = (q.to(acc) * scale).reshape(batch, kv_heads, heads // kv_heads, length, d_head)
    scores = grouped @ k.to(acc).transpose(-1, -2)[:, :, None]
    scores = scores.reshape(batch, heads, length, keys)
    # the scores are a fresh tensor that backward does not read (the product's backward
    # reads q and k): the bias and the mask go in in place, with no second (B, H, L, S)
    if bias is not None or alibi_slopes is not None:
        bias = _as_rank4(bias)
        for start, stop in _row_blocks(length, BIAS_ROWS):
            rows = _query_rows(bias, start, stop)
            scores[:, :, start:stop] += _with_alibi(
                rows, alibi_slopes, query_rows[:, start:stop], key_rows, acc
            ).to(acc)
    keep = combine_masks(mask, _causal(query_rows, key_rows) if is_causal else None)
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


def _toeplitz_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor | None,
    *,
    offset: int,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    """ALiBi and/or causal on offset positions without a user mask: SDPA reads its bias
    from ``H·(L + S − 1)`` numbers (``L + S − 1`` for causal alone).

    With ``p_i - s_j = d + i - j`` (``d = offset``) the bias ``-m_h * abs(p_i - s_j)`` and
    the causal rule ``s_j <= p_i`` depend on ``i - j`` alone. With the queries in reverse
    order (row r is query ``i = L − 1 − r``) they depend on ``t = r + j``: ``p_i - s_j =
    L − 1 + d − t``, so the ``(1, H|1, L, S)`` bias is a strided view (strides 1 and 1) of
    the vector ``w[h, t] = -m_h * abs(L − 1 + d − t)``, the most negative number where
    ``t > L − 1 + d``. The fused kernel reads it in place: O(H·(L + S)) memory and no
    per-call ``(H, L, S)`` tensor to fill.
    """
    length, keys = q.shape[2], k.shape[2]
    # (export first: comparing a symbolic L would pin it)
    if is_causal and not torch.compiler.is_exporting() and length > QUERY_CHUNK:
        return _causal_toeplitz_chunks(
            q, k, v, slopes, offset=offset, scale=scale, dropout_p=dropout_p
        )
    acc = _accumulation_dtype(q.dtype)
    # p_i - s_j along t = r + j
    distance = (length - 1 + offset) - torch.arange(length + keys - 1, device=q.device)
    if slopes is None:
        toeplitz = q.new_zeros(1, distance.shape[0])
    else:
        alibi = -slopes.to(device=q.device, dtype=acc)[:, None] * distance.abs().to(acc)
        toeplitz = alibi.to(q.dtype)
    if is_causal:
        toeplitz = toeplitz.masked_fill(distance < 0, torch.finfo(q.dtype).min)
    rows = toeplitz.shape[0]
    bias = toeplitz.as_strided((1, rows, length, keys), (0, length + keys - 1, 1, 1))
    out = F.scaled_dot_product_attention(
        q.flip(2),
        k,
        v,
        attn_mask=bias,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=_grouped(q, k),
    ).flip(2)
    if is_causal and offset < 0:
        # queries before the first key see none: zeros, not the mean(V) of min-filled rows
        sees = torch.arange(length, device=q.device) + offset >= 0
        out = out * sees[:, None]
    return out


def _causal_toeplitz_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor | None,
    *,
    offset: int,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    """``_toeplitz_sdpa`` with ``is_causal``, ``QUERY_CHUNK`` queries per call, each against
    the keys up to its last query only: the bias that carries the causal rule makes SDPA
    compute every hidden score (it cannot skip blocks as with ``is_causal=True``), so the
    keys after a chunk are left out: about half the work of one call, forward and backward
    (PyTorch ALiBi causal fwd+bwd at L = 8192 ran 1.8x multi-head's in one call)."""
    length, keys = q.shape[2], k.shape[2]
    outs = []
    for first in range(0, length, QUERY_CHUNK):
        chunk = q[:, :, first : first + QUERY_CHUNK]
        # queries first.. see keys s_j <= p_i, i.e. j < first + chunk + offset
        end = min(keys, first + chunk.shape[2] + offset)
        if end <= 0:  # the whole chunk comes before the first key: zero rows
            outs.append(chunk.new_zeros(*chunk.shape[:3], v.shape[3]))
            continue
        outs.append(
            _toeplitz_sdpa(
                chunk,
                k[:, :, :end],
                v[:, :, :end],
                slopes,
                offset=offset + first,
                is_causal=True,
                scale=scale,
                dropout_p=dropout_p,
            )
        )
    return torch.cat(outs, dim=2)


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
        enable_gqa=_grouped(q, k),
    )
    if keep is not None:
        # SDPA gives a fully hidden row mean(V) (float mask) or version-dependent zeros
        out = out * keep.any(dim=-1, keepdim=True)
    return out


def _chunked_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    alibi_slopes: Tensor | None,
    *,
    is_causal: bool,
    query_positions: Positions,
    key_positions: Positions,
    scale: float | None,
    dropout_p: float,
) -> Tensor:
    """SDPA with a mask or bias: the given ones in one call, one made per query (ALiBi,
    causal) on ``QUERY_CHUNK`` queries at a time from the positions."""
    length, keys = q.shape[2], k.shape[2]
    mask, bias = _as_rank4(mask), _as_rank4(bias)
    acc = _accumulation_dtype(q.dtype)
    query_rows = _position_rows(query_positions, length, q.device)
    key_rows = _position_rows(key_positions, keys, q.device)
    per_query = alibi_slopes is not None or is_causal
    outs = []
    for start, stop in _row_blocks(length, QUERY_CHUNK if per_query else None):
        rows = query_rows[:, start:stop]
        keep = combine_masks(
            _query_rows(mask, start, stop), _causal(rows, key_rows) if is_causal else None
        )
        chunk_bias = _with_alibi(_query_rows(bias, start, stop), alibi_slopes, rows, key_rows, acc)
        outs.append(
            _masked_sdpa(
                q[:, :, start:stop], k, v, keep, chunk_bias, scale=scale, dropout_p=dropout_p
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


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
    query_positions: Positions = None,
    key_positions: Positions = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention.

    Args:
      q: ``(B, H, L, D)``.
      k, v: ``(B, K, S, D)`` with ``H % K == 0``.
      mask: boolean keep-mask broadcastable to ``(B, H, L, S)``, or ``None``.
      bias: additive score bias broadcastable to ``(B, H, L, S)``, or ``None``.
      alibi_slopes: ``(H,)`` ALiBi slopes m_h, adding ``-m_h * abs(p_i - s_j)`` to the
        scores, or ``None``.
      is_causal: AND the causal pattern ``s_j <= p_i`` into ``mask``.
      scale: score scale, default ``1 / sqrt(D)``.
      dropout_p: dropout on the attention weights (pass 0.0 outside training).
      need_weights: ``True`` returns the ``(B, H, L, S)`` weights (before dropout);
        ``False`` runs ``F.scaled_dot_product_attention`` and returns ``None``.
      query_positions: the positions p of the queries: ``None`` (``0..L-1``), a start
        offset (an int, or a 0-dim integer tensor), or integer positions ``(L,)`` /
        ``(B, L)``.
      key_positions: the positions s of the keys, the same way (``None``: ``0..S-1``).

    The fast path (``need_weights=False``) takes, in this order: SDPA's own ``is_causal``
    when the rule is its top-left one (both positions None or equal starts); ALiBi and/or
    causal on int starts as a strided view of ``H·(L + S − 1)`` bias values
    (``_toeplitz_sdpa``); otherwise ``QUERY_CHUNK`` queries at a time when a mask or bias
    has to be built per query (ALiBi with a mask or bias, a mask with ``is_causal``,
    tensor positions). Under ``torch.export`` the chunks become one call (see
    ``_row_blocks``), so a symbolic L stays symbolic.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)`` in q's dtype.
    """
    if need_weights:
        weights = dot_product_attention_weights(
            q,
            k,
            mask,
            bias=bias,
            alibi_slopes=alibi_slopes,
            is_causal=is_causal,
            scale=scale,
            query_positions=query_positions,
            key_positions=key_positions,
        )
        dropped = F.dropout(weights, dropout_p) if dropout_p > 0.0 else weights
        return _apply_weights(dropped, v).to(q.dtype), weights.to(q.dtype)

    offset = _offset(query_positions, key_positions)
    if offset is None:
        check_positions("query_positions", query_positions, q.shape[2], q.shape[0])
        check_positions("key_positions", key_positions, k.shape[2], q.shape[0])
    if mask is None and bias is None:
        if alibi_slopes is None and (not is_causal or offset == 0):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=_grouped(q, k),
            )
            return out, None
        if offset is not None:
            out = _toeplitz_sdpa(
                q,
                k,
                v,
                alibi_slopes,
                offset=offset,
                is_causal=is_causal,
                scale=scale,
                dropout_p=dropout_p,
            )
            return out, None
    out = _chunked_sdpa(
        q,
        k,
        v,
        mask,
        bias,
        alibi_slopes,
        is_causal=is_causal,
        query_positions=query_positions,
        key_positions=key_positions,
        scale=scale,
        dropout_p=dropout_p,
    )
    return out, None

"""Linear (kernel) self-attention, Katharopoulos et al. 2020, "Transformers are RNNs".

Shape legend: B batch, L length, H heads, D head width, F = D feature index of
``phi(q)``, ``phi(k)`` (the feature map keeps the width), C chunk length, N chunks.

With ``phi(x) = elu(x) + 1`` (or ``relu``), no score scaling, ``EPS = 1e-6`` and the
keep-mask M (docs/semantics.md, "Mechanisms and their patterns")::

    A[i, j] = M[i, j] phi(q_i)·phi(k_j) / (sum_j' M[i, j'] phi(q_i)·phi(k_j') + EPS)
    out     = A @ V

Paths, all computing that formula (``attentions_jax.linear`` takes the same steps):

* no mask, or a mask that depends on the key only (padding, ``(B, 1, 1, L)``) or on the
  query only (``(B, 1, L, 1)``): the mask is folded into the features (a hidden key or
  query gets ``phi = 0``), then
  - non-causal: ``phi(K)ᵀ[V, 1]`` once per head, O(L·D²) time, O(D²) state;
  - causal: chunks of C queries, quadratic inside a chunk plus the prefix sum of the
    earlier chunks' ``phi(K_c)ᵀ[V_c, 1]``, O(L·(C + D)·D) time, O(L·D) memory;
* a general ``(L, S)`` / ``(B, H, L, S)`` mask, or dropout in training (it drops entries
  of A): ``out = A @ V`` from the quadratic form, O(L·S·D);
* causal with positions of its own (queries at ``p``, keys at ``s``, docs/semantics.md
  "Positions") or with ``S != L``: the causal rule ``s_j <= p_i`` becomes a general mask
  and takes the quadratic form. Without causality positions change nothing: keys S != L
  (cross-attention) keep the O(L + S) paths.

``need_weights=True`` also returns A ``(B, H, L, L)``, computed in one product from O(L)
denominators; the output takes the same path either way and equals ``A @ V``.

Appending a column of ones to V makes one product give numerator and denominator
together: ``phi(q)·phi(K)ᵀ[V, 1] = [sum_j s_j v_j, sum_j s_j]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import parallel
from ._validation import (
    validate_cache,
    validate_cache_size,
    validate_feature_map,
    validate_unscaled,
)
from .base import SelfAttention
from .cache import LinearCache, field_shapes, finish, limit_tensor, new_tokens
from .functional import _causal, _position_rows
from .masks import causal_mask

__all__ = ["CHUNK_SIZE", "EPS", "LinearSelfAttention", "linear_attention"]

EPS = 1e-6
"""Added to every denominator; a query that sees no key gets ``0 / EPS = 0``."""

CHUNK_SIZE = 64
"""Smallest chunk of the causal fast path; the chunk is ``max(CHUNK_SIZE, D)`` (capped
at L), so neither the intra-chunk scores ``(L, C)`` nor the chunk states ``(L / C, D, D)``
outgrow the ``(L, D)`` inputs."""


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _phi(x: Tensor, name: str) -> Tensor:
    """``phi``: ``elu(x) + 1`` or ``relu(x)``, elementwise."""
    if name == "relu":
        return F.relu(x)
    return F.elu(x) + 1


def _fold_mask(fq: Tensor, fk: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fold a key-only or query-only keep-mask into the features.

    A hidden key (``phi(k_j) = 0``) drops out of every sum; a hidden query
    (``phi(q_i) = 0``) gets ``0 / EPS = 0``. Returns ``(fq, fk, rest)`` where ``rest`` is
    the mask still to apply (``None`` once folded, else the general ``(.., L, L)`` mask).
    """
    if mask is None:
        return fq, fk, None
    if mask.shape[-2] == 1:  # (B|1, H|1, 1, L): one flag per key
        return fq, fk * mask.transpose(-1, -2), None
    if mask.shape[-1] == 1:  # (B|1, H|1, L, 1): one flag per query
        return fq * mask, fk, None
    return fq, fk, mask


def _append_ones(v: Tensor) -> Tensor:
    """``(B, H, L, D) -> (B, H, L, D + 1)``: the last column sums the kernel (denominator)."""
    return torch.cat((v, v.new_ones(*v.shape[:-1], 1)), dim=-1)


def _normalize(out: Tensor) -> Tensor:
    """``[numerator, denominator]`` ``(.., D + 1) -> (.., D)``."""
    return out[..., :-1] / (out[..., -1:] + EPS)


def _global_attention(fq: Tensor, fk: Tensor, v: Tensor) -> Tensor:
    """Non-causal O(L·D²): ``phi(Q) (phi(K)ᵀ [V, 1])``, out ``(B, H, L, D)``."""
    # (B, H, L, F)ᵀ @ (B, H, L, D + 1) -> (B, H, F, D + 1)
    kv = fk.transpose(-1, -2) @ _append_ones(v)
    return _normalize(fq @ kv)


def _chunked(x: Tensor, chunk: int) -> Tensor:
    """``(B, H, L, X) -> (B, H, N, C, X)``, zero-padding L up to ``N * C``."""
    batch, heads, length, width = x.shape
    padded = -(-length // chunk) * chunk
    if padded != length:
        x = F.pad(x, (0, 0, 0, padded - length))
    return x.view(batch, heads, padded // chunk, chunk, width)


def _causal_attention(fq: Tensor, fk: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """Causal O(L·(C + D)·D) by chunks, out ``(B, H, L, D)``: ``_causal_sums`` normalized."""
    return _normalize(_causal_sums(fq, fk, _append_ones(v), chunk_size))


def _causal_sums(fq: Tensor, fk: Tensor, v1: Tensor, chunk_size: int) -> Tensor:
    """``[numerator, denominator]`` ``(B, H, L, D + 1)`` of causal attention on ``v1 = [V, 1]``.

    Inside a chunk the masked kernel is explicit ``(C, C)``; the chunks before it enter as
    the exclusive prefix sum of the chunk states ``phi(K_c)ᵀ [V_c, 1]``. Padded keys have
    ``phi = 0`` and padded queries are cut off, so the padding changes nothing. While
    ``torch.export`` traces a symbolic L, ``_prefix_sums`` serves instead.
    """
    length, d_head = v1.shape[2], v1.shape[3] - 1
    if torch.compiler.is_exporting():
        return _prefix_sums(fq, fk, v1)
    chunk = min(max(chunk_size, d_head), length)
    qc, kc, vc = _chunked(fq, chunk), _chunked(fk, chunk), _chunked(v1, chunk)
    # (B, H, N, C, F) @ (B, H, N, F, C) -> (B, H, N, C, C), keys after the query zeroed
    scores = (qc @ kc.transpose(-1, -2)).tril_()
    # (B, H, N, F, C) @ (B, H, N, C, D + 1) -> (B, H, N, F, D + 1): the state after each chunk
    states = (kc.transpose(-1, -2) @ vc).cumsum_(2)
    out = scores @ vc
    # chunk n also sees the chunks before it, through the state after chunk n - 1
    out[:, :, 1:] += qc[:, :, 1:] @ states[:, :, :-1]
    return out.flatten(2, 3)[:, :, :length]


def _prefix_sums(fq: Tensor, fk: Tensor, v1: Tensor) -> Tensor:
    """``_causal_sums`` in O(L·D²) time and memory with no chunks: the states after every
    key, ``cumsum_j phi(k_j) [v_j, 1]ᵀ`` ``(B, H, L, F, D + 1)``, read by each query.
    ``torch.export`` takes this path: chunking a symbolic L asks whether it is a multiple
    of the chunk, a branch the export would pin to the traced length.
    """
    states = (fk[..., :, None] * v1[..., None, :]).cumsum(2)
    return (fq[..., None, :] @ states)[..., 0, :]


def _kernel_weights(fq: Tensor, fk: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """The weights A ``(B, H, L, S)`` of the formula above (causal only when ``S = L``).

    Without a general mask the denominators ``phi(q_i)·sum_j phi(k_j)`` (a prefix sum
    when causal) cost O(L·D), so A is one product ``(phi(Q) / den) phi(K)ᵀ``.
    """
    if mask is None:
        k_sums = fk.cumsum(2) if is_causal else fk.sum(2, keepdim=True)
        den = (fq * k_sums).sum(-1, keepdim=True) + EPS
        weights = (fq / den) @ fk.transpose(-1, -2)
        return weights.tril_() if is_causal else weights  # in place: one (L, L) buffer
    keep = mask & causal_mask(fq.shape[2], fq.device) if is_causal else mask
    scores = (fq @ fk.transpose(-1, -2)) * keep
    return scores / (scores.sum(-1, keepdim=True) + EPS)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    feature_map: str = "elu",
    dropout_p: float = 0.0,
    need_weights: bool = True,
    chunk_size: int = CHUNK_SIZE,
    query_positions: Tensor | int | None = None,
    key_positions: Tensor | int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Kernel attention (the formula above) on heads.

    Args:
      q: ``(B, H, L, D)``; k, v: ``(B, H, S, D)``.
      mask: boolean keep-mask broadcastable to ``(B, H, L, S)`` (rank 4), or ``None``.
      is_causal: AND the causal pattern ``s_j <= p_i`` into ``mask``.
      feature_map: ``"elu"`` (``elu + 1``) or ``"relu"``.
      dropout_p: dropout on the weights A (pass 0.0 outside training); > 0 takes the
        quadratic path.
      need_weights: ``True`` also returns A ``(B, H, L, S)`` (before dropout); the
        output takes an O(L) path either way, unless ``mask`` is a general ``(L, S)``
        mask, dropout is on, or causality meets positions of its own.
      chunk_size: smallest chunk of the causal O(L) path.
      query_positions, key_positions: ``None`` (``0..L-1``, ``0..S-1``), a start offset,
        or integer tensors ``(L,)``/``(B, L)`` and ``(S,)``/``(B, S)``; only causality
        reads them.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)`` in q's dtype; the arithmetic runs in float32
      or wider.
    """
    length, keys = q.shape[2], k.shape[2]
    if is_causal and (query_positions is not None or key_positions is not None or keys != length):
        # the chunked prefix sums assume keys = queries in order: state causality as a mask
        causal = _causal(
            _position_rows(query_positions, length, q.device),
            _position_rows(key_positions, keys, q.device),
        )
        mask = causal if mask is None else mask & causal
        is_causal = False
    acc = _accumulation_dtype(q.dtype)
    fq = _phi(q.to(acc), feature_map)
    fk = _phi(k.to(acc), feature_map)
    v = v.to(acc)
    fq, fk, rest = _fold_mask(fq, fk, mask)
    # only a general mask or dropout on A makes the output go through the weights
    quadratic = rest is not None or dropout_p > 0.0
    weights = _kernel_weights(fq, fk, rest, is_causal) if need_weights or quadratic else None
    if quadratic:
        out = (F.dropout(weights, dropout_p) if dropout_p > 0.0 else weights) @ v
    elif is_causal:
        out = _causal_attention(fq, fk, v, chunk_size)
    else:
        out = _global_attention(fq, fk, v)
    return out.to(q.dtype), weights.to(q.dtype) if need_weights else None


class LinearSelfAttention(SelfAttention):
    """Linear attention (Katharopoulos et al. 2020): ``phi(q)·phi(k)`` kernel, no softmax.

    ``feature_map``: ``"elu"`` (``elu(x) + 1``) or ``"relu"``. There is no score scaling,
    so ``temperature`` must stay 1.0. ``rope=True`` rotates q and k before ``phi`` (the
    kernel stays separable, so every path stays exact, but ``phi`` being nonlinear, the
    kernel is not a function of ``i - j`` alone). ``dropout`` drops entries of A in
    training, which needs the quadratic path.

    Complexity (fast path, ``need_weights=False``): O(L·D²·H) time without a mask or with
    a key-padding mask; O(L·(C + D)·D·H) when causal (chunked, C = max(64, D)); O(L²·D·H)
    with a general ``(L, L)`` mask. ``need_weights=True``: O(L²·D·H) time, O(H·L²)
    memory. Decoding (``init_cache`` / ``decode``): the recurrent state, O(D²·H) per token.

    Example::

        attn = LinearSelfAttention(d_model=512, num_heads=8)
        out, _ = attn(torch.randn(1, 65536, 512), is_causal=True, need_weights=False)
        cache = attn.init_cache(batch=1)
        cache, y = attn.decode(cache, torch.randn(1, 1, 512))   # (1, 1, 512)
    """

    chunk_size = CHUNK_SIZE

    def __init__(
        self, d_model: int, num_heads: int = 1, feature_map: str = "elu", **options: Any
    ) -> None:
        validate_feature_map(feature_map)
        validate_unscaled(options.get("temperature", 1.0))
        super().__init__(d_model, num_heads, num_heads, **options)
        self.feature_map = feature_map

    def attend_sharded(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        spec: parallel.SequenceParallel,
        *,
        is_causal: bool,
        positions: Tensor,
    ) -> Tensor:
        """Kernel attention of this rank's shard to the sharded sequence
        (``SelfAttention.attend_sharded``), through the state, never the sequence:

        * non-causal: the state ``phi(K)ᵀ[V, 1]`` ``(B, H, F, D + 1)`` summed over the
          ranks (``parallel.sum_shards``), read by the shard's ``phi(Q)``;
        * causal: every chunk's state gathered (``parallel.gather_shards``,
          ``(N, B, H, n, F, D + 1)``), the sum of those before a chunk in the sequence
          starting its chunked causal sums.

        Communication O(N·H·D²) per rank, whatever L; arithmetic in float32 or wider."""
        group = spec.group
        rank, shards = dist.get_rank(group), dist.get_world_size(group)
        if shards > 1:
            parallel.check_equal_shards(q, k, group)
        acc = _accumulation_dtype(q.dtype)
        fq = _phi(q.to(acc), self.feature_map)
        fk = _phi(k.to(acc), self.feature_map)
        v1 = _append_ones(v.to(acc))
        if not is_causal:
            # (B, H, Ll, F)ᵀ @ (B, H, Ll, D + 1) -> (B, H, F, D + 1), summed over the ranks
            state = parallel.sum_shards(fk.transpose(-1, -2) @ v1, group)
            return _normalize(fq @ state).to(q.dtype)
        held = parallel.shard_chunks(rank, shards, spec.layout)
        fq, fk, v1 = (x.unflatten(2, (len(held), -1)) for x in (fq, fk, v1))  # (B, H, n, c, X)
        # (N, B, H, n, F, D + 1): every chunk's state, by rank and slot
        states = parallel.gather_shards(fk.transpose(-1, -2) @ v1, group)
        chunks = sorted(
            (index, source, slot)
            for source in range(shards)
            for slot, index in enumerate(parallel.shard_chunks(source, shards, spec.layout))
        )
        ordered = torch.stack([states[source, :, :, slot] for _, source, slot in chunks])
        # (2N | N, B, H, F, D + 1): the state of the chunks before each chunk
        starts = torch.cat((torch.zeros_like(ordered[:1]), ordered[:-1].cumsum(0)))
        sums = [
            _causal_sums(fq[:, :, slot], fk[:, :, slot], v1[:, :, slot], self.chunk_size)
            + fq[:, :, slot] @ starts[index]
            for slot, index in enumerate(held)
        ]
        return _normalize(torch.cat(sums, dim=2)).to(q.dtype)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        *,
        is_causal: bool,
        need_weights: bool,
        query_positions: Tensor | int | None = None,
        key_positions: Tensor | int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Kernel attention on heads (``linear_attention``); q ``(B, H, L, D)``, k, v
        ``(B, H, S, D)``."""
        return linear_attention(
            q,
            k,
            v,
            mask,
            is_causal=is_causal,
            feature_map=self.feature_map,
            dropout_p=self.dropout_p,
            need_weights=need_weights,
            chunk_size=self.chunk_size,
            query_positions=query_positions,
            key_positions=key_positions,
        )

    def init_cache(
        self,
        batch: int,
        max_length: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LinearCache:
        """The empty recurrent state for ``batch`` sequences (``max_length``: the most
        tokens a sequence may hold, ``None``: no limit): ``LinearCache`` with kv
        ``(B, H, D, D)`` and k_sum ``(B, H, D)`` in ``dtype`` (default: float32 or wider
        than the parameters), lengths ``(B,)`` and max_length ``()`` int32."""
        validate_cache_size(batch, max_length, fixed_size=True)
        weight = self.w_q.weight
        dtype = _accumulation_dtype(weight.dtype) if dtype is None else dtype
        device = weight.device if device is None else device
        shape = (batch, self.num_heads, self.d_head)
        return LinearCache(
            kv=torch.zeros((*shape, self.d_head), dtype=dtype, device=device),
            k_sum=torch.zeros(shape, dtype=dtype, device=device),
            lengths=torch.zeros(batch, dtype=torch.int32, device=device),
            max_length=limit_tensor(max_length, device),
        )

    def decode(
        self, cache: LinearCache, x: Tensor, mask: Tensor | None = None
    ) -> tuple[LinearCache, Tensor]:
        """Causal linear attention of T new tokens ``x`` ``(B, T, input_dim)`` after the
        state, O((T·C + T·D)·D·H) (one token: O(D²·H)); ``mask`` ``(B, T)`` marks the real
        tokens. The state is updated in place; see ``SelfAttention.decode``."""
        heads = ("B", self.num_heads, self.d_head)
        expected = {
            "kv": (*heads, self.d_head),
            "k_sum": heads,
            "lengths": ("B",),
            "max_length": (),
        }
        validate_cache(type(cache).__name__, field_shapes(cache), "LinearCache", expected)
        new = new_tokens(self, x, mask, cache.lengths, cache.max_length)
        acc = _accumulation_dtype(cache.kv.dtype)
        fq = _phi(new.q.to(acc), self.feature_map) * new.real[:, None, :, None]
        fk = _phi(new.k.to(acc), self.feature_map) * new.writable[:, None, :, None]
        v1 = _append_ones(new.v.to(acc))
        state = torch.cat((cache.kv, cache.k_sum[..., None]), dim=-1).to(acc)
        # the tokens of this call among themselves, then the state of those before them
        sums = _causal_sums(fq, fk, v1, self.chunk_size) + fq @ state
        out = _normalize(sums).to(new.q.dtype)
        added = fk.transpose(-1, -2) @ v1  # (B, H, F, D + 1)
        cache.kv.add_(added[..., :-1].to(cache.kv.dtype))
        cache.k_sum.add_(added[..., -1].to(cache.k_sum.dtype))
        cache.lengths.add_(new.real.sum(1).to(cache.lengths.dtype))
        return cache, finish(self, out, new)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_map={self.feature_map!r}"

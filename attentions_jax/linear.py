"""Linear (kernel) self-attention, Katharopoulos et al. 2020, "Transformers are RNNs".

Shape legend: B batch, L length, H heads, D head width, F = D feature index of
``phi(q)``, ``phi(k)`` (the feature map keeps the width), C chunk length, N chunks.

With ``phi(x) = elu(x) + 1`` (or ``relu``), no score scaling, ``EPS = 1e-6`` and the
keep-mask M (docs/semantics.md, "Mechanisms and their patterns")::

    A[i, j] = M[i, j] phi(q_i)·phi(k_j) / (sum_j' M[i, j'] phi(q_i)·phi(k_j') + EPS)
    out     = A @ V

Paths, all computing that formula (``attentions_torch.linear`` takes the same steps):

* no mask, or a mask that depends on the key only (padding, ``(B, 1, 1, L)``) or on the
  query only (``(B, 1, L, 1)``): the mask is folded into the features (a hidden key or
  query gets ``phi = 0``), then
  - non-causal: ``phi(K)ᵀ[V, 1]`` once per head, O(L·D²) time, O(D²) state;
  - causal: ``lax.scan`` over chunks of C queries, quadratic inside a chunk, carrying the
    running ``phi(K)ᵀ[V, 1]`` ``(B, H, F, D + 1)`` between chunks, O(L·(C + D)·D) time;
* a general ``(L, S)`` / ``(B, H, L, S)`` mask, or dropout in training (it drops entries
  of A): ``out = A @ V`` from the quadratic form, O(L·S·D);
* causal with positions of its own (queries at ``p``, keys at ``s``, docs/semantics.md
  "Positions") or with ``S != L``: the causal rule ``s_j <= p_i`` becomes a general mask
  and takes the quadratic form. Without causality positions change nothing: keys S != L
  (cross-attention) keep the O(L + S) paths;
* sequence parallel (``LinearMechanism.attend_sharded``): the non-causal state summed over
  the devices, or the causal scan of each chunk started from the earlier chunks' states.

``need_weights=True`` also returns A ``(B, H, L, L)``, computed in one product from O(L)
denominators; the output takes the same path either way and equals ``A @ V``.

Appending a column of ones to V makes one product give numerator and denominator
together: ``phi(q)·phi(K)ᵀ[V, 1] = [sum_j s_j v_j, sum_j s_j]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import parallel
from ._validation import (
    validate_cache,
    validate_cache_size,
    validate_feature_map,
    validate_unscaled,
)
from .base import Mechanism, SelfAttention
from .cache import LinearCache, field_shapes, finish, limit_array, new_tokens
from .functional import _causal, _position_rows
from .masks import causal_mask

__all__ = ["CHUNK_SIZE", "EPS", "LinearMechanism", "LinearSelfAttention", "linear_attention"]

EPS = 1e-6
"""Added to every denominator; a query that sees no key gets ``0 / EPS = 0``."""

CHUNK_SIZE = 64
"""Smallest chunk of the causal fast path; the chunk is ``max(CHUNK_SIZE, D)`` (capped
at L), as in ``attentions_torch.linear``."""


def _accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _phi(x: jax.Array, name: str) -> jax.Array:
    """``phi``: ``elu(x) + 1`` or ``relu(x)``, elementwise."""
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.elu(x) + 1


def _fold_mask(
    fq: jax.Array, fk: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Fold a key-only or query-only keep-mask into the features.

    A hidden key (``phi(k_j) = 0``) drops out of every sum; a hidden query
    (``phi(q_i) = 0``) gets ``0 / EPS = 0``. Returns ``(fq, fk, rest)`` where ``rest`` is
    the mask still to apply (``None`` once folded, else the general ``(.., L, L)`` mask).
    """
    if mask is None:
        return fq, fk, None
    if mask.shape[-2] == 1:  # (B|1, H|1, 1, L): one flag per key
        return fq, fk * jnp.swapaxes(mask, -1, -2), None
    if mask.shape[-1] == 1:  # (B|1, H|1, L, 1): one flag per query
        return fq * mask, fk, None
    return fq, fk, mask


def _append_ones(v: jax.Array) -> jax.Array:
    """``(B, H, L, D) -> (B, H, L, D + 1)``: the last column sums the kernel (denominator)."""
    return jnp.concatenate((v, jnp.ones((*v.shape[:-1], 1), v.dtype)), axis=-1)


def _normalize(out: jax.Array) -> jax.Array:
    """``[numerator, denominator]`` ``(.., D + 1) -> (.., D)``."""
    return out[..., :-1] / (out[..., -1:] + EPS)


def _global_attention(fq: jax.Array, fk: jax.Array, v: jax.Array) -> jax.Array:
    """Non-causal O(L·D²): ``phi(Q) (phi(K)ᵀ [V, 1])``, out ``(B, H, L, D)``."""
    # (B, H, L, F) x (B, H, L, D + 1) -> (B, H, F, D + 1)
    kv = jnp.einsum("bhlf,bhld->bhfd", fk, _append_ones(v))
    return _normalize(jnp.einsum("bhlf,bhfd->bhld", fq, kv))


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """``(B, H, L, X) -> (N, B, H, C, X)``, zero-padding L up to ``N * C``."""
    batch, heads, length, width = x.shape
    padded = -(-length // chunk) * chunk
    x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))
    return x.reshape(batch, heads, padded // chunk, chunk, width).transpose(2, 0, 1, 3, 4)


def _chunk_step(
    before: jax.Array, chunk: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """One chunk of the causal scan: ``(state, (phi(Q_c), phi(K_c), [V_c, 1]))``.

    Returns the state after the chunk ``(B, H, F, D + 1)`` and the chunk's unnormalized
    output ``(B, H, C, D + 1)``. A module-level function, so eager calls reuse its trace.
    """
    qc, kc, vc = chunk
    # (B, H, C, F) x (B, H, C, F) -> (B, H, C, C), keys after the query zeroed
    scores = jnp.where(causal_mask(qc.shape[2]), jnp.einsum("bhlf,bhsf->bhls", qc, kc), 0.0)
    out = jnp.einsum("bhls,bhsd->bhld", scores, vc)
    out = out + jnp.einsum("bhlf,bhfd->bhld", qc, before)
    return before + jnp.einsum("bhsf,bhsd->bhfd", kc, vc), out


def _causal_attention(fq: jax.Array, fk: jax.Array, v: jax.Array, chunk_size: int) -> jax.Array:
    """Causal O(L·(C + D)·D) by chunks, out ``(B, H, L, D)``: ``_causal_sums`` normalized."""
    batch, heads, _, d_head = v.shape
    start = jnp.zeros((batch, heads, d_head, d_head + 1), v.dtype)
    return _normalize(_causal_sums(fq, fk, _append_ones(v), chunk_size, start)[1])


def _causal_sums(
    fq: jax.Array, fk: jax.Array, v1: jax.Array, chunk_size: int, start: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Causal attention on ``v1 = [V, 1]`` after the state ``start`` ``(B, H, F, D + 1)``
    of earlier keys, by chunks with ``lax.scan``: ``(state after the last key,
    [numerator, denominator] (B, H, L, D + 1))``.

    Inside a chunk the masked kernel is explicit ``(C, C)``; the chunks before it enter
    through the carried state ``phi(K)ᵀ [V, 1]`` of all earlier chunks. Padded keys have
    ``phi = 0`` and padded queries are cut off, so the padding changes nothing. A symbolic
    L (``jax.export``) is padded to a multiple of C, the chunk count a ceiling division.
    """
    length, d_head = v1.shape[2], v1.shape[3] - 1
    chunk = max(chunk_size, d_head)
    if isinstance(length, int):
        chunk = min(chunk, length)  # a short sequence is one chunk; a symbolic L is padded
    xs = (_chunked(fq, chunk), _chunked(fk, chunk), _chunked(v1, chunk))
    state, out = lax.scan(_chunk_step, start, xs)
    # (N, B, H, C, D + 1) -> (B, H, N * C, D + 1)
    out = lax.collapse(out.transpose(1, 2, 0, 3, 4), 2, 4)
    return state, out[:, :, :length]


def _kernel_weights(
    fq: jax.Array, fk: jax.Array, mask: jax.Array | None, is_causal: bool
) -> jax.Array:
    """The weights A ``(B, H, L, S)`` of the formula above (causal only when ``S = L``).

    Without a general mask the denominators ``phi(q_i)·sum_j phi(k_j)`` (a prefix sum
    when causal) cost O(L·D), so A is one product ``(phi(Q) / den) phi(K)ᵀ``.
    """
    if mask is None:
        # the denominators as products: a reduce here gets fused into the O(L²·D) product
        # below by XLA on CPU, which then recomputes it per weight (2.3x slower at L = 2048)
        if is_causal:
            den = jnp.einsum("bhlf,bhlf->bhl", fq, jnp.cumsum(fk, axis=2))
        else:
            den = jnp.einsum("bhlf,bhf->bhl", fq, fk.sum(2))
        weights = jnp.einsum("bhlf,bhsf->bhls", fq / (den[..., None] + EPS), fk)
        return jnp.tril(weights) if is_causal else weights
    keep = mask & causal_mask(fq.shape[2]) if is_causal else mask
    scores = jnp.where(keep, jnp.einsum("bhlf,bhsf->bhls", fq, fk), 0.0)
    return scores / (scores.sum(-1, keepdims=True) + EPS)


def _dropout(weights: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    feature_map: str = "elu",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    need_weights: bool = True,
    chunk_size: int = CHUNK_SIZE,
    query_positions: jax.Array | int | None = None,
    key_positions: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Kernel attention (the formula above) on heads.

    Args:
      q: ``(B, H, L, D)``; k, v: ``(B, H, S, D)``.
      mask: boolean keep-mask broadcastable to ``(B, H, L, S)`` (rank 4), or ``None``.
      is_causal: AND the causal pattern ``s_j <= p_i`` into ``mask`` (static).
      feature_map: ``"elu"`` (``elu + 1``) or ``"relu"``.
      dropout_rate: dropout on the weights A; applied only with ``dropout_rng``, and then
        takes the quadratic path.
      dropout_rng: PRNG key for dropout, ``None`` for deterministic attention.
      need_weights: ``True`` also returns A ``(B, H, L, S)`` (before dropout); the
        output takes an O(L) path either way, unless ``mask`` is a general ``(L, S)``
        mask, dropout is on, or causality meets positions of its own (static).
      chunk_size: smallest chunk of the causal O(L) path.
      query_positions, key_positions: ``None`` (``0..L-1``, ``0..S-1``), a start offset,
        or integer arrays ``(L,)``/``(B, L)`` and ``(S,)``/``(B, S)``; only causality
        reads them.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)`` in q's dtype; the arithmetic runs in float32
      or wider.
    """
    length, keys = q.shape[2], k.shape[2]
    if is_causal and (query_positions is not None or key_positions is not None or keys != length):
        # the chunked scan assumes keys = queries in order: state causality as a mask
        causal = _causal(
            _position_rows(query_positions, length), _position_rows(key_positions, keys)
        )
        mask = causal if mask is None else mask & causal
        is_causal = False
    acc = _accumulation_dtype(q.dtype)
    fq = _phi(q.astype(acc), feature_map)
    fk = _phi(k.astype(acc), feature_map)
    v = v.astype(acc)
    fq, fk, rest = _fold_mask(fq, fk, mask)
    dropping = dropout_rate > 0.0 and dropout_rng is not None
    # only a general mask or dropout on A makes the output go through the weights
    quadratic = rest is not None or dropping
    weights = _kernel_weights(fq, fk, rest, is_causal) if need_weights or quadratic else None
    if quadratic:
        dropped = _dropout(weights, dropout_rate, dropout_rng) if dropping else weights
        # (B, H, L, S) x (B, H, S, D) -> (B, H, L, D)
        out = jnp.einsum("bhls,bhsd->bhld", dropped, v)
    elif is_causal:
        out = _causal_attention(fq, fk, v, chunk_size)
    else:
        out = _global_attention(fq, fk, v)
    return out.astype(q.dtype), weights.astype(q.dtype) if need_weights else None


class LinearMechanism(Mechanism):
    """The ``phi(q)·phi(k)`` kernel without softmax; decoding keeps the recurrent state."""

    chunk_size = CHUNK_SIZE

    def validate(self) -> None:
        validate_feature_map(self.feature_map)
        validate_unscaled(self.temperature)
        super().validate()

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None,
        *,
        is_causal: bool,
        need_weights: bool,
        dropout_rng: jax.Array | None = None,
        query_positions: jax.Array | int | None = None,
        key_positions: jax.Array | int | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Kernel attention on heads (``linear_attention``); q ``(B, H, L, D)``, k, v
        ``(B, H, S, D)``."""
        return linear_attention(
            q,
            k,
            v,
            mask,
            is_causal=is_causal,
            feature_map=self.feature_map,
            dropout_rate=self.dropout,
            dropout_rng=dropout_rng,
            need_weights=need_weights,
            chunk_size=self.chunk_size,
            query_positions=query_positions,
            key_positions=key_positions,
        )

    def attend_sharded(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        spec: parallel.SequenceParallel,
        *,
        is_causal: bool,
        positions: jax.Array,
    ) -> jax.Array:
        """Kernel attention of the shard to the whole sequence through the states
        ``phi(K)ᵀ[V, 1]`` ``(B, H, F, D + 1)``: q, k, v ``(B, H, Ll, D)`` -> ``(B, H, Ll, D)``.

        Non-causal: the shard's state summed over the devices (``lax.psum``). Causal: each
        chunk's state gathered from every device (``lax.all_gather``, O(N·D²)); the sum of
        the chunks before it in global order starts the chunk's causal scan
        (``_causal_sums``).
        """
        acc = _accumulation_dtype(q.dtype)
        fq = _phi(q.astype(acc), self.feature_map)
        fk = _phi(k.astype(acc), self.feature_map)
        v1 = _append_ones(v.astype(acc))
        if not is_causal:
            # (B, H, Ll, F) x (B, H, Ll, D + 1) -> (B, H, F, D + 1), over the whole sequence
            state = lax.psum(jnp.einsum("bhlf,bhld->bhfd", fk, v1), spec.axis)
            return _normalize(jnp.einsum("bhlf,bhfd->bhld", fq, state)).astype(q.dtype)
        table = parallel.chunk_table(lax.axis_size(spec.axis), spec.layout)
        chunk = q.shape[2] // table.shape[1]
        pieces = [slice(at, at + chunk) for at in range(0, q.shape[2], chunk)]
        # (P, B, H, F, D + 1): each chunk's state; gathered (N, P, B, H, F, D + 1)
        states = jnp.stack(
            [jnp.einsum("bhlf,bhld->bhfd", fk[:, :, rows], v1[:, :, rows]) for rows in pieces]
        )
        every = lax.all_gather(states, spec.axis)
        rank = lax.axis_index(spec.axis)
        outs = []
        for slot, rows in enumerate(pieces):
            earlier = (table < jnp.asarray(table[:, slot])[rank]).astype(acc)
            start = jnp.einsum("np,npbhfd->bhfd", earlier, every)
            sums = _causal_sums(
                fq[:, :, rows], fk[:, :, rows], v1[:, :, rows], self.chunk_size, start
            )
            outs.append(_normalize(sums[1]))
        return jnp.concatenate(outs, axis=2).astype(q.dtype)

    def init_cache(
        self, batch: int, max_length: int | None = None, *, dtype: jnp.dtype | None = None
    ) -> LinearCache:
        """The empty recurrent state for ``batch`` sequences (``max_length``: the most
        tokens a sequence may hold, ``None``: no limit): ``LinearCache`` with kv
        ``(B, H, D, D)`` and k_sum ``(B, H, D)`` in ``dtype`` (default: float32 or wider
        than the parameters), lengths ``(B,)`` and max_length ``()`` int32.

        Call through ``apply(variables, batch, max_length, method="init_cache")``.
        """
        validate_cache_size(batch, max_length, fixed_size=True)
        dtype = _accumulation_dtype(self.param_dtype()) if dtype is None else dtype
        shape = (batch, self.num_heads, self.d_head)
        return LinearCache(
            kv=jnp.zeros((*shape, self.d_head), dtype),
            k_sum=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            max_length=limit_array(max_length),
        )

    def decode(
        self, cache: LinearCache, x: jax.Array, mask: jax.Array | None = None
    ) -> tuple[LinearCache, jax.Array]:
        """Causal linear attention of T new tokens ``x`` ``(B, T, input_dim)`` after the
        state, O((T·C + T·D)·D·H) (one token: O(D²·H)); ``mask`` ``(B, T)`` marks the real
        tokens. Call through ``apply(variables, cache, x, mask, method="decode")``; see
        ``SelfAttention.decode``."""
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
        fq = _phi(new.q.astype(acc), self.feature_map) * new.real[:, None, :, None]
        fk = _phi(new.k.astype(acc), self.feature_map) * new.writable[:, None, :, None]
        state = jnp.concatenate((cache.kv, cache.k_sum[..., None]), axis=-1).astype(acc)
        state, sums = _causal_sums(fq, fk, _append_ones(new.v.astype(acc)), self.chunk_size, state)
        out = _normalize(sums).astype(new.q.dtype)
        cache = LinearCache(
            kv=state[..., :-1].astype(cache.kv.dtype),
            k_sum=state[..., -1].astype(cache.k_sum.dtype),
            lengths=cache.lengths + new.real.sum(1, dtype=cache.lengths.dtype),
            max_length=cache.max_length,
        )
        return cache, finish(self, out, new)


class LinearSelfAttention(LinearMechanism, SelfAttention):
    """Linear attention (Katharopoulos et al. 2020): ``phi(q)·phi(k)`` kernel, no softmax.

    ``feature_map``: ``"elu"`` (``elu(x) + 1``) or ``"relu"``. There is no score scaling,
    so ``temperature`` must stay 1.0. ``rope=True`` rotates q and k before ``phi`` (the
    kernel stays separable, so every path stays exact, but ``phi`` being nonlinear, the
    kernel is not a function of ``i - j`` alone). ``dropout`` drops entries of A in
    training, which needs the quadratic path.

    Complexity (fast path, ``need_weights=False``): O(L·D²·H) time without a mask or with
    a key-padding mask; O(L·(C + D)·D·H) when causal (``lax.scan`` over chunks,
    C = max(64, D)); O(L²·D·H) with a general ``(L, L)`` mask. ``need_weights=True``:
    O(L²·D·H) time, O(H·L²) memory. Decoding (``init_cache`` / ``decode`` through
    ``apply(..., method=...)``): the recurrent state, O(D²·H) per token.

    Example::

        attn = LinearSelfAttention(d_model=512, num_heads=8)
        variables = attn.init(jax.random.key(0), x)
        out, _ = attn.apply(variables, x, is_causal=True, need_weights=False)
        cache = attn.apply(variables, 1, method="init_cache")
        cache, y = attn.apply(variables, cache, x[:, :1], method="decode")   # (1, 1, 512)
    """

    num_heads: int = 1
    feature_map: str = "elu"

"""The functional core: scaled dot-product attention with keep-masks, GQA and zero rows.

Shape legend: B batch, L query length, S key length (``S == L`` in self-attention),
H query heads, K kv heads (``H % K == 0``; query head h reads kv head ``h // (H // K)``),
G = H // K query heads per kv head, D head width. Einsum letters keep these meanings.

Semantics shared with ``attentions_torch.functional``:

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

The fast path (``need_weights=False``) walks over steps with ``lax.map``: chunks of
queries of one head group, or of all heads for small problems (``STEP_PAIRS``), so the
scores (and the ALiBi bias) it holds at once are those of one step, never ``(L, S)`` per
head; on CPU this runs about 3x faster than ``jax.nn.dot_product_attention`` (measured
by ``python -m parity.bench``), and unlike it serves float64 and gives zero rows to
queries that see no key. Under ``jax.export`` with a symbolic length the plan cannot
compare sizes: it takes steps of one head group and ``SYMBOLIC_CHUNK`` queries, the
queries padded by ``(-L) % SYMBOLIC_CHUNK`` and the steps counted by ceiling division.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .masks import combine_masks

__all__ = [
    "QUERY_CHUNK",
    "STEP_PAIRS",
    "SYMBOLIC_CHUNK",
    "UNIT_CHUNK",
    "alibi_bias",
    "check_positions",
    "dot_product_attention",
    "dot_product_attention_weights",
    "merge_heads",
    "split_heads",
]

Positions = jax.Array | int | None
"""Where n tokens sit: ``None`` (``0..n-1``), a start offset (an int or an integer scalar,
which may be traced: ``start..start+n-1``) or integer positions ``(n,)`` or ``(B, n)``."""

QUERY_CHUNK = 256
"""Most queries per step of the fast path when a step holds every head (small problems)."""

UNIT_CHUNK = 1024
"""Most queries per step when a step holds one kv head's group (large problems)."""

SYMBOLIC_CHUNK = 256
"""Queries per step (of one head group) when a size is symbolic (``jax.export``)."""

STEP_PAIRS = 2**21
"""Query-key pairs, summed over the heads of a step, that one step aims to hold.

The fast path walks over steps with ``lax.map``. A head group (one batch element, one kv
head and its G query heads) whose ``G·L·S`` pairs pass ``STEP_PAIRS / 8`` gets steps of
its own, of up to ``UNIT_CHUNK`` queries, halved while ``G·chunk·S > STEP_PAIRS``; smaller
problems take all heads in each step, ``query_chunk(S)`` queries at a time. On CPU
(B = 1, H = 8, D = 64, fp32, timed in turns with ``jax.nn.dot_product_attention``) steps
of one head and 1024 queries at L = 2048 ran 3.3-3.5x faster than it, where steps of all
8 heads and 256 queries ran 2.4-2.5x: one scores matrix per step stays in cache between
the passes over it (max, exp, sum, ``@ V``), and the products run on one large matrix.
"""


BACKWARD_PAIRS = 2**19
"""``STEP_PAIRS`` of the backward pass, which holds about four ``(chunk, S)`` arrays per
head where the forward holds one or two: smaller steps keep them in cache (at L = 2048 on
CPU, 2**19 ran the backward about 1.2x faster than 2**21)."""


def query_chunk(keys: int, pairs: int = STEP_PAIRS) -> int:
    """Queries per all-heads step of the fast path for ``keys`` keys."""
    chunk = QUERY_CHUNK
    while chunk > 32 and chunk * keys > pairs // 4:
        chunk //= 2
    return chunk


def unit_chunk(group: int, keys: int, pairs: int = STEP_PAIRS) -> int:
    """Queries per one-group step of the fast path, ``G = group`` heads and ``keys`` keys."""
    chunk = UNIT_CHUNK
    while chunk > 32 and group * chunk * keys > pairs:
        chunk //= 2
    return chunk


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """``(B, L, H*D) -> (B, H, L, D)``."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """``(B, H, L, D) -> (B, L, H*D)``."""
    batch, heads, length, d_head = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * d_head)


def _accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _is_one(size) -> bool:
    """A size known to be 1; a symbolic size (``jax.export``) never counts as broadcast."""
    return isinstance(size, int) and size == 1


def _is_start(positions: Positions) -> bool:
    """``positions`` is a start offset (``None`` is the start 0): a Python int or an integer
    scalar, which may be traced."""
    if positions is None or isinstance(positions, int):
        return not isinstance(positions, bool)
    return jnp.ndim(positions) == 0


def check_positions(name: str, positions: Positions, count: int, batch: int) -> None:
    """``positions`` of n tokens must be ``None``, an int, or an integer array of shape
    ``()``, ``(n,)`` or ``(B|1, n)``; ``ValueError`` otherwise."""
    if positions is None or (isinstance(positions, int) and not isinstance(positions, bool)):
        return
    dtype = getattr(positions, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        shape = tuple(positions.shape)
        if shape in ((), (count,), (1, count), (batch, count)):
            return
    if dtype is not None:
        given = f"a {dtype} array of shape {tuple(positions.shape)}"
    else:
        given = type(positions).__name__
    raise ValueError(
        f"{name} must be None, a start offset (an int or a 0-dim integer tensor) or integer "
        f"positions of shape ({count},) or ({batch}, {count}), got {given}"
    )


def _is_zero(start) -> bool:
    """The start offset 0, known to Python."""
    return isinstance(start, int) and start == 0


def _start_rows(start, count: int) -> jax.Array:
    """``(1, n)`` positions ``start..start+n-1``; the start 0 adds nothing, so the default
    path traces as it did before positions existed."""
    indices = jnp.arange(count)
    return (indices if _is_zero(start) else start + indices)[None]


def _position_rows(positions: Positions, count: int) -> jax.Array:
    """``(B|1, n)`` integer positions of n tokens (see ``Positions``)."""
    if _is_start(positions):
        return _start_rows(0 if positions is None else positions, count)
    rows = jnp.asarray(positions)
    return rows[None] if rows.ndim == 1 else rows


def _causal(query_rows: jax.Array, key_rows: jax.Array) -> jax.Array:
    """``(B|1, 1, l, S)`` keep-mask ``s_j <= p_i`` from positions ``(B|1, l)``, ``(B|1, S)``."""
    return key_rows[:, None, None, :] <= query_rows[:, None, :, None]


def _alibi(slopes: jax.Array, query_rows: jax.Array, key_rows: jax.Array) -> jax.Array:
    """``(B|1, H, l, S)`` ALiBi bias ``-m_h * abs(p_i - s_j)`` in the slopes' dtype."""
    distance = jnp.abs(query_rows[:, None, :, None] - key_rows[:, None, None, :])
    return -slopes[None, :, None, None] * distance.astype(slopes.dtype)


def alibi_bias(slopes: jax.Array, query_positions: jax.Array, keys) -> jax.Array:
    """``(H, l, S)`` ALiBi bias ``-m_h * abs(p_i - s_j)`` in the slopes' dtype.

    slopes: ``(H,)``; query_positions: ``(l,)`` positions p_i, or ``(B, l)``; keys: the
    count S of keys at ``0..S-1``, or their positions ``(S,)`` / ``(B, S)``. With positions of
    rank 2 the result is ``(B, H, l, S)``.
    """
    query_positions = jnp.asarray(query_positions)
    keys = jnp.arange(keys) if isinstance(keys, int) else jnp.asarray(keys)
    batched = query_positions.ndim == 2 or keys.ndim == 2
    query_rows = query_positions if query_positions.ndim == 2 else query_positions[None]
    bias = _alibi(jnp.asarray(slopes), query_rows, keys if keys.ndim == 2 else keys[None])
    return bias if batched else bias[0]


def _with_alibi(
    bias: jax.Array | None,
    slopes: jax.Array | None,
    query_rows: jax.Array,
    key_rows: jax.Array,
    dtype,
) -> jax.Array | None:
    """``bias + ALiBi`` in ``dtype``, broadcastable to ``(B, H, l, S)``; either may be
    absent. Positions: ``(B|1, l)`` and ``(B|1, S)``."""
    if slopes is None:
        return bias
    alibi = _alibi(jnp.asarray(slopes, dtype), query_rows, key_rows)
    return alibi if bias is None else bias.astype(dtype) + alibi


def _as_rank4(x: jax.Array | None) -> jax.Array | None:
    """Left-pad a broadcastable operand to rank 4, so axis 2 is the query axis."""
    return None if x is None else x.reshape((1,) * (4 - x.ndim) + x.shape)


def _scores(q: jax.Array, k: jax.Array, bias: jax.Array | None, scale: float) -> jax.Array:
    """Scaled scores ``(B, H, L, S)`` in float32 or wider."""
    batch, heads, length, d_head = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    acc = _accumulation_dtype(q.dtype)
    grouped = (q.astype(acc) * scale).reshape(batch, kv_heads, heads // kv_heads, length, d_head)
    # (B, K, G, L, D) x (B, K, S, D) -> (B, K, G, L, S): grouped heads share one kv head
    scores = jnp.einsum("bkgld,bksd->bkgls", grouped, k.astype(acc))
    scores = scores.reshape(batch, heads, length, keys)
    return scores if bias is None else scores + bias.astype(acc)


def _weights(
    q: jax.Array,
    k: jax.Array,
    keep: jax.Array | None,
    bias: jax.Array | None,
    scale: float,
) -> jax.Array:
    """Softmax weights ``(B, H, L, S)`` in float32 or wider; zero where ``keep`` is False."""
    scores = _scores(q, k, bias, scale)
    if keep is None:
        return jax.nn.softmax(scores, axis=-1)
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    # a fully hidden row softmaxes to uniform over min-filled scores; the where zeroes it
    return jnp.where(keep, jax.nn.softmax(scores, axis=-1), 0.0)


def _apply_weights(weights: jax.Array, v: jax.Array) -> jax.Array:
    """``(B, H, L, S) x (B, K, S, D) -> (B, H, L, D)`` in the weights' dtype."""
    batch, heads, length, keys = weights.shape
    kv_heads = v.shape[1]
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, length, keys)
    # (B, K, G, L, S) x (B, K, S, D) -> (B, K, G, L, D)
    out = jnp.einsum("bkgls,bksd->bkgld", grouped, v.astype(weights.dtype))
    return out.reshape(batch, heads, length, v.shape[-1])


def _dropout(weights: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def dot_product_attention_weights(
    q: jax.Array,
    k: jax.Array,
    mask: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_positions: Positions = None,
    key_positions: Positions = None,
) -> jax.Array:
    """Attention weights ``(B, H, L, S)`` in float32 or wider.

    q: ``(B, H, L, D)``; k: ``(B, K, S, D)``; alibi_slopes: ``(H,)``; query_positions,
    key_positions: as in ``dot_product_attention``. Rows sum to 1 over visible keys and are
    exactly 0 where a key is hidden (the whole row for a query that sees nothing).
    """
    batch, length, d_head, keys = q.shape[0], q.shape[2], q.shape[3], k.shape[2]
    check_positions("query_positions", query_positions, length, batch)
    check_positions("key_positions", key_positions, keys, batch)
    scale = 1.0 / math.sqrt(d_head) if scale is None else scale
    query_rows = _position_rows(query_positions, length)
    key_rows = _position_rows(key_positions, keys)
    bias = _with_alibi(bias, alibi_slopes, query_rows, key_rows, _accumulation_dtype(q.dtype))
    causal = _causal(query_rows, key_rows) if is_causal else None
    return _weights(q, k, combine_masks(mask, causal), bias, scale)


def _pad_queries(x: jax.Array | None, padded: int, fill) -> jax.Array | None:
    """Pad axis 2 (queries) of a broadcastable operand up to ``padded`` if it has one."""
    if x is None or _is_one(x.shape[2]):
        return x
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, padded - x.shape[2])
    return jnp.pad(x, pad, constant_values=fill)


def _step_slice(
    x: jax.Array | None,
    index: tuple[jax.Array, jax.Array, jax.Array],
    sizes: tuple[int, int, int],
) -> jax.Array | None:
    """The part of a rank-4 operand that one step reads.

    ``index`` = (first batch element, first query head, first query) and ``sizes`` how
    many of each; an axis the operand broadcasts (size 1) is kept whole.
    """
    if x is None:
        return None
    starts = [0 if _is_one(n) else i for i, n in zip(index, x.shape[:3], strict=True)]
    counts = [1 if _is_one(n) else size for size, n in zip(sizes, x.shape[:3], strict=True)]
    return lax.dynamic_slice(x, (*starts, 0), (*counts, x.shape[3]))


def _batch_rows(rows: jax.Array, first: jax.Array, count: int) -> jax.Array:
    """The ``count`` batch elements from ``first`` of positions ``(B|1, n)``."""
    return rows if _is_one(rows.shape[0]) else lax.dynamic_slice_in_dim(rows, first, count, 0)


def _plan(
    batch: int, kv_heads: int, group: int, length: int, keys: int, pairs: int = STEP_PAIRS
) -> tuple[int, int, int]:
    """``(nb, nk, chunk)``: batch elements, kv heads and queries per step (``pairs``).

    With a symbolic length (``jax.export``) sizes cannot be compared: one head group and
    ``SYMBOLIC_CHUNK`` queries per step. Batch and kv heads may be symbolic in either plan
    (the sparse tilings hand their tiles in as heads).
    """
    if not all(isinstance(size, int) for size in (group, length, keys)):
        return 1, 1, SYMBOLIC_CHUNK
    if group * length * keys > pairs // 8:
        nb, nk, chunk = 1, 1, unit_chunk(group, keys, pairs)
    else:
        nb, nk, chunk = batch, kv_heads, query_chunk(keys, pairs)
    return nb, nk, min(chunk, length)


class _Steps:
    """The fast path's walk: ``units`` head groups (``nb`` batch elements, ``nk`` kv heads
    and their ``nk·G`` query heads) times ``steps`` chunks of ``chunk`` queries, each step
    against every key (see ``STEP_PAIRS``), and what a step reads of every operand.

    Positions given as arrays are sliced per step (per batch element when ``(B, L)``); an
    offset becomes ``iota`` arithmetic. The forward and the backward pass walk the same
    steps, so what the backward recomputes is what the forward computed.
    """

    def __init__(
        self, q: jax.Array, k: jax.Array, is_causal: bool, scale: float, pairs: int
    ) -> None:
        self.batch, self.heads, self.length, self.d_head = q.shape
        self.kv_heads, self.keys = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.acc = _accumulation_dtype(q.dtype)
        self.nb, self.nk, self.chunk = _plan(
            self.batch, self.kv_heads, self.group, self.length, self.keys, pairs
        )
        self.steps = -(-self.length // self.chunk)
        self.padded = self.steps * self.chunk
        self.units = (self.batch // self.nb) * (self.kv_heads // self.nk)
        self.is_causal, self.scale = is_causal, scale

    def pad(self, x: jax.Array | None, fill) -> jax.Array | None:
        """Pad the query axis (2) of a rank-4 operand (or ``(B|1, L)`` rows: axis 1)."""
        if x is None:
            return None
        if x.ndim == 2:
            return jnp.pad(x, ((0, 0), (0, self.padded - self.length)))
        return _pad_queries(x, self.padded, fill)

    def where(self, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(first batch element, first kv head, first query)`` of step ``index``."""
        unit, start = index // self.steps, index % self.steps * self.chunk
        per_batch = self.kv_heads // self.nk
        return unit // per_batch * self.nb, unit % per_batch * self.nk, start

    def inputs(
        self,
        index: jax.Array,
        q: jax.Array,
        mask: jax.Array | None,
        bias: jax.Array | None,
        slopes: jax.Array | None,
        query_positions: Positions,
        key_rows: jax.Array,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
        """Step ``index``'s queries ``(nb, nk·G, chunk, D)``, keep-mask, bias (with ALiBi)
        and the distances ``|p - s|`` ALiBi's gradient needs (``None`` without ALiBi).
        ``query_positions``: a start offset, or rows ``(B|1, padded)``."""
        b, kv, start = self.where(index)
        rows = (b, kv * self.group, start)
        sizes = (self.nb, self.nk * self.group, self.chunk)
        if _is_start(query_positions):
            offset = query_positions
            first = start if offset is None or _is_zero(offset) else offset + start
            step_rows = _start_rows(first, self.chunk)
        else:
            batch_rows = _batch_rows(query_positions, b, self.nb)
            step_rows = lax.dynamic_slice_in_dim(batch_rows, start, self.chunk, 1)
        step_keys = _batch_rows(key_rows, b, self.nb)
        keep = _step_slice(mask, rows, sizes)
        if self.is_causal:
            keep = combine_masks(keep, _causal(step_rows, step_keys))
        step_slopes, distance = None, None
        if slopes is not None:
            step_slopes = lax.dynamic_slice_in_dim(slopes, kv * self.group, self.nk * self.group)
            distance = jnp.abs(step_rows[:, None, :, None] - step_keys[:, None, None, :])
        step_bias = _with_alibi(
            _step_slice(bias, rows, sizes), step_slopes, step_rows, step_keys, self.acc
        )
        return self.queries(index, q), keep, step_bias, distance

    def queries(self, index: jax.Array, x: jax.Array) -> jax.Array:
        """Step ``index``'s part ``(nb, nk·G, chunk, ...)`` of a padded ``(B, H, L', ...)``
        array (queries, outputs, their cotangents, log-sum-exps)."""
        b, kv, start = self.where(index)
        corner = (b, kv * self.group, start, *(0,) * (x.ndim - 3))
        return lax.dynamic_slice(
            x, corner, (self.nb, self.nk * self.group, self.chunk, *x.shape[3:])
        )

    def kv(self, index: jax.Array, x: jax.Array) -> jax.Array:
        """Step ``index``'s keys or values ``(nb, nk, S, D)``."""
        b, kv, _ = self.where(index)
        return lax.dynamic_slice(x, (b, kv, 0, 0), (self.nb, self.nk, self.keys, x.shape[3]))

    def merge(self, per_step: jax.Array) -> jax.Array:
        """``(units·steps, nb, nk·G, chunk, X) -> (B, H, L, X)``."""
        # -> (B/nb, K/nk, steps, nb, nk·G, chunk, X) -> (B/nb, nb, K/nk, nk·G, steps, chunk, X)
        width = per_step.shape[-1]
        out = per_step.reshape(
            self.batch // self.nb,
            self.kv_heads // self.nk,
            self.steps,
            self.nb,
            self.nk * self.group,
            self.chunk,
            width,
        )
        out = out.transpose(0, 3, 1, 4, 2, 5, 6)
        return out.reshape(self.batch, self.heads, self.padded, width)[:, :, : self.length]


def _output_and_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keep: jax.Array | None,
    bias: jax.Array | None,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Attention output ``(B, H, L, D)`` in float32 or wider, and the log-sum-exp of each
    row's visible scores ``(B, H, L, 1)``, which is all the backward pass keeps.

    Normalizing the ``(L, D)`` output instead of the ``(L, S)`` weights saves a pass over
    the scores. The row maximum itself contributes ``exp(0) = 1``, so a row's sum is >= 1
    when it sees a key and exactly 0 when it sees none: ``maximum(sum, 1)`` gives those
    rows 0 (and their log-sum-exp is the row maximum, the float minimum).
    """
    scores = _scores(q, k, bias, scale)
    if keep is not None:
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    top = scores.max(axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - top)
    if keep is not None:
        unnormalized = jnp.where(keep, unnormalized, 0.0)
    total = jnp.maximum(unnormalized.sum(axis=-1, keepdims=True), 1.0)
    out = _apply_weights(unnormalized, v) / total
    return out, top + jnp.log(total)


def _step_gradients(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keep: jax.Array | None,
    bias: jax.Array | None,
    distance: jax.Array | None,
    scale: float,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    d_lse: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One step of FlashAttention-2's backward: ``(dq, dkᵀ, dvᵀ, d_slopes)`` for queries
    ``(b, G·k, l, D)`` against keys ``(b, k, S, D)``, from the step's saved output and
    log-sum-exp. ``dkᵀ``/``dvᵀ`` ``(b, k, D, S)`` are summed over the G query heads of
    each kv head; ``d_slopes`` ``(G·k,)`` is the ALiBi slopes' gradient (``None`` without
    ALiBi). ``d_lse`` ``(b, G·k, l, 1)``: the log-sum-exp's cotangent when it is an output
    too (``attention_with_lse``); ``d lse / d score = P`` adds ``P·d_lse`` to dS."""
    batch, heads, length, d_head = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    acc = out.dtype
    scores = _scores(q, k, bias, scale)
    if keep is not None:  # as in the forward: a blind row's scores and lse are both min
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    weights = jnp.exp(scores - lse)
    if keep is not None:
        weights = jnp.where(keep, weights, 0.0)
    grouped = (batch, kv_heads, heads // kv_heads, length)
    d_out = d_out.astype(acc)
    # dV and dK come out transposed, (B, K, D, S): the contraction then runs over the
    # major axis of the (L, S) operand, which XLA's CPU dot takes as it is, where the
    # (S, D) form made it copy a transposed (S, L) operand first
    # (B, K, G, L, D) x (B, K, G, L, S) -> (B, K, D, S): the G heads of a kv head sum
    d_v = jnp.einsum(
        "bkgld,bkgls->bkds", d_out.reshape(*grouped, -1), weights.reshape(*grouped, keys)
    )
    d_weights = _scores(d_out, v, None, 1.0)  # dO Vᵀ, (B, H, L, S)
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)
    if d_lse is not None:
        delta = delta - d_lse.astype(acc)
    d_scores = weights * (d_weights - delta)
    d_q = _apply_weights(d_scores, k) * scale
    scaled_q = (q.astype(acc) * scale).reshape(*grouped, d_head)
    d_k = jnp.einsum("bkgld,bkgls->bkds", scaled_q, d_scores.reshape(*grouped, keys))
    d_slopes = None
    if distance is not None:
        # the bias is -m_h·|p - s|: d m_h = -sum over the step's rows of dS·|p - s|
        d_slopes = -jnp.einsum(
            "bhls,bhls->h", d_scores, jnp.broadcast_to(distance, d_scores.shape).astype(acc)
        )
    return d_q, d_k, d_v, d_slopes


def _walk(plan: _Steps, mask, bias, query_positions):
    """The operands ``plan``'s steps read: mask, bias and positions padded like the queries."""
    if not _is_start(query_positions):
        query_positions = plan.pad(query_positions, 0)
    return plan.pad(mask, False), plan.pad(bias, 0), query_positions


def _chunked_forward(
    q, k, v, slopes, mask, bias, query_positions, key_rows, *, is_causal: bool, scale: float
) -> tuple[jax.Array, jax.Array]:
    """``(out (B, H, L, D), lse (B, H, L, 1))`` in float32 or wider, step by step."""
    plan = _Steps(q, k, is_causal, scale, STEP_PAIRS)
    step_mask, step_bias, step_positions = _walk(plan, mask, bias, query_positions)
    padded_q = plan.pad(q, 0)

    def step(index):
        qs, keep, bias_s, _ = plan.inputs(
            index, padded_q, step_mask, step_bias, slopes, step_positions, key_rows
        )
        ks, vs = plan.kv(index, k), plan.kv(index, v)
        return _output_and_lse(qs, ks, vs, keep, bias_s, scale)

    count = plan.units * plan.steps
    if isinstance(count, int) and count == 1:
        # one step (a decoding step, small problems): no loop, whose state would copy
        # the keys and values in
        out, lse = (x[None] for x in step(jnp.asarray(0)))
    else:
        out, lse = lax.map(step, jnp.arange(count))
    return plan.merge(out), plan.merge(lse)


def _chunked_backward(
    operands: tuple,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    d_lse: jax.Array | None,
    *,
    is_causal: bool,
    scale: float,
) -> tuple:
    """FlashAttention-2's backward over the forward's steps: the cotangents of
    ``operands = (q, k, v, slopes, mask, query_positions, key_rows)`` (``None`` for the
    mask and positions) from the saved ``out`` and ``lse`` (no caller's bias)."""
    q, k, v, slopes, mask, query_positions, key_rows = operands
    plan = _Steps(q, k, is_causal, scale, BACKWARD_PAIRS)
    step_mask, step_bias, step_positions = _walk(plan, mask, None, query_positions)
    if d_lse is None:
        d_lse = jnp.zeros_like(lse)
    padded = [plan.pad(x, 0) for x in (q, out, lse, d_out, d_lse)]

    def step(carry, index):
        d_k, d_v, d_slopes = carry
        qs, keep, bias_s, distance = plan.inputs(
            index, padded[0], step_mask, step_bias, slopes, step_positions, key_rows
        )
        outs, lses, d_outs, d_lses = (plan.queries(index, x) for x in padded[1:])
        ks, vs = plan.kv(index, k), plan.kv(index, v)
        d_qs, d_ks, d_vs, d_ss = _step_gradients(
            qs, ks, vs, keep, bias_s, distance, scale, outs, lses, d_outs, d_lses
        )
        b, kv, _ = plan.where(index)
        d_k = _add_at(d_k, d_ks, (b, kv))
        d_v = _add_at(d_v, d_vs, (b, kv))
        if d_ss is not None:
            d_slopes = _add_at(d_slopes, d_ss, (kv * plan.group,))
        return (d_k, d_v, d_slopes), d_qs

    zeros = (  # dKᵀ, dVᵀ: (B, K, D, S)
        jnp.zeros(k.swapaxes(2, 3).shape, plan.acc),
        jnp.zeros(v.swapaxes(2, 3).shape, plan.acc),
        None if slopes is None else jnp.zeros(slopes.shape, plan.acc),
    )
    zeros = _varying_like(zeros, q, k, v, d_out, d_lse)
    (d_k, d_v, d_slopes), d_q = lax.scan(step, zeros, jnp.arange(plan.units * plan.steps))
    d_q = plan.merge(d_q)
    d_k, d_v = d_k.swapaxes(2, 3), d_v.swapaxes(2, 3)
    d_slopes = None if slopes is None else _sum_varying(d_slopes, slopes).astype(slopes.dtype)
    nothing = (None, None, None)  # the mask and positions: not differentiable
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_slopes, *nothing)


def _operands(q, k, alibi_slopes, query_positions, key_positions) -> tuple:
    """The slopes and positions as the steps read them: slopes in the accumulation dtype,
    array positions as rows, key positions always as rows."""
    slopes = (
        None if alibi_slopes is None else jnp.asarray(alibi_slopes, _accumulation_dtype(q.dtype))
    )
    if not _is_start(query_positions):
        query_positions = _position_rows(query_positions, q.shape[2])
    return slopes, query_positions, _position_rows(key_positions, k.shape[2])


def _chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None,
    alibi_slopes: jax.Array | None,
    is_causal: bool,
    scale: float,
    query_positions: Positions,
    key_positions: Positions,
) -> tuple[jax.Array, jax.Array]:
    """Output ``(B, H, L, D)`` and each query's log-sum-exp ``(B, H, L, 1)`` in float32 or
    wider, computed step by step, no weights kept (see ``STEP_PAIRS`` and ``_Steps``).
    A query that sees no key has output 0 and log-sum-exp the dtype's minimum.

    Differentiated, it keeps only q, k, v, the output and each query's log-sum-exp, and
    its backward (``jax.custom_vjp``) walks the same steps again, recomputing each step's
    scores (FlashAttention-2's backward; Rabe & Staats 2021 for the chunked form): memory
    O(L·D + one step's scores) instead of every step's scores. With a ``bias`` of the
    caller's (an ``(L, S)`` operand already), autodiff of the steps serves instead.
    """
    batch = q.shape[0]
    acc = _accumulation_dtype(q.dtype)
    if isinstance(batch, int) and batch == 0:
        return jnp.zeros((*q.shape[:3], v.shape[-1]), acc), jnp.zeros((*q.shape[:3], 1), acc)
    mask, bias = _as_rank4(mask), _as_rank4(bias)
    slopes, query_positions, key_rows = _operands(
        q, k, alibi_slopes, query_positions, key_positions
    )
    options = {"is_causal": is_causal, "scale": scale}
    if bias is not None:
        return _chunked_forward(q, k, v, slopes, mask, bias, query_positions, key_rows, **options)

    @jax.custom_vjp
    def attend(q, k, v, slopes, mask, query_positions, key_rows):
        return _chunked_forward(q, k, v, slopes, mask, None, query_positions, key_rows, **options)

    def attend_forward(q, k, v, slopes, mask, query_positions, key_rows):
        operands = (q, k, v, slopes, mask, query_positions, key_rows)
        out, lse = _chunked_forward(
            q, k, v, slopes, mask, None, query_positions, key_rows, **options
        )
        return (out, lse), (operands, out, lse)

    def attend_backward(saved, cotangents):
        operands, out, lse = saved
        return _chunked_backward(operands, out, lse, *cotangents, **options)

    attend.defvjp(attend_forward, attend_backward)
    return attend(q, k, v, slopes, mask, query_positions, key_rows)


def _varying(x: jax.Array) -> set[str]:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (none outside)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return set(getattr(manual, "varying", ()))


def _sum_varying(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the manual axes it varies over and its primal does not:
    the transpose of using an invariant operand (the ALiBi slopes) on every device."""
    extra = _varying(cotangent) - _varying(primal)
    return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying_like(zeros, *operands: jax.Array):
    """``zeros`` typed as varying over the manual mesh axes the ``operands`` vary over
    (inside ``shard_map``, e.g. ring attention), so a scan that adds gradients into them
    keeps one carry type; unchanged outside ``shard_map``."""
    axes = set().union(*(_varying(x) for x in operands))
    if not axes:
        return zeros
    return jax.tree.map(lambda z: lax.pcast(z, tuple(sorted(axes)), to="varying"), zeros)


def _add_at(x: jax.Array, part: jax.Array, corner: tuple) -> jax.Array:
    """``x`` with ``part`` added to its block at ``corner`` (in place inside a scan)."""
    corner = (*corner, *(0,) * (x.ndim - len(corner)))
    return lax.dynamic_update_slice(x, lax.dynamic_slice(x, corner, part.shape) + part, corner)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    need_weights: bool = True,
    query_positions: Positions = None,
    key_positions: Positions = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention.

    Args:
      q: ``(B, H, L, D)``.
      k, v: ``(B, K, S, D)`` with ``H % K == 0``.
      mask: boolean keep-mask broadcastable to ``(B, H, L, S)``, or ``None``.
      bias: additive score bias broadcastable to ``(B, H, L, S)``, or ``None``.
      alibi_slopes: ``(H,)`` ALiBi slopes m_h, adding ``-m_h * abs(p_i - s_j)`` to the
        scores, or ``None``.
      is_causal: AND the causal pattern ``s_j <= p_i`` into ``mask`` (static).
      scale: score scale, default ``1 / sqrt(D)``.
      dropout_rate: dropout on the attention weights; applied only with ``dropout_rng``.
      dropout_rng: PRNG key for dropout, ``None`` for deterministic attention.
      need_weights: ``True`` returns the ``(B, H, L, S)`` weights (before dropout);
        ``False`` runs the fast path in steps (``STEP_PAIRS``) and returns ``None``
        (static).
      query_positions: the queries' positions p: ``None`` for ``0..L-1``, a start offset
        (an int, or an integer scalar that may be traced) for ``start..start+L-1``, or
        integer positions ``(L,)`` or ``(B, L)``.
      key_positions: the keys' positions s, the same way for the S keys.

    Returns:
      ``(out, weights)``: out ``(B, H, L, D)`` in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dropping = dropout_rate > 0.0 and dropout_rng is not None
    if need_weights or dropping:
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
        dropped = _dropout(weights, dropout_rate, dropout_rng) if dropping else weights
        out = _apply_weights(dropped, v).astype(q.dtype)
        return out, weights.astype(q.dtype) if need_weights else None
    check_positions("query_positions", query_positions, q.shape[2], q.shape[0])
    check_positions("key_positions", key_positions, k.shape[2], q.shape[0])
    out, _ = _chunked_attention(
        q, k, v, mask, bias, alibi_slopes, is_causal, scale, query_positions, key_positions
    )
    return out.astype(q.dtype), None


def attention_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    alibi_slopes: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_positions: Positions = None,
    key_positions: Positions = None,
) -> tuple[jax.Array, jax.Array]:
    """The fast path's output and each query's log-sum-exp of its visible scores, both
    differentiable: the pieces that attention over key blocks merges (ring attention,
    ``attentions_jax.parallel``).

    Args: as ``dot_product_attention`` (no mask, bias or dropout).

    Returns:
      ``(out, lse)``: out ``(B, H, L, D)`` and lse ``(B, H, L, 1)`` in float32 or wider;
      a query that sees no key has out 0 and lse the dtype's minimum, so it weighs nothing
      in a merge with any block it sees.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    check_positions("query_positions", query_positions, q.shape[2], q.shape[0])
    check_positions("key_positions", key_positions, k.shape[2], q.shape[0])
    return _chunked_attention(
        q, k, v, None, None, alibi_slopes, is_causal, scale, query_positions, key_positions
    )


def attention_gradients(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    *,
    alibi_slopes: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_positions: Positions = None,
    key_positions: Positions = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` of attention from q to the keys k, v (one block of a longer key
    sequence), given the output ``out`` and log-sum-exp ``lse`` ``(B, H, L, 1)`` of the
    queries' attention to **all** their keys and the output's cotangent ``d_out``:
    FlashAttention-2's backward, whose per-block terms sum to the whole gradient (ring
    attention's backward, ``attentions_jax.parallel``). The ALiBi slopes get none."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    slopes, query_positions, key_rows = _operands(
        q, k, alibi_slopes, query_positions, key_positions
    )
    operands = (q, k, v, None, None, query_positions, key_rows)
    if slopes is not None:  # the bias needs the slopes; their cotangent is dropped
        operands = (q, k, v, lax.stop_gradient(slopes), None, query_positions, key_rows)
    d_q, d_k, d_v, *_ = _chunked_backward(
        operands, out, lse, d_out, None, is_causal=is_causal, scale=scale
    )
    return d_q, d_k, d_v

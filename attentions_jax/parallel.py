"""Sequence parallelism: a sequence sharded over the devices of a mesh axis (SPEC §13).

Inside ``jax.shard_map`` each device holds ``Ll = L / N`` positions of the sequence; a
layer called with ``sequence_parallel="axis"`` (or ``SequenceParallel("axis", layout)``)
projects its shard and attends to the whole sequence. What travels depends on the
mechanism (its ``attend_sharded``):

* dense family (vanilla, multi-head, grouped, ALiBi, rotary): **ring attention**, N
  steps; at step s the local queries attend to the key/value block of device
  ``(r - s) mod N``, each step's output and log-sum-exp (``functional.attention_with_lse``)
  merged in float32 or wider, and the block passed on with ``lax.ppermute``. No device
  holds more than its own block and the one in flight; the steps are the chunked fast
  path, so memory per device is O(Ll·D) plus one step's scores. Grouped attention passes
  its K kv heads, not H. Gradients flow through the ring (``ppermute``'s transpose is the
  reverse ring) and through the core's custom backward.
* local (half-window h): each chunk receives the last h keys and values of the chunk
  before it and, when not causal, the first h of the chunk after it (``with_halos``),
  then attends with the mechanism's own tiled kernel: O(h·H·D) values per device,
  whatever L. The chunk must hold the half-window (``h <= c``).
* block (block size b): nothing when every chunk starts on a block boundary
  (``c % b == 0``); otherwise (contiguous layout only, ``b - 1 <= Ll``) the ``b - 1`` rows
  on either side of the shard (before only when causal), independent of L.
* dilated (rate d, ``c % d == 0``): the residue classes mod d become heads, each a
  contiguous or zigzag sequence of ``L / d`` positions, and go around the dense ring:
  O(L²/d) time, the single-device cost.
* linear: non-causal, the state ``phi(K)ᵀ[V, 1]`` ``(B, H, F, D + 1)`` summed over the
  devices (``lax.psum``); causal, every chunk's state gathered (``lax.all_gather``,
  O(N·D²), never the sequence) and the earlier chunks' sum (global order) starts the
  chunk's causal scan.

Layouts (which positions a shard holds):

* ``"contiguous"``: shard r holds ``r·Ll .. (r+1)·Ll - 1``, one chunk of ``c = Ll``;
* ``"zigzag"``: the sequence is cut into 2N chunks of ``c = Ll / 2``; shard r holds
  chunk r and chunk ``2N - 1 - r``. Causal attention then costs every device the same
  (the first chunk's queries see few keys, the last's many), as ring-flash-attn and
  MaxText do it. ``to_layout`` / ``from_layout`` reorder a whole sequence into it and
  back.

Causal attention, the patterns and ALiBi are stated on the global positions, and RoPE
rotates q and k at them, so the sharded layer computes the single-device function.
Lengths that do not split evenly (L % N, or L % 2N for zigzag) are refused with a
``ValueError``, and so are chunks too short for a mechanism's reach (above).

Shape legend: B batch, L global length, N shards, Ll = L / N local length, c chunk
length, P chunks per shard (1 contiguous, 2 zigzag), H query heads, K kv heads, X heads
of any kind, D head width, F feature width of linear attention.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .functional import attention_gradients, attention_with_lse

__all__ = [
    "LAYOUTS",
    "SequenceParallel",
    "as_sequence_parallel",
    "check_call",
    "chunk_length",
    "chunk_table",
    "from_layout",
    "ring_attention",
    "shard_positions",
    "to_layout",
    "with_halos",
]

LAYOUTS = ("contiguous", "zigzag")


class SequenceParallel(NamedTuple):
    """How a layer's input is sharded: the mesh ``axis`` and the ``layout``."""

    axis: str
    layout: str = "contiguous"


def as_sequence_parallel(spec: str | SequenceParallel) -> SequenceParallel:
    """A layer's ``sequence_parallel`` argument as a ``SequenceParallel``, validated."""
    spec = SequenceParallel(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, SequenceParallel) or not isinstance(spec.axis, str):
        raise ValueError(
            "sequence_parallel must be a mesh axis name or SequenceParallel(axis, layout), "
            f"got {spec!r}"
        )
    _check_layout(spec.layout)
    return spec


def check_call(
    layer: str,
    *,
    need_weights: bool,
    mask: object,
    context: object,
    dropping: bool,
) -> None:
    """``ValueError`` for what a sequence-parallel call does not take (before any
    communication)."""
    refused = [
        ("need_weights=True (the (L, L) weights would gather the sequence)", need_weights),
        ("a mask (positions and is_causal state the pattern)", mask is not None),
        ("context (cross-attention)", context is not None),
        ("dropout in training", dropping),
    ]
    for what, given in refused:
        if given:
            raise ValueError(f"{layer}: sequence_parallel does not take {what}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_split(length: int, shards: int, layout: str) -> None:
    """``ValueError`` unless ``length`` splits into ``shards`` equal shards (``2·shards``
    chunks for zigzag)."""
    pieces = shards * (2 if layout == "zigzag" else 1)
    if length % pieces:
        raise ValueError(
            f"a sequence of {length} positions does not split evenly into {pieces} "
            f"{'chunks (2 per shard, zigzag)' if layout == 'zigzag' else 'shards'}: "
            "unevenly split shards are refused; pad the sequence to a multiple (with "
            "is_causal, padding at the end changes no real token's output)"
        )


def shard_positions(
    rank: int | jax.Array, shards: int, local_length: int, layout: str = "contiguous"
) -> jax.Array:
    """``(Ll,)`` int32: the global positions shard ``rank`` holds (``rank`` may be traced,
    e.g. ``lax.axis_index``)."""
    _check_layout(layout)
    _check_split(local_length * shards, shards, layout)
    if layout == "contiguous":
        return rank * local_length + jnp.arange(local_length, dtype=jnp.int32)
    chunk = local_length // 2
    within = jnp.arange(chunk, dtype=jnp.int32)
    return jnp.concatenate(
        [rank * chunk + within, (2 * shards - 1 - rank) * chunk + within]
    ).astype(jnp.int32)


def _order(length: int, shards: int, layout: str) -> np.ndarray:
    """The global positions in shard order: shard 0's, then shard 1's, ..."""
    _check_layout(layout)
    _check_split(length, shards, layout)
    if layout == "contiguous":
        return np.arange(length)
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[-1 - r]]) for r in range(shards)])


def to_layout(x: jax.Array, shards: int, layout: str, axis: int = 1) -> jax.Array:
    """Reorder a whole sequence (positions along ``axis``) so that its N equal pieces are
    the shards of ``layout``: shard_map's ``P(None, "axis")`` then hands device r its
    positions. The identity for ``"contiguous"``."""
    if layout == "contiguous":
        _check_split(x.shape[axis], shards, layout)
        return x
    return jnp.take(x, jnp.asarray(_order(x.shape[axis], shards, layout)), axis=axis)


def from_layout(x: jax.Array, shards: int, layout: str, axis: int = 1) -> jax.Array:
    """The inverse of ``to_layout``: positions back in order."""
    if layout == "contiguous":
        _check_split(x.shape[axis], shards, layout)
        return x
    inverse = np.argsort(_order(x.shape[axis], shards, layout))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def chunk_table(shards: int, layout: str) -> np.ndarray:
    """``(N, P)`` int: the global index of the chunk device r holds in slot p (chunk g is
    positions ``g·c .. g·c + c - 1``; ``N·P`` chunks in all)."""
    _check_layout(layout)
    ranks = np.arange(shards)
    if layout == "contiguous":
        return ranks[:, None]
    return np.stack([ranks, 2 * shards - 1 - ranks], axis=1)


def chunk_length(local_length: int, layout: str) -> tuple[int, str]:
    """``(c, name)``: the chunk length of a shard of ``local_length`` rows, and how error
    messages name it (``"L/N"`` contiguous, ``"L/2N"`` zigzag)."""
    _check_layout(layout)
    if layout == "contiguous":
        return local_length, "L/N"
    return local_length // 2, "L/2N"


def with_halos(
    xs: tuple[jax.Array, ...], *, axis: str, layout: str, before: int, after: int
) -> list[tuple[tuple[jax.Array, ...], jax.Array]]:
    """Each chunk of this device's shard with its neighbours' rows, inside ``shard_map``.

    Args:
      xs: arrays ``(B, X, Ll, D)`` (keys and values), this device's shard in ``layout``.
      axis: the mesh axis the sequence is sharded over (N devices).
      layout: ``"contiguous"`` or ``"zigzag"`` (module docstring).
      before, after: how many rows of the chunk before (its last) and of the chunk after
        (its first) each chunk needs, in global chunk order; at most c.

    Returns:
      one ``(rows, keep)`` per slot (chunk r; zigzag: then chunk 2N - 1 - r): rows, the
      arrays ``(B, X, before + c + after, D)`` (the chunk's ``before`` predecessors, the
      chunk, its ``after`` successors), and keep ``(1, 1, 1, before + c + after)`` bool,
      a key-only keep-mask: ``False`` on the rows before position 0 and past L (zeros).

    The neighbours sit where the layout puts them, a static map: zigzag chunk r (slot 0)
    follows chunk r - 1 of device r - 1 and precedes chunk r + 1 of device r + 1, or for
    r = N - 1 chunk N, its own slot 1. Rows are sent by one ``lax.ppermute`` per
    (slot, side, source slot) over the pairs that need them, a partial permutation (a
    device that receives nothing gets zeros); rows a device holds itself are taken with
    ``jnp.where`` on ``lax.axis_index``. Per device that is ``P·(before + after)`` rows of
    each array, independent of L.
    """
    shards, rank = lax.axis_size(axis), lax.axis_index(axis)
    table = chunk_table(shards, layout)
    slots = table.shape[1]
    chunk = xs[0].shape[2] // slots
    if max(before, after) > chunk:
        raise ValueError(
            f"a chunk of {chunk} rows cannot lend {max(before, after)} rows: the halo may "
            "reach one neighbouring chunk only"
        )
    chunks = [tuple(x[:, :, p * chunk : (p + 1) * chunk] for x in xs) for p in range(slots)]
    place = {int(g): (r, p) for (r, p), g in np.ndenumerate(table)}

    def on(ranks: list[int]) -> jax.Array:
        """``()`` bool: this device is one of ``ranks``."""
        return jnp.asarray(np.isin(np.arange(shards), ranks))[rank]

    def neighbour(slot: int, offset: int, width: int) -> tuple[jax.Array, ...]:
        """``(B, X, width, D)`` each: the rows of chunk ``g + offset`` that touch chunk g
        (this device's ``slot``): its last rows when it comes before g, its first after."""
        edge = slice(chunk - width, chunk) if offset < 0 else slice(0, width)
        sources = [place.get(int(table[r, slot]) + offset) for r in range(shards)]
        found = None
        for source_slot in range(slots):
            piece = tuple(x[:, :, edge] for x in chunks[source_slot])
            pairs = [(s[0], r) for r, s in enumerate(sources) if s and s[1] == source_slot]
            sent = [(source, r) for source, r in pairs if source != r]
            kept = [r for source, r in pairs if source == r]
            if sent:
                received = lax.ppermute(piece, axis, sent)
                # a device that receives nothing gets zeros: hidden by keep, or filled below
                found = (
                    received
                    if found is None
                    else _select(on([r for _, r in sent]), received, found)
                )
            if kept:
                base = tuple(jnp.zeros_like(x) for x in piece) if found is None else found
                found = _select(on(kept), piece, base)
        if found is None:  # no chunk has that neighbour (N = 1)
            found = tuple(jnp.zeros_like(x[:, :, edge]) for x in chunks[slot])
        return found

    length = table.size * chunk
    width = before + chunk + after
    out = []
    for slot in range(slots):
        parts = [chunks[slot]]
        if before:
            parts.insert(0, neighbour(slot, -1, before))
        if after:
            parts.append(neighbour(slot, 1, after))
        rows = tuple(jnp.concatenate(arrays, axis=2) for arrays in zip(*parts, strict=True))
        start = jnp.asarray(table[:, slot])[rank] * chunk - before
        positions = start + jnp.arange(width)
        keep = (positions >= 0) & (positions < length)
        out.append((rows, keep[None, None, None, :]))
    return out


def _select(
    chosen: jax.Array, new: tuple[jax.Array, ...], old: tuple[jax.Array, ...]
) -> tuple[jax.Array, ...]:
    """``new`` where ``chosen`` (a ``()`` bool), else ``old``, array by array."""
    return tuple(jnp.where(chosen, a, b) for a, b in zip(new, old, strict=True))


def _merge(
    out: jax.Array, lse: jax.Array, block_out: jax.Array, block_lse: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Two partial attentions over disjoint key sets as one: weights ``exp(lse_i - m)``.

    A query blind to both keeps output 0: both lse are the minimum, both weights 1, and
    both outputs 0."""
    top = jnp.maximum(lse, block_lse)
    old, new = jnp.exp(lse - top), jnp.exp(block_lse - top)
    total = old + new
    return (out * old + block_out * new) / total, top + jnp.log(total)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis: str,
    layout: str = "contiguous",
    is_causal: bool = False,
    scale: float | None = None,
    alibi_slopes: jax.Array | None = None,
    query_positions: jax.Array | None = None,
) -> jax.Array:
    """Attention of the local queries to the whole sharded sequence, inside ``shard_map``.

    Args:
      q: ``(B, H, Ll, D)``, this device's queries; k, v: ``(B, K, Ll, D)``, its keys and
        values (``H % K == 0``; the K kv heads go around the ring).
      axis: the mesh axis the sequence is sharded over (N devices).
      layout: ``"contiguous"`` or ``"zigzag"`` (module docstring).
      is_causal, scale, alibi_slopes: as ``functional.dot_product_attention``, on the
        global positions (the slopes are constants here: no gradient).
      query_positions: ``(Ll,)`` this shard's positions, if already computed.

    Returns:
      ``(B, H, Ll, D)`` in q's dtype: the single-device fast path's rows of this shard.

    Differentiated, it keeps q, k, v, the output and the log-sum-exp (O(Ll·D) per
    device), and its backward goes around the ring again: each key/value block travels
    with the gradient accumulated for it so far and arrives home with its whole dK, dV.
    """
    if query_positions is None:
        query_positions = shard_positions(
            lax.axis_index(axis), lax.axis_size(axis), q.shape[2], layout
        )
    if alibi_slopes is not None:
        alibi_slopes = np.asarray(alibi_slopes)
    options = (
        axis,
        layout,
        is_causal,
        scale,
        None if alibi_slopes is None else tuple(alibi_slopes),
    )
    return _ring(options, q, k, v, query_positions).astype(q.dtype)


def _ring_options(options: tuple) -> dict:
    """The core's keyword arguments of ``_ring``'s static options."""
    _, _, is_causal, scale, slopes = options
    return {
        "is_causal": is_causal,
        "scale": scale,
        "alibi_slopes": None if slopes is None else np.asarray(slopes),
    }


def _block_positions(options: tuple, source: jax.Array, local: int) -> jax.Array:
    axis, layout = options[:2]
    return shard_positions(source, lax.axis_size(axis), local, layout)


def _ring_forward(options, q, k, v, positions):
    """``(out, lse)`` of the local queries against every block, merged as they arrive.

    A ``fori_loop`` over the steps, so every step reuses one step's buffers."""
    axis = options[0]
    shards, rank = lax.axis_size(axis), lax.axis_index(axis)
    ring = [(i, (i + 1) % shards) for i in range(shards)]

    def attend(step, k, v):
        key_positions = _block_positions(options, (rank - step) % shards, k.shape[2])
        return attention_with_lse(
            q,
            k,
            v,
            query_positions=positions,
            key_positions=key_positions,
            **_ring_options(options),
        )

    def step(index, carry):
        k, v, out, lse = carry
        k, v = lax.ppermute((k, v), axis, ring)
        return (k, v, *_merge(out, lse, *attend(index, k, v)))

    out, lse = attend(0, k, v)
    return lax.fori_loop(1, shards, step, (k, v, out, lse))[2:]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(options, q, k, v, positions):
    return _ring_forward(options, q, k, v, positions)[0]


def _ring_fwd(options, q, k, v, positions):
    out, lse = _ring_forward(options, q, k, v, positions)
    return out, (q, k, v, positions, out, lse)


def _ring_bwd(options, saved, d_out):
    q, k, v, positions, out, lse = saved
    axis = options[0]
    shards, rank = lax.axis_size(axis), lax.axis_index(axis)
    ring = [(i, (i + 1) % shards) for i in range(shards)]

    def step(index, carry):
        # the block's gradient so far travels with it; after the N-th hop every block
        # (and its whole dK, dV) is home again
        k, v, d_q, d_k, d_v = carry
        key_positions = _block_positions(options, (rank - index) % shards, k.shape[2])
        block_q, block_k, block_v = attention_gradients(
            q,
            k,
            v,
            out,
            lse,
            d_out,
            query_positions=positions,
            key_positions=key_positions,
            **_ring_options(options),
        )
        k, v, d_k, d_v = lax.ppermute((k, v, d_k + block_k, d_v + block_v), axis, ring)
        return k, v, d_q + block_q, d_k, d_v

    zeros = tuple(jnp.zeros(x.shape, out.dtype) for x in (q, k, v))
    zeros = tuple(lax.pcast(z, (axis,), to="varying") for z in zeros)
    _, _, d_q, d_k, d_v = lax.fori_loop(0, shards, step, (k, v, *zeros))
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)

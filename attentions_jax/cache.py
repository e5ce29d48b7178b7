"""Decoding with a cache (docs/semantics.md "Decoding with a cache", issue 13).

A cache is a few preallocated buffers and one count per sequence (as gpt-fast's
``KVCache``); ``lengths`` ``(B,)`` int32 counts the real tokens a sequence has cached,
which is also the position of its next token. Three kinds, NamedTuples (pytrees: they
pass through ``jax.jit`` and ``lax.scan``) with the same fields, shapes and dtypes as in
``attentions_torch.cache``:

* ``KVCache(keys, values, lengths)``: keys (after RoPE) and values ``(B, K, S_max, D)``,
  K kv heads (GQA keeps K/H of the memory), slot = position. The dense family, and
  dilated attention (every residue class is needed later; a one-token step reads only
  its own, ``S_max / r`` slots).
* ``WindowCache(keys, values, lengths, max_length)``: a ring buffer of the last C keys,
  slot = position mod C, whose memory does not grow with the stream: local attention
  (``C = max(1, window_size // 2)``: a query sees ``window_size // 2`` keys before it)
  and block attention (``C = block_size``: the current block). ``max_length`` ``()``
  int32 is the limit (``NO_LIMIT`` when made with ``max_length=None``).
* ``LinearCache(kv, k_sum, lengths, max_length)``: linear attention's recurrent state,
  ``kv`` ``(B, H, D, D)`` = sum of ``phi(k) vᵀ`` and ``k_sum`` ``(B, H, D)`` = sum of
  ``phi(k)``, in float32 or wider (``attentions_jax.linear``).

A mechanism says how it keeps and reads keys with a ``CacheRule`` (``layer.cache_rule()``).
A decoding call (``decode``) takes T >= 1 new tokens per sequence (a prompt, or one token)
and a mask ``(B, T)`` of the real ones; positions count real tokens only, so each
sequence of a batch with prompts of different lengths gets exactly what decoding it alone
gives. Its steps, the same in ``attentions_torch.cache``:

1. positions ``lengths[b] + cumsum(mask[b]) - 1`` of the new tokens;
2. the room check: a real token at a position >= max_length is an error (below);
3. project q, k, v and split heads; RoPE at the positions;
4. the keys to attend to: slot = position: write the new keys at their slots, then all
   slots (a dilated one-token step: its residue class); a ring: the ring as it was (each
   slot's position follows from ``lengths``) and the new keys, then write the last C;
5. attend from the T queries with the dense core: causal on positions (a slot after a
   query's position is hidden, so unwritten slots never count), the mechanism's pattern
   and ALiBi on positions, padded tokens hidden;
6. merge heads, project out; padded tokens' outputs are exactly zero.

A dense step attends over all S_max slots (unwritten ones hidden), so size the cache to
the stream. ``lengths`` are data, not static: a jitted ``decode`` compiles once per
(B, T) and serves every position. Jit it with the cache donated
(``jax.jit(step, donate_argnums=...)``, as ``lax.scan`` does with its carry) so XLA writes
the new keys in place instead of copying the cache every step.

Overflow: when ``lengths`` are concrete (an eager ``apply``), a call that would leave a
sequence with more than max_length tokens raises ``ValueError``. Under ``jax.jit`` or
``lax.scan`` the values are traced and cannot be checked: the call goes on, a real token
at a position >= max_length is not written and its output is NaN, and ``lengths`` still
counts it, so every later token of that sequence is NaN too: an overflow shows, never
silent garbage. The other sequences are unaffected.

Shape legend: B batch, T new tokens, S_max cache slots, C ring slots, H query heads,
K kv heads, D head width, E model width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._validation import (
    NO_LIMIT,
    validate_cache,
    validate_cache_room,
    validate_cache_size,
    validate_context,
    validate_decode_input,
    validate_decode_mask,
)
from .functional import dot_product_attention, merge_heads

if TYPE_CHECKING:
    from .base import Mechanism

__all__ = [
    "NO_LIMIT",
    "Cache",
    "CacheRule",
    "KVCache",
    "LinearCache",
    "WindowCache",
    "decode",
    "init_cache",
]


class KVCache(NamedTuple):
    """The keys and values a layer has seen, slot = position (dense family, dilated).

    keys, values: ``(B, K, S_max, D)`` in the cache dtype, keys after RoPE; lengths:
    ``(B,)`` int32, the real tokens cached per sequence (the position of its next token).
    The same fields, shapes and dtypes as ``attentions_torch.KVCache``.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array


class WindowCache(NamedTuple):
    """The last C keys and values of each sequence, slot = position mod C (local, block).

    keys, values: ``(B, K, C, D)``, keys after RoPE; lengths: ``(B,)`` int32 as in
    ``KVCache``; max_length: ``()`` int32, the most tokens a sequence may hold
    (``NO_LIMIT`` = 2**31 - 1 for ``max_length=None``). Memory does not grow with the
    stream. The same fields, shapes and dtypes as ``attentions_torch.WindowCache``.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    max_length: jax.Array


class LinearCache(NamedTuple):
    """Linear attention's recurrent state after ``lengths`` tokens.

    kv: ``(B, H, D, D)`` sum of ``phi(k_j) v_jᵀ``; k_sum: ``(B, H, D)`` sum of ``phi(k_j)``
    (float32 or wider); lengths, max_length: as in ``WindowCache``. The same fields,
    shapes and dtypes as ``attentions_torch.LinearCache``.
    """

    kv: jax.Array
    k_sum: jax.Array
    lengths: jax.Array
    max_length: jax.Array


Cache = KVCache | WindowCache | LinearCache
"""Any decoding cache (``decode``'s first argument and first result)."""


@dataclass(frozen=True)
class CacheRule:
    """How a mechanism keeps and reads its keys when decoding (``layer.cache_rule()``).

    ring: ``None``: slot = position, S_max slots; C: a ring of the last C keys.
    stride: a one-token step reads every ``stride``-th slot, its residue class (dilated).
    pattern: ``keep(query_positions, key_positions)`` beyond causality, broadcasting, or
      ``None`` (dense).
    """

    ring: int | None = None
    stride: int = 1
    pattern: Callable[[jax.Array, jax.Array], jax.Array] | None = None


class NewTokens(NamedTuple):
    """A decoding call's new tokens: which are real ``(B, T)``, their positions ``(B, T)``
    int32, which get written (real and before the limit), and q ``(B, H, T, D)``, k, v
    ``(B, K, T, D)`` after RoPE."""

    real: jax.Array
    positions: jax.Array
    writable: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array


def init_cache(
    layer: Mechanism, batch: int, max_length: int | None, *, dtype: jnp.dtype | None = None
) -> KVCache | WindowCache:
    """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (``None``: no
    limit, ring caches only). ``dtype`` defaults to the parameters' (``layer`` is bound)."""
    rule = layer.cache_rule()
    validate_cache_size(batch, max_length, fixed_size=rule.ring is not None)
    dtype = layer.param_dtype() if dtype is None else dtype
    slots = max_length if rule.ring is None else rule.ring
    shape = (batch, layer.head_counts()[1], slots, layer.d_head)
    buffers = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
    if rule.ring is None:
        return KVCache(*buffers)
    return WindowCache(*buffers, limit_array(max_length))


def limit_array(max_length: int | None) -> jax.Array:
    """``max_length`` as a ``()`` int32 array, ``NO_LIMIT`` for ``None``."""
    return jnp.asarray(NO_LIMIT if max_length is None else max_length, jnp.int32)


def check_cache(layer: Mechanism, cache: tuple) -> None:
    """``ValueError`` unless ``cache`` is one ``init_cache`` of this layer makes."""
    rule = layer.cache_rule()
    kind = "KVCache" if rule.ring is None else "WindowCache"
    slots = "S_max" if rule.ring is None else rule.ring
    heads = ("B", layer.head_counts()[1], slots, layer.d_head)
    expected = {"keys": heads, "values": heads, "lengths": ("B",)}
    if rule.ring is not None:
        expected["max_length"] = ()
    validate_cache(type(cache).__name__, field_shapes(cache), kind, expected)


def field_shapes(cache: tuple) -> dict[str, tuple[int, ...]] | None:
    """The shapes of a NamedTuple cache's fields, ``None`` for anything else."""
    fields = getattr(cache, "_fields", None)
    if fields is None:
        return None
    return {name: tuple(jnp.shape(getattr(cache, name))) for name in fields}


def _positions(lengths: jax.Array, real: jax.Array) -> jax.Array:
    """``(B, T)`` int32 positions of the new tokens: real tokens count, padded ones do not
    (a padded token gets the position of the real token before it, never used)."""
    return lengths[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1


def _check_room(lengths: jax.Array, real: jax.Array, limit: int | jax.Array) -> None:
    """``ValueError`` if a sequence would pass ``limit`` tokens; skipped when the lengths
    are traced (``jax.jit``, ``lax.scan``; see the module docstring)."""
    try:
        after, limit = np.asarray(lengths + real.sum(1)), int(np.asarray(limit))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    validate_cache_room(after.tolist(), limit)


def new_tokens(
    layer: Mechanism,
    x: jax.Array,
    mask: jax.Array | None,
    lengths: jax.Array,
    limit: int | jax.Array,
) -> NewTokens:
    """Steps 1-3 of a decoding call (validated): positions, room, q, k, v after RoPE."""
    batch = lengths.shape[0]
    input_dim = layer.d_model if layer.input_dim is None else layer.input_dim
    validate_decode_input(x.shape, input_dim, batch)
    validate_context(
        None,
        input_dim if layer.context_dim is None else layer.context_dim,
        batch,
        input_dim=input_dim,
        mechanism="",
        is_causal=True,
    )
    tokens = x.shape[1]
    validate_decode_mask(None if mask is None else mask.shape, batch, tokens)
    real = jnp.ones((batch, tokens), bool) if mask is None else jnp.asarray(mask).astype(bool)

    positions = _positions(lengths, real)
    _check_room(lengths, real, limit)
    q, k, v = layer.project_heads(x, x, positions=positions)
    return NewTokens(real, positions, real & (positions < limit), q, k, v)


def finish(layer: Mechanism, out: jax.Array, new: NewTokens) -> jax.Array:
    """Step 6: ``(B, H, T, D) -> (B, T, E)``, zero for padded tokens, NaN past the limit
    (only reachable when traced: eagerly ``_check_room`` raised)."""
    out = layer.project("w_o", merge_heads(out))
    out = jnp.where(new.real[..., None], out, 0.0)
    return jnp.where((new.real & ~new.writable)[..., None], jnp.nan, out)


def _write(buffer: jax.Array, new: jax.Array, slots: jax.Array, writable: jax.Array) -> jax.Array:
    """``buffer`` ``(B, K, S, D)`` with ``new`` ``(B, K, T, D)`` written, token t of
    sequence b at slot ``slots[b, t]`` where ``writable[b, t]``.

    A token that is not written gets the slot S, which ``mode="drop"`` discards.
    """
    batch, _, size, _ = buffer.shape
    rows = jnp.arange(batch)[:, None]
    slots = jnp.where(writable, slots, size)
    if slots.shape[1] == 1:
        # one token: XLA turns a one-index scatter into a dynamic-update-slice, which it
        # then copies the whole buffer around for (2-6x slower steps); a second, dropped
        # index keeps it a scatter, done in place
        slots = jnp.concatenate((slots, jnp.full_like(slots, size)), axis=1)
        new = jnp.concatenate((new, new), axis=2)
    # buffer[rows, :, slots] is (B, T, K, D): the indexed axes first, then the sliced ones
    return buffer.at[rows, :, slots].set(
        new.transpose(0, 2, 1, 3).astype(buffer.dtype), mode="drop"
    )


def _slot_keys(
    cache: KVCache, new: NewTokens, stride: int
) -> tuple[KVCache, jax.Array, jax.Array, jax.Array | None]:
    """Step 4, slot = position: ``(cache, keys, values, key_positions)``, the new tokens
    written first. All S_max slots (positions ``None``: ``0..S_max-1``), or for one token
    with ``stride`` r > 1 its residue class: slots ``p mod r, p mod r + r, ...``
    ``(B, ceil(S_max / r))`` (those past the end read the last slot, at a position
    causality hides)."""
    keys = _write(cache.keys, new.k, new.positions, new.writable)
    values = _write(cache.values, new.v, new.positions, new.writable)
    cache = cache._replace(keys=keys, values=values)
    slots = keys.shape[2]
    if stride == 1 or new.positions.shape[1] > 1:
        return cache, keys, values, None
    residue = new.positions[:, :1] % stride
    positions = residue + stride * jnp.arange(-(-slots // stride), dtype=residue.dtype)
    index = jnp.minimum(positions, slots - 1)[:, None, :, None]
    return (
        cache,
        jnp.take_along_axis(keys, index, axis=2),
        jnp.take_along_axis(values, index, axis=2),
        positions,
    )


def _ring_keys(
    cache: WindowCache, new: NewTokens, ring: int
) -> tuple[WindowCache, jax.Array, jax.Array, jax.Array]:
    """Step 4, a ring of C slots: ``(cache, keys, values, key_positions)`` ``(B, C + T)``:
    the ring as it was, slot s holding the last position p < lengths with p = s mod C
    (-1: empty), then the new tokens (-1 where not written); then the last C written
    tokens go in."""
    lengths = cache.lengths[:, None]
    slot = jnp.arange(ring, dtype=lengths.dtype)
    held = jnp.maximum(slot + ring * ((lengths - 1 - slot) // ring), -1)
    positions = jnp.concatenate((held, jnp.where(new.writable, new.positions, -1)), axis=1)
    keys = jnp.concatenate((cache.keys.astype(new.k.dtype), new.k), axis=2)
    values = jnp.concatenate((cache.values.astype(new.v.dtype), new.v), axis=2)
    last = new.writable & (new.positions >= lengths + new.real.sum(1, keepdims=True) - ring)
    cache = cache._replace(
        keys=_write(cache.keys, new.k, new.positions % ring, last),
        values=_write(cache.values, new.v, new.positions % ring, last),
    )
    return cache, keys, values, positions


def decode(
    layer: Mechanism,
    cache: KVCache | WindowCache,
    x: jax.Array,
    mask: jax.Array | None = None,
) -> tuple[KVCache | WindowCache, jax.Array]:
    """Attend from T new tokens to the cache and to each other; see the module docstring.

    Args:
      layer: a bound layer of the dense family, local, dilated or block attention.
      cache: from ``init_cache``.
      x: ``(B, T, input_dim)``, T >= 1 new tokens per sequence.
      mask: ``(B, T)``, non-zero / ``True`` = a real token; ``None``: all real.

    Returns:
      ``(cache, out)``: the new cache, out ``(B, T, E)`` (zero for padded tokens, NaN for
      tokens past max_length under ``jax.jit``).
    """
    check_cache(layer, cache)
    rule = layer.cache_rule()
    limit = cache.keys.shape[2] if rule.ring is None else cache.max_length
    new = new_tokens(layer, x, mask, cache.lengths, limit)
    if rule.ring is None:
        cache, keys, values, key_positions = _slot_keys(cache, new, rule.stride)
    else:
        cache, keys, values, key_positions = _ring_keys(cache, new, rule.ring)

    # (B, 1, T, 1): a padded query sees nothing (a zero row); causal on positions does the rest
    keep = new.real[:, None, :, None]
    if key_positions is not None:  # (B, 1, 1, S): empty slots and unwritten tokens hidden
        keep = keep & (key_positions >= 0)[:, None, None, :]
    if rule.pattern is not None:
        if key_positions is None:
            key_rows = jnp.arange(keys.shape[2], dtype=new.positions.dtype)
        else:
            key_rows = key_positions[:, None, None, :]
        keep = keep & rule.pattern(new.positions[:, None, :, None], key_rows)
    out, _ = dot_product_attention(
        new.q,
        keys.astype(new.q.dtype),
        values.astype(new.q.dtype),
        keep,
        **layer.core_options(),
        is_causal=True,
        scale=layer.scale,
        need_weights=False,
        query_positions=new.positions,
        key_positions=key_positions,
    )
    lengths = cache.lengths + new.real.sum(1, dtype=cache.lengths.dtype)
    return cache._replace(lengths=lengths), finish(layer, out, new)

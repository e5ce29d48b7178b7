"""Decoding with a key/value cache for the dense family (docs/semantics.md, issue 13).

A cache is a few preallocated buffers and one count per sequence (as gpt-fast's
``KVCache``): ``keys`` and ``values`` ``(B, K, S_max, D)``, K kv heads (GQA keeps H/K of the
memory) of keys after RoPE, and ``lengths`` ``(B,)``, the real tokens cached per sequence,
which is also the position of each sequence's next token. Slot = position: a sequence's
token at position p lives in slot p.

A decoding call (``decode``) takes T >= 1 new tokens per sequence (a prompt, or one token)
and a mask ``(B, T)`` of the real ones; positions count real tokens only, so each sequence
of a batch with prompts of different lengths gets exactly what decoding it alone gives.
Its steps, the same in ``attentions_torch.cache``:

1. positions ``lengths[b] + cumsum(mask[b]) - 1`` of the new tokens;
2. the room check: a real token at a position >= S_max is an error (below);
3. project q, k, v and split heads; RoPE at the positions;
4. write the real tokens' keys and values at their slots (padded ones go nowhere);
5. attend from the T queries to the whole cache with the dense core: causal on positions
   (a slot after a query's position is hidden, so unwritten slots never count), ALiBi on
   positions, padded queries' rows hidden;
6. merge heads, project out; padded tokens' outputs are exactly zero.

The cache is a pytree passed in and returned (``(cache, out)``: a ``lax.scan`` body).
``lengths`` are data, not static: a jitted ``decode`` compiles once per (B, T) and serves
every position.

Overflow: when ``lengths`` are concrete (an eager ``apply``), a call that would leave a
sequence with more than S_max tokens raises ``ValueError``. Under ``jax.jit`` or
``lax.scan`` the values are traced and cannot be checked: the call goes on, a real token
at a position >= S_max is not written and its output is NaN, and ``lengths`` still counts
it, so every later token of that sequence is NaN too: an overflow shows, never silent
garbage. The other sequences are unaffected.

Shape legend: B batch, T new tokens, S_max cache slots, H query heads, K kv heads,
D head width, E model width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._validation import (
    validate_cache,
    validate_cache_room,
    validate_cache_size,
    validate_context,
    validate_decode_input,
    validate_decode_mask,
)
from .functional import dot_product_attention, merge_heads, split_heads
from .rope import apply_rope

if TYPE_CHECKING:
    from .base import SelfAttention

__all__ = ["KVCache", "decode", "init_cache"]


class KVCache(NamedTuple):
    """The keys and values a dense layer has seen, slot = position (a pytree).

    keys, values: ``(B, K, S_max, D)`` in the cache dtype, keys after RoPE; lengths:
    ``(B,)`` int32, the real tokens cached per sequence (the position of its next token).
    The same fields, shapes and dtypes as ``attentions_torch.KVCache``.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array


def init_cache(
    layer: SelfAttention, batch: int, max_length: int, *, dtype: jnp.dtype | None = None
) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_length`` tokens.

    ``dtype`` defaults to that of the layer's parameters (``layer`` is bound).
    """
    validate_cache_size(batch, max_length)
    dtype = layer.variables["params"]["w_q"]["kernel"].dtype if dtype is None else dtype
    num_kv_heads = layer.head_counts()[1]
    shape = (batch, num_kv_heads, max_length, layer.d_head)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def _positions(lengths: jax.Array, real: jax.Array) -> jax.Array:
    """``(B, T)`` int32 positions of the new tokens: real tokens count, padded ones do not
    (a padded token gets the position of the real token before it, never used)."""
    return lengths[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1


def _check_room(lengths: jax.Array, real: jax.Array, max_length: int) -> None:
    """``ValueError`` if a sequence would pass ``max_length`` tokens; skipped when the
    lengths are traced (``jax.jit``, ``lax.scan``; see the module docstring)."""
    try:
        after = np.asarray(lengths + real.sum(1))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    validate_cache_room(after.tolist(), max_length)


def _write(buffer: jax.Array, new: jax.Array, slots: jax.Array, writable: jax.Array) -> jax.Array:
    """``buffer`` ``(B, K, S_max, D)`` with ``new`` ``(B, K, T, D)`` written, token t of
    sequence b at slot ``slots[b, t]`` where ``writable[b, t]``.

    A token that is not written gets the slot S_max, which ``mode="drop"`` discards.
    """
    batch, _, max_length, _ = buffer.shape
    rows = jnp.arange(batch)[:, None]
    slots = jnp.where(writable, slots, max_length)
    # buffer[rows, :, slots] is (B, T, K, D): the indexed axes first, then the sliced ones
    return buffer.at[rows, :, slots].set(
        new.transpose(0, 2, 1, 3).astype(buffer.dtype), mode="drop"
    )


def decode(
    layer: SelfAttention, cache: KVCache, x: jax.Array, mask: jax.Array | None = None
) -> tuple[KVCache, jax.Array]:
    """Attend from T new tokens to the cache and to each other; see the module docstring.

    Args:
      layer: a bound dense-family layer (checked by ``SelfAttention.decode``).
      cache: from ``init_cache``.
      x: ``(B, T, input_dim)``, T >= 1 new tokens per sequence.
      mask: ``(B, T)``, non-zero / ``True`` = a real token; ``None``: all real.

    Returns:
      ``(cache, out)``: the new cache, out ``(B, T, E)`` (zero for padded tokens, NaN for
      tokens past the cache's end under ``jax.jit``).
    """
    num_heads, num_kv_heads = layer.head_counts()
    validate_cache(
        cache.keys.shape, cache.values.shape, cache.lengths.shape, num_kv_heads, layer.d_head
    )
    batch, max_length = cache.keys.shape[0], cache.keys.shape[2]
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

    positions = _positions(cache.lengths, real)
    _check_room(cache.lengths, real, max_length)
    q = split_heads(layer._project("w_q", x), num_heads)
    k = split_heads(layer._project("w_k", x), num_kv_heads)
    v = split_heads(layer._project("w_v", x), num_kv_heads)
    if layer.rope:
        rope = {"base": layer.rope_base, "interleaved": layer.rope_interleaved}
        q = apply_rope(q, positions=positions, **rope)
        k = apply_rope(k, positions=positions, **rope)
    writable = real & (positions < max_length)
    keys = _write(cache.keys, k, positions, writable)
    values = _write(cache.values, v, positions, writable)

    # (B, 1, T, 1): a padded query sees nothing (a zero row); causal on positions does the rest
    keep = real[:, None, :, None]
    out, _ = dot_product_attention(
        q,
        keys.astype(q.dtype),
        values.astype(q.dtype),
        keep,
        **layer.core_options(),
        is_causal=True,
        scale=layer.scale,
        need_weights=False,
        query_positions=positions,
    )
    out = layer._project("w_o", merge_heads(out))
    out = jnp.where(real[..., None], out, 0.0)
    # only reachable when traced: eagerly _check_room raised
    out = jnp.where((real & ~writable)[..., None], jnp.nan, out)
    lengths = cache.lengths + real.sum(1, dtype=cache.lengths.dtype)
    return KVCache(keys, values, lengths), out

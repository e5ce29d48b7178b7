"""Decoding with a cache (docs/semantics.md "Decoding with a cache", issue 13).

A cache is a few preallocated buffers and one count per sequence (as gpt-fast's
``KVCache``); ``lengths`` ``(B,)`` int32 counts the real tokens a sequence has cached,
which is also the position of its next token. Three kinds, NamedTuples with the same
fields, shapes and dtypes as in ``attentions_jax.cache``:

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
  ``phi(k)``, in float32 or wider (``attentions_torch.linear``).

A mechanism says how it keeps and reads keys with a ``CacheRule`` (``layer.cache_rule()``).
A decoding call (``decode``) takes T >= 1 new tokens per sequence (a prompt, or one token)
and a mask ``(B, T)`` of the real ones; positions count real tokens only, so each
sequence of a batch with prompts of different lengths gets exactly what decoding it alone
gives. Its steps:

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
the stream. PyTorch updates the cache tensors in place and returns the same cache;
decoding is for inference (under ``torch.no_grad`` or ``torch.inference_mode``).

Overflow: eagerly, a call that would leave a sequence with more than max_length tokens
raises ``ValueError`` before anything is written (reading ``lengths`` on the host: one
synchronization per call on a GPU). Under ``torch.compile`` the check cannot read the
values: the call goes on, a real token at a position >= max_length is not written and its
output is NaN, and ``lengths`` still counts it, so every later token of that sequence is
NaN too: an overflow shows, never silent garbage. The other sequences are unaffected.

Shape legend: B batch, T new tokens, S_max cache slots, C ring slots, H query heads,
K kv heads, D head width, E model width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

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
    from .base import SelfAttention

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
    The same fields, shapes and dtypes as ``attentions_jax.KVCache``.
    """

    keys: Tensor
    values: Tensor
    lengths: Tensor


class WindowCache(NamedTuple):
    """The last C keys and values of each sequence, slot = position mod C (local, block).

    keys, values: ``(B, K, C, D)``, keys after RoPE; lengths: ``(B,)`` int32 as in
    ``KVCache``; max_length: ``()`` int32, the most tokens a sequence may hold
    (``NO_LIMIT`` = 2**31 - 1 for ``max_length=None``). Memory does not grow with the
    stream. The same fields, shapes and dtypes as ``attentions_jax.WindowCache``.
    """

    keys: Tensor
    values: Tensor
    lengths: Tensor
    max_length: Tensor


class LinearCache(NamedTuple):
    """Linear attention's recurrent state after ``lengths`` tokens.

    kv: ``(B, H, D, D)`` sum of ``phi(k_j) v_jᵀ``; k_sum: ``(B, H, D)`` sum of ``phi(k_j)``
    (float32 or wider); lengths, max_length: as in ``WindowCache``. The same fields,
    shapes and dtypes as ``attentions_jax.LinearCache``.
    """

    kv: Tensor
    k_sum: Tensor
    lengths: Tensor
    max_length: Tensor


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
    pattern: Callable[[Tensor, Tensor], Tensor] | None = None


class NewTokens(NamedTuple):
    """A decoding call's new tokens: which are real ``(B, T)``, their positions ``(B, T)``
    int64, which get written (real and before the limit), and q ``(B, H, T, D)``, k, v
    ``(B, K, T, D)`` after RoPE."""

    real: Tensor
    positions: Tensor
    writable: Tensor
    q: Tensor
    k: Tensor
    v: Tensor


def init_cache(
    layer: SelfAttention,
    batch: int,
    max_length: int | None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache | WindowCache:
    """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (``None``: no
    limit, ring caches only). ``dtype`` and ``device`` default to the parameters'."""
    rule = layer.cache_rule()
    validate_cache_size(batch, max_length, fixed_size=rule.ring is not None)
    weight = layer.w_q.weight
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device if device is None else device
    slots = max_length if rule.ring is None else rule.ring
    shape = (batch, layer.num_kv_heads, slots, layer.d_head)
    buffers = (
        torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros(batch, dtype=torch.int32, device=device),
    )
    if rule.ring is None:
        return KVCache(*buffers)
    return WindowCache(*buffers, limit_tensor(max_length, device))


def limit_tensor(max_length: int | None, device: torch.device | str | None) -> Tensor:
    """``max_length`` as a ``()`` int32 tensor, ``NO_LIMIT`` for ``None``."""
    limit = NO_LIMIT if max_length is None else max_length
    return torch.tensor(limit, dtype=torch.int32, device=device)


def check_cache(layer: SelfAttention, cache: tuple) -> None:
    """``ValueError`` unless ``cache`` is one ``init_cache`` of this layer makes."""
    rule = layer.cache_rule()
    kind = "KVCache" if rule.ring is None else "WindowCache"
    slots = "S_max" if rule.ring is None else rule.ring
    heads = ("B", layer.num_kv_heads, slots, layer.d_head)
    expected = {"keys": heads, "values": heads, "lengths": ("B",)}
    if rule.ring is not None:
        expected["max_length"] = ()
    validate_cache(type(cache).__name__, field_shapes(cache), kind, expected)


def field_shapes(cache: tuple) -> dict[str, tuple[int, ...]] | None:
    """The shapes of a NamedTuple cache's fields, ``None`` for anything else."""
    fields = getattr(cache, "_fields", None)
    if fields is None:
        return None
    return {name: tuple(getattr(cache, name).shape) for name in fields}


def _positions(lengths: Tensor, real: Tensor) -> Tensor:
    """``(B, T)`` int64 positions of the new tokens: real tokens count, padded ones do not
    (a padded token gets the position of the real token before it, never used)."""
    return lengths.long()[:, None] + real.long().cumsum(1) - 1


def _check_room(lengths: Tensor, real: Tensor, limit: int | Tensor) -> None:
    """``ValueError`` if a sequence would pass ``limit`` tokens; skipped while
    ``torch.compile`` traces (the values are unknown then; see the module docstring)."""
    if not torch.compiler.is_compiling():
        validate_cache_room((lengths.long() + real.sum(1)).tolist(), int(limit))


def new_tokens(
    layer: SelfAttention,
    x: Tensor,
    mask: Tensor | None,
    lengths: Tensor,
    limit: int | Tensor,
) -> NewTokens:
    """Steps 1-3 of a decoding call (validated): positions, room, q, k, v after RoPE."""
    batch = lengths.shape[0]
    validate_decode_input(x.shape, layer.input_dim, batch)
    validate_context(
        None, layer.context_dim, batch, input_dim=layer.input_dim, mechanism="", is_causal=True
    )
    tokens = x.shape[1]
    validate_decode_mask(None if mask is None else mask.shape, batch, tokens)
    real = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
    if mask is not None:
        real = mask.to(device=x.device, dtype=torch.bool)

    positions = _positions(lengths, real)
    _check_room(lengths, real, limit)
    q, k, v = layer.project_heads(x, x, positions=positions)
    return NewTokens(real, positions, real & (positions < limit), q, k, v)


def finish(layer: SelfAttention, out: Tensor, new: NewTokens) -> Tensor:
    """Step 6: ``(B, H, T, D) -> (B, T, E)``, zero for padded tokens, NaN past the limit
    (only reachable under ``torch.compile``: eagerly ``_check_room`` raised)."""
    out = layer.w_o(merge_heads(out))
    out = out.masked_fill(~new.real[..., None], 0.0)
    return out.masked_fill((new.real & ~new.writable)[..., None], float("nan"))


def _write(buffer: Tensor, new: Tensor, slots: Tensor, writable: Tensor) -> None:
    """Write ``new`` ``(B, K, T, D)`` into ``buffer`` ``(B, K, S, D)`` in place, token t of
    sequence b at slot ``slots[b, t]`` where ``writable[b, t]``; a row's written slots are
    consecutive modulo S (a ring's wrap included).

    ``scatter_`` has no "drop" mode (JAX's ``.at[].set(mode="drop")``) and leaves the order
    of duplicate indices to chance, so a token that is not written goes to one sink slot
    of its row carrying the value that slot holds after the call: every duplicate writes
    the same number, and the write stays in place, O(T), free of data-dependent shapes.
    The sink is the slot after the row's last write (not written in this call: its current
    value), or the last slot when the row's writes reach it (then the written value).
    """
    batch, kv_heads, size, d_head = buffer.shape
    rows = torch.arange(batch, device=buffer.device)
    sink = (slots.masked_fill(~writable, -1).amax(1) + 1).clamp(max=size - 1)
    hits = writable & (slots == sink[:, None])
    written = new[rows, :, hits.int().argmax(1)]  # (B, K, D)
    current = buffer[rows, :, sink]
    sink_value = torch.where(hits.any(1)[:, None, None], written.to(buffer.dtype), current)
    index = torch.where(writable, slots, sink[:, None])
    source = torch.where(writable[:, None, :, None], new.to(buffer.dtype), sink_value[:, :, None])
    buffer.scatter_(2, index[:, None, :, None].expand(-1, kv_heads, -1, d_head), source)


def _slot_keys(cache: KVCache, new: NewTokens, stride: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Step 4, slot = position: ``(keys, values, key_positions)``, the new tokens written
    first. All S_max slots (positions ``None``: ``0..S_max-1``), or for one token with
    ``stride`` r > 1 its residue class: slots ``p mod r, p mod r + r, ...`` ``(B, ceil(S_max
    / r))`` (those past the end read the last slot, at a position causality hides)."""
    _write(cache.keys, new.k, new.positions, new.writable)
    _write(cache.values, new.v, new.positions, new.writable)
    slots = cache.keys.shape[2]
    if stride == 1 or new.positions.shape[1] > 1:
        return cache.keys, cache.values, None
    residue = new.positions[:, :1] % stride
    positions = residue + stride * torch.arange(-(-slots // stride), device=residue.device)
    index = positions.clamp(max=slots - 1)[:, None, :, None]
    index = index.expand(-1, cache.keys.shape[1], -1, cache.keys.shape[3])
    return cache.keys.gather(2, index), cache.values.gather(2, index), positions


def _ring_keys(cache: WindowCache, new: NewTokens, ring: int) -> tuple[Tensor, Tensor, Tensor]:
    """Step 4, a ring of C slots: ``(keys, values, key_positions)`` ``(B, C + T)``: the ring
    as it was, slot s holding the last position p < lengths with p = s mod C (-1: empty),
    then the new tokens (-1 where not written); then the last C written tokens go in."""
    lengths = cache.lengths.long()[:, None]
    slot = torch.arange(ring, device=lengths.device)
    held = slot + ring * torch.div(lengths - 1 - slot, ring, rounding_mode="floor")
    held = held.clamp(min=-1)
    positions = torch.cat((held, new.positions.masked_fill(~new.writable, -1)), dim=1)
    keys = torch.cat((cache.keys.to(new.k.dtype), new.k), dim=2)
    values = torch.cat((cache.values.to(new.v.dtype), new.v), dim=2)
    last = new.writable & (new.positions >= lengths + new.real.sum(1, keepdim=True) - ring)
    _write(cache.keys, new.k, new.positions % ring, last)
    _write(cache.values, new.v, new.positions % ring, last)
    return keys, values, positions


def decode(
    layer: SelfAttention, cache: KVCache | WindowCache, x: Tensor, mask: Tensor | None = None
) -> tuple[KVCache | WindowCache, Tensor]:
    """Attend from T new tokens to the cache and to each other; see the module docstring.

    Args:
      layer: a layer of the dense family, local, dilated or block attention.
      cache: from ``layer.init_cache``; updated in place.
      x: ``(B, T, input_dim)``, T >= 1 new tokens per sequence.
      mask: ``(B, T)``, non-zero / ``True`` = a real token; ``None``: all real.

    Returns:
      ``(cache, out)``: the same cache, out ``(B, T, E)`` (zero for padded tokens, NaN
      for tokens past max_length under ``torch.compile``).
    """
    check_cache(layer, cache)
    rule = layer.cache_rule()
    limit = cache.keys.shape[2] if rule.ring is None else cache.max_length
    new = new_tokens(layer, x, mask, cache.lengths, limit)
    if rule.ring is None:
        keys, values, key_positions = _slot_keys(cache, new, rule.stride)
    else:
        keys, values, key_positions = _ring_keys(cache, new, rule.ring)

    # (B, 1, T, 1): a padded query sees nothing (a zero row); causal on positions does the rest
    keep = new.real[:, None, :, None]
    if key_positions is not None:  # (B, 1, 1, S): empty slots and unwritten tokens hidden
        keep = keep & (key_positions >= 0)[:, None, None, :]
    if rule.pattern is not None:
        if key_positions is None:
            key_rows = torch.arange(keys.shape[2], device=keys.device)
        else:
            key_rows = key_positions[:, None, None, :]
        keep = keep & rule.pattern(new.positions[:, None, :, None], key_rows)
    out, _ = dot_product_attention(
        new.q,
        keys.to(new.q.dtype),
        values.to(new.q.dtype),
        keep,
        **layer.core_options(new.q.device),
        is_causal=True,
        scale=layer.scale,
        need_weights=False,
        query_positions=new.positions,
        key_positions=key_positions,
    )
    cache.lengths.add_(new.real.sum(1).to(cache.lengths.dtype))
    return cache, finish(layer, out, new)

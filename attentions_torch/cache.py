"""Decoding with a key/value cache for the dense family (docs/semantics.md, issue 13).

A cache is a few preallocated buffers and one count per sequence (as gpt-fast's
``KVCache``): ``keys`` and ``values`` ``(B, K, S_max, D)``, K kv heads (GQA keeps H/K of the
memory) of keys after RoPE, and ``lengths`` ``(B,)``, the real tokens cached per sequence,
which is also the position of each sequence's next token. Slot = position: a sequence's
token at position p lives in slot p.

A decoding call (``decode``) takes T >= 1 new tokens per sequence (a prompt, or one token)
and a mask ``(B, T)`` of the real ones; positions count real tokens only, so each sequence
of a batch with prompts of different lengths gets exactly what decoding it alone gives.
Its steps, the same in ``attentions_jax.cache``:

1. positions ``lengths[b] + cumsum(mask[b]) - 1`` of the new tokens;
2. the room check: a real token at a position >= S_max is an error (below);
3. project q, k, v and split heads; RoPE at the positions;
4. write the real tokens' keys and values at their slots (padded ones go nowhere);
5. attend from the T queries to the whole cache with the dense core: causal on positions
   (a slot after a query's position is hidden, so unwritten slots never count), ALiBi on
   positions, padded queries' rows hidden;
6. merge heads, project out; padded tokens' outputs are exactly zero.

PyTorch updates the cache tensors in place and returns the same ``KVCache``; decoding is
for inference (under ``torch.no_grad`` or ``torch.inference_mode``).

Overflow: eagerly, a call that would leave a sequence with more than S_max tokens raises
``ValueError`` before anything is written (reading ``lengths`` on the host: one
synchronization per call on a GPU). Under ``torch.compile`` the check cannot read the
values: the call goes on, a real token at a position >= S_max is not written and its
output is NaN, and ``lengths`` still counts it, so every later token of that sequence is
NaN too: an overflow shows, never silent garbage. The other sequences are unaffected.

Shape legend: B batch, T new tokens, S_max cache slots, H query heads, K kv heads,
D head width, E model width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

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
    """The keys and values a dense layer has seen, slot = position.

    keys, values: ``(B, K, S_max, D)`` in the cache dtype, keys after RoPE; lengths:
    ``(B,)`` int32, the real tokens cached per sequence (the position of its next token).
    The same fields, shapes and dtypes as ``attentions_jax.KVCache``.
    """

    keys: Tensor
    values: Tensor
    lengths: Tensor


def init_cache(
    layer: SelfAttention,
    batch: int,
    max_length: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_length`` tokens.

    ``dtype`` and ``device`` default to those of the layer's parameters.
    """
    validate_cache_size(batch, max_length)
    weight = layer.w_q.weight
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device if device is None else device
    shape = (batch, layer.num_kv_heads, max_length, layer.d_head)
    return KVCache(
        keys=torch.zeros(shape, dtype=dtype, device=device),
        values=torch.zeros(shape, dtype=dtype, device=device),
        lengths=torch.zeros(batch, dtype=torch.int32, device=device),
    )


def _positions(lengths: Tensor, real: Tensor) -> Tensor:
    """``(B, T)`` int64 positions of the new tokens: real tokens count, padded ones do not
    (a padded token gets the position of the real token before it, never used)."""
    return lengths.long()[:, None] + real.long().cumsum(1) - 1


def _check_room(lengths: Tensor, real: Tensor, max_length: int) -> None:
    """``ValueError`` if a sequence would pass ``max_length`` tokens; skipped while
    ``torch.compile`` traces (the values are unknown then; see the module docstring)."""
    if not torch.compiler.is_compiling():
        validate_cache_room((lengths.long() + real.sum(1)).tolist(), max_length)


def _write(buffer: Tensor, new: Tensor, slots: Tensor, writable: Tensor) -> None:
    """Write ``new`` ``(B, K, T, D)`` into ``buffer`` ``(B, K, S_max, D)`` in place, token t of
    sequence b at slot ``slots[b, t]`` where ``writable[b, t]``.

    ``scatter_`` has no "drop" mode (JAX's ``.at[].set(mode="drop")``) and leaves the order
    of duplicate indices to chance, so a token that is not written goes to one sink slot
    of its row carrying the value that slot holds after the call: every duplicate writes
    the same number, and the write stays in place, O(T), free of data-dependent shapes.
    The sink is the slot after the row's last write (not written in this call: its current
    value), or the last slot when the row's writes reach it (then the written value).
    """
    batch, kv_heads, max_length, d_head = buffer.shape
    rows = torch.arange(batch, device=buffer.device)
    sink = (slots.masked_fill(~writable, -1).amax(1) + 1).clamp(max=max_length - 1)
    hits = writable & (slots == sink[:, None])
    written = new[rows, :, hits.int().argmax(1)]  # (B, K, D)
    current = buffer[rows, :, sink]
    sink_value = torch.where(hits.any(1)[:, None, None], written.to(buffer.dtype), current)
    index = torch.where(writable, slots, sink[:, None])
    source = torch.where(writable[:, None, :, None], new.to(buffer.dtype), sink_value[:, :, None])
    buffer.scatter_(2, index[:, None, :, None].expand(-1, kv_heads, -1, d_head), source)


def decode(
    layer: SelfAttention, cache: KVCache, x: Tensor, mask: Tensor | None = None
) -> tuple[KVCache, Tensor]:
    """Attend from T new tokens to the cache and to each other; see the module docstring.

    Args:
      layer: a dense-family layer (checked by ``SelfAttention.decode``).
      cache: from ``init_cache``; updated in place.
      x: ``(B, T, input_dim)``, T >= 1 new tokens per sequence.
      mask: ``(B, T)``, non-zero / ``True`` = a real token; ``None``: all real.

    Returns:
      ``(cache, out)``: the same cache, out ``(B, T, E)`` (zero for padded tokens, NaN
      for tokens past the cache's end under ``torch.compile``).
    """
    validate_cache(
        cache.keys.shape, cache.values.shape, cache.lengths.shape, layer.num_kv_heads, layer.d_head
    )
    batch, max_length = cache.keys.shape[0], cache.keys.shape[2]
    validate_decode_input(x.shape, layer.input_dim, batch)
    validate_context(
        None, layer.context_dim, batch, input_dim=layer.input_dim, mechanism="", is_causal=True
    )
    tokens = x.shape[1]
    validate_decode_mask(None if mask is None else mask.shape, batch, tokens)
    real = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
    if mask is not None:
        real = mask.to(device=x.device, dtype=torch.bool)

    positions = _positions(cache.lengths, real)
    _check_room(cache.lengths, real, max_length)
    q = split_heads(layer.w_q(x), layer.num_heads)
    k = split_heads(layer.w_k(x), layer.num_kv_heads)
    v = split_heads(layer.w_v(x), layer.num_kv_heads)
    if layer.rope:
        rope = {"base": layer.rope_base, "interleaved": layer.rope_interleaved}
        q = apply_rope(q, positions=positions, **rope)
        k = apply_rope(k, positions=positions, **rope)
    writable = real & (positions < max_length)
    _write(cache.keys, k, positions, writable)
    _write(cache.values, v, positions, writable)

    # (B, 1, T, 1): a padded query sees nothing (a zero row); causal on positions does the rest
    keep = real[:, None, :, None]
    out, _ = dot_product_attention(
        q,
        cache.keys.to(q.dtype),
        cache.values.to(q.dtype),
        keep,
        **layer.core_options(q.device),
        is_causal=True,
        scale=layer.scale,
        need_weights=False,
        query_positions=positions,
    )
    out = layer.w_o(merge_heads(out))
    out = out.masked_fill(~real[..., None], 0.0)
    # only reachable under torch.compile: eagerly _check_room raised
    out = out.masked_fill((real & ~writable)[..., None], float("nan"))
    cache.lengths.add_(real.sum(1).to(cache.lengths.dtype))
    return cache, out

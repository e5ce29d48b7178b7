"""PyTorch workloads: the library layer, and ``F.scaled_dot_product_attention`` by hand.

Each builder returns a ``Workload`` whose ``run()`` makes one call (forward under
``torch.no_grad()``, or forward plus ``backward`` of a fixed cotangent into the inputs and
every weight, or one decoding step under ``torch.inference_mode()``). The references
reuse the layer's own weights, so both sides multiply the same matrices. Inputs, weights
and masks are made on the CPU (the same numbers on every device) and moved to the run's
device; on CUDA ``run()`` ends with ``torch.cuda.synchronize()``, since kernels are
launched asynchronously.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import attentions_torch

from ..mechanisms import Mechanism
from .cases import alibi_slopes
from .plan import (
    Cell,
    Workload,
    bench_heads,
    bench_size,
    layer_kwargs,
    reference_pattern,
    refusing_not_available,
)

__all__ = ["build", "reference_mask"]

_CPU = torch.device("cpu")


def reference_mask(
    mechanism: Mechanism, pattern: str, length: int, is_causal: bool
) -> Tensor | None:
    """What SDPA receives as ``attn_mask``: a boolean keep-mask, or ALiBi's float bias.

    The bias is ``(1, H, L, L)``: a rank-3 float mask makes SDPA's CPU kernel copy it.
    """
    causal = attentions_torch.causal_mask(length) if is_causal else None
    if pattern == "alibi":
        slopes = torch.tensor(alibi_slopes(bench_heads(mechanism)[0]), dtype=torch.float32)
        positions = torch.arange(length, dtype=torch.float32)
        distance = (positions[:, None] - positions[None, :]).abs()
        bias = -slopes[:, None, None] * distance
        if causal is not None:
            bias = bias.masked_fill(~causal, float("-inf"))
        return bias[None]
    builders = {
        "local": attentions_torch.local_mask,
        "dilated": attentions_torch.dilated_mask,
        "block": attentions_torch.block_mask,
    }
    if pattern in builders:
        keep = builders[pattern](length, bench_size(mechanism))
        return attentions_torch.combine_masks(keep, causal)
    return None


def _sdpa(heads: int, kv_heads: int, mask: Tensor | None, is_causal: bool) -> Callable:
    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            enable_gqa=heads != kv_heads,
        )

    return attention


def _by_hand(layer: torch.nn.Module, attention: Callable, rope: bool) -> Callable:
    """Projections, (RoPE), the fused kernel and the output projection, written out."""
    heads, kv_heads = layer.num_heads, layer.num_kv_heads

    def split(x: Tensor, count: int) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, count, width // count).transpose(1, 2)

    def forward(x: Tensor) -> Tensor:
        q = split(F.linear(x, layer.w_q.weight, layer.w_q.bias), heads)
        k = split(F.linear(x, layer.w_k.weight, layer.w_k.bias), kv_heads)
        v = split(F.linear(x, layer.w_v.weight, layer.w_v.bias), kv_heads)
        if rope:
            rotate = {"base": layer.rope_base, "interleaved": layer.rope_interleaved}
            q = attentions_torch.apply_rope(q, **rotate)
            k = attentions_torch.apply_rope(k, **rotate)
        out = attention(q, k, v)
        merged = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return F.linear(merged, layer.w_o.weight, layer.w_o.bias)

    return forward


def _function(
    mechanism: Mechanism, cell: Cell, layer: torch.nn.Module | None, device: torch.device
) -> Callable:
    """The function the cell times, of the inputs ``_inputs`` makes."""
    if cell.subject in ("layer", "weights"):
        need_weights = cell.subject == "weights"
        if cell.scope == "core":
            return lambda q, k, v: layer.attend(
                q, k, v, None, is_causal=cell.is_causal, need_weights=need_weights
            )[0]
        return lambda x: layer(x, is_causal=cell.is_causal, need_weights=need_weights)
    pattern = reference_pattern(mechanism, cell.subject, cell.scope)
    mask = reference_mask(mechanism, pattern, cell.length, cell.is_causal)
    mask = None if mask is None else mask.to(device)
    heads, kv_heads = bench_heads(mechanism)
    attention = _sdpa(heads, kv_heads, mask, cell.is_causal)
    if cell.scope == "core":
        return attention
    return _by_hand(layer, attention, rope=pattern == "rope")


def _inputs(mechanism: Mechanism, cell: Cell, device: torch.device) -> list[Tensor]:
    """x, or q, k, v: from their own generator, the same whether a layer was built or not."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads = bench_heads(mechanism)
    batch, length, d_head = cell.batch, cell.length, cell.d_model // heads
    if cell.scope == "layer":
        shapes = [(batch, length, cell.d_model)]
    else:
        shapes = [(batch, count, length, d_head) for count in (heads, kv_heads, kv_heads)]
    return [torch.randn(shape, generator=generator).to(device) for shape in shapes]


def _synchronized(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``call`` followed, on CUDA, by a wait for its kernels (a no-op wrapper on the CPU)."""
    if device.type != "cuda":
        return call

    def run() -> object:
        out = call()
        torch.cuda.synchronize(device)
        return out

    return run


def _filled_cache(cache: tuple, length: int, generator: torch.Generator) -> tuple:
    """``cache`` as if it held ``length`` tokens: every floating field random and positive
    (linear attention's state divides by its ``k_sum``), ``lengths`` = ``length``."""
    fields = {
        name: torch.randn(value.shape, generator=generator).abs().to(value)
        for name, value in zip(cache._fields, cache, strict=True)
        if value.is_floating_point()
    }
    return cache._replace(**fields, lengths=torch.full_like(cache.lengths, length))


def _decode_step(mechanism: Mechanism, cell: Cell, device: torch.device) -> Workload:
    """One ``decode`` of T = 1 token against a cache holding ``cell.length`` tokens.

    ``max_length`` is L + 1 (a dense step attends over every slot, so no more); before
    each call ``lengths`` is set back to L in place, so every call decodes position L and
    ``run()`` may be called any number of times. The cache ``decode`` returns is the one
    the next call gets, as in a generation loop.
    """
    torch.manual_seed(0)
    layer = mechanism.layer_class("torch")(**layer_kwargs(mechanism, cell.d_model))
    layer.eval().to(device)
    cache = refusing_not_available(
        lambda: layer.init_cache(cell.batch, cell.length + 1, device=device)
    )
    generator = torch.Generator().manual_seed(1)
    state = [_filled_cache(cache, cell.length, generator)]
    x = torch.randn(cell.batch, 1, cell.d_model, generator=generator).to(device)

    def step() -> Tensor:
        with torch.inference_mode():
            state[0].lengths.fill_(cell.length)
            state[0], out = layer.decode(state[0], x)
            return out

    cache_bytes = sum(field.nbytes for field in state[0])
    return Workload(_synchronized(step, device), (x,), cache_bytes=cache_bytes)


def build(mechanism: Mechanism, cell: Cell, device: torch.device = _CPU) -> Workload:
    """The workload of ``cell`` on ``device``; the layer is built with seed 0, in eval mode.

    A reference on the core needs no layer, so it runs before the mechanism exists.
    """
    if cell.subject == "step":
        return _decode_step(mechanism, cell, device)
    if cell.subject == "matmul":
        generator = torch.Generator().manual_seed(1)
        a, b = (torch.randn(cell.length, cell.length, generator=generator) for _ in range(2))
        a, b = a.to(device), b.to(device)
        return Workload(_synchronized(lambda: a @ b, device), (a, b))
    torch.manual_seed(0)
    layer = None
    if cell.scope == "layer" or cell.subject in ("layer", "weights"):
        layer = mechanism.layer_class("torch")(**layer_kwargs(mechanism, cell.d_model))
        layer.eval().to(device)
    function = _function(mechanism, cell, layer, device)
    inputs = _inputs(mechanism, cell, device)
    if cell.mode == "fwd":

        def forward() -> object:
            with torch.no_grad():
                return function(*inputs)

        return Workload(_synchronized(forward, device), tuple(inputs))

    heads = bench_heads(mechanism)[0]
    out_shape = (cell.batch, cell.length, cell.d_model)
    if cell.scope == "core":
        out_shape = (cell.batch, heads, cell.length, cell.d_model // heads)
    cotangent = torch.randn(out_shape, generator=torch.Generator().manual_seed(2)).to(device)
    leaves = [*inputs, *layer.parameters()] if cell.scope == "layer" else inputs
    for leaf in leaves:
        leaf.requires_grad_(True)

    def forward_backward() -> object:
        for leaf in leaves:
            leaf.grad = None
        out = function(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(cotangent)
        return out

    return Workload(_synchronized(forward_backward, device), tuple(inputs))

"""PyTorch workloads: the library layer, and ``F.scaled_dot_product_attention`` by hand.

Each builder returns a ``Workload`` whose ``run()`` makes one call (forward under
``torch.no_grad()``, or forward plus ``backward`` of a fixed cotangent into the inputs and
every weight). The references reuse the layer's own weights, so both sides multiply the
same matrices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import attentions_torch

from .cases import BenchCase, alibi_slopes
from .plan import Cell, Workload, reference_pattern

__all__ = ["available", "build", "reference_mask"]


def available(case: BenchCase) -> bool:
    return hasattr(attentions_torch, case.class_name)


def reference_mask(case: BenchCase, pattern: str, length: int, is_causal: bool) -> Tensor | None:
    """What SDPA receives as ``attn_mask``: a boolean keep-mask, or ALiBi's float bias.

    The bias is ``(1, H, L, L)``: a rank-3 float mask makes SDPA's CPU kernel copy it.
    """
    causal = attentions_torch.causal_mask(length) if is_causal else None
    if pattern == "alibi":
        slopes = torch.tensor(alibi_slopes(case.head_counts()[0]), dtype=torch.float32)
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
        return attentions_torch.combine_masks(builders[pattern](length, case.size), causal)
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


def _function(case: BenchCase, cell: Cell, layer: torch.nn.Module | None) -> Callable:
    """The function the cell times, of the inputs ``_inputs`` makes."""
    if cell.subject in ("layer", "weights"):
        need_weights = cell.subject == "weights"
        if cell.scope == "core":
            return lambda q, k, v: layer.attend(
                q, k, v, None, is_causal=cell.is_causal, need_weights=need_weights
            )[0]
        return lambda x: layer(x, is_causal=cell.is_causal, need_weights=need_weights)
    pattern = reference_pattern(case, cell.subject, cell.scope)
    mask = reference_mask(case, pattern, cell.length, cell.is_causal)
    heads, kv_heads = case.head_counts()
    attention = _sdpa(heads, kv_heads, mask, cell.is_causal)
    if cell.scope == "core":
        return attention
    return _by_hand(layer, attention, rope=pattern == "rope")


def _inputs(case: BenchCase, cell: Cell) -> list[Tensor]:
    """x, or q, k, v: from their own generator, the same whether a layer was built or not."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads = case.head_counts()
    batch, length, d_head = cell.batch, cell.length, cell.d_model // heads
    if cell.scope == "layer":
        return [torch.randn(batch, length, cell.d_model, generator=generator)]
    return [
        torch.randn(batch, heads, length, d_head, generator=generator),
        torch.randn(batch, kv_heads, length, d_head, generator=generator),
        torch.randn(batch, kv_heads, length, d_head, generator=generator),
    ]


def build(case: BenchCase, cell: Cell) -> Workload:
    """The workload of ``cell``; the layer is built with seed 0 and put in eval mode.

    A reference on the core needs no layer, so it runs before the mechanism exists.
    """
    if cell.subject == "matmul":
        generator = torch.Generator().manual_seed(1)
        a, b = (torch.randn(cell.length, cell.length, generator=generator) for _ in range(2))
        return Workload(lambda: a @ b, (a, b))
    torch.manual_seed(0)
    layer = None
    if cell.scope == "layer" or cell.subject in ("layer", "weights"):
        layer = getattr(attentions_torch, case.class_name)(**case.constructor_kwargs(cell.d_model))
        layer.eval()
    function = _function(case, cell, layer)
    inputs = _inputs(case, cell)
    if cell.mode == "fwd":

        def forward() -> object:
            with torch.no_grad():
                return function(*inputs)

        return Workload(forward, tuple(inputs))

    heads = case.head_counts()[0]
    out_shape = (cell.batch, cell.length, cell.d_model)
    if cell.scope == "core":
        out_shape = (cell.batch, heads, cell.length, cell.d_model // heads)
    cotangent = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))
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

    return Workload(forward_backward, tuple(inputs))

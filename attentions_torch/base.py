"""The pipeline every layer shares: project, split heads, RoPE, attend, merge, project out.

A mechanism is a subclass: the dense ones differ only in their head counts and core
options (ALiBi's slopes); the sparse ones compute their pattern on tiles in their own
``attend`` (``sparse.py``). Shape legend: B batch, L query length, S key length (``S = L``
in self-attention, the context's length in cross-attention), H query heads, K kv heads,
D head width, E model width, C context width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import cache as kv_cache
from . import parallel
from ._validation import (
    validate_context,
    validate_heads,
    validate_input,
    validate_options,
    validate_rope_base,
)
from .functional import dot_product_attention, merge_heads, split_heads
from .masks import as_keep_mask
from .rope import apply_rope

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Dense softmax self-attention with ``num_heads`` query and ``num_kv_heads`` kv heads.

    The concrete classes fix the head counts and the pattern; see docs/semantics.md.
    Parameters: ``w_q`` (input_dim -> H*D), ``w_k``/``w_v`` (context_dim -> K*D; context_dim
    defaults to input_dim), ``w_o`` (E -> E), Xavier-uniform weights, zero biases.
    """

    positional = False
    """The mechanism's pattern or bias is defined on positions (local, dilated, block,
    ALiBi), so it cannot attend to a ``context`` (cross-attention); ``rope=True`` too."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        input_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        temperature: float = 1.0,
        rope: bool = False,
        rope_interleaved: bool = True,
        rope_base: float = 10000.0,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        d_head = validate_heads(d_model, num_heads, num_kv_heads)
        validate_options(
            input_dim=input_dim,
            dropout=dropout,
            temperature=temperature,
            rope=rope,
            d_head=d_head,
            context_dim=context_dim,
        )
        validate_rope_base(rope_base)
        self.d_model = d_model
        self.input_dim = d_model if input_dim is None else input_dim
        self.context_dim = self.input_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.d_head = d_head
        self.dropout = dropout
        self.temperature = temperature
        self.rope = rope
        self.rope_interleaved = rope_interleaved
        self.rope_base = float(rope_base)
        self.w_q = nn.Linear(self.input_dim, num_heads * d_head, bias=bias)
        self.w_k = nn.Linear(self.context_dim, num_kv_heads * d_head, bias=bias)
        self.w_v = nn.Linear(self.context_dim, num_kv_heads * d_head, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as the Flax twin initializes them."""
        for proj in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @property
    def scale(self) -> float:
        """Score scale ``1 / (sqrt(D) * temperature)``."""
        return 1.0 / (math.sqrt(self.d_head) * self.temperature)

    def project_heads(
        self, x: Tensor, source: Tensor, *, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q ``(B, H, L, D)`` from ``x``, k and v ``(B, K, S, D)`` from ``source`` (x itself
        in self-attention), RoPE applied at ``positions`` (``None``: ``0..L-1``; see
        ``rope.apply_rope``) when the layer has it. The head counts are read off the
        projections' widths (D each), so a projection holding a slice of the heads gives
        that slice."""
        q, k, v = self.w_q(x), self.w_k(source), self.w_v(source)
        for y in (q, k, v):
            if y.shape[-1] % self.d_head or not y.shape[-1]:
                raise ValueError(
                    f"{type(self).__name__}: a projection gives {y.shape[-1]} features, not "
                    f"whole heads of {self.d_head} (shard by heads with "
                    "attentions_torch.sharding.tensor_parallel)"
                )
        q, k, v = (split_heads(y, y.shape[-1] // self.d_head) for y in (q, k, v))
        if self.rope:
            rope = {"positions": positions, "base": self.rope_base}
            q = apply_rope(q, **rope, interleaved=self.rope_interleaved)
            k = apply_rope(k, **rope, interleaved=self.rope_interleaved)
        return q, k, v

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
        """Core attention on heads: q ``(B, H, L, D)``, k/v ``(B, K, S, D)``.

        ``mask`` is the caller's rank-4 keep-mask (or ``None``). The positions of the
        queries and keys (docs/semantics.md, "Positions"): ``None`` for ``0..L-1`` and
        ``0..S-1``, a start offset, or (dense mechanisms) integer tensors ``(L,)``/``(B, L)``
        and ``(S,)``/``(B, S)``; causal, the patterns and ALiBi are stated on them. RoPE is
        applied before, by the caller. Mechanisms with a pattern of their own override this
        with a compact kernel (``sparse.py``, ``linear.py``).
        """
        return dot_product_attention(
            q,
            k,
            v,
            mask,
            **self.core_options(q.device),
            is_causal=is_causal,
            scale=self.scale,
            dropout_p=self.dropout_p,
            need_weights=need_weights,
            query_positions=query_positions,
            key_positions=key_positions,
        )

    def validate_sharded(self, spec: parallel.SequenceParallel) -> None:
        """``ValueError`` for a sequence-parallel call this mechanism cannot make (before
        any communication); the dense family takes every layout."""

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
        """Core attention of this rank's shard to the sequence sharded over ``spec.group``
        (``attentions_torch.parallel``): q ``(B, H, Ll, D)``, k/v ``(B, K, Ll, D)`` at the
        global ``positions`` ``(Ll,)``; the dense family's ring."""
        return parallel.ring_attention(
            q,
            k,
            v,
            group=spec.group,
            layout=spec.layout,
            is_causal=is_causal,
            scale=self.scale,
            query_positions=positions,
            **self.core_options(q.device),
        )

    def local_heads(self) -> slice:
        """The query heads this module computes: all H, or under tensor parallelism
        (``attentions_torch.sharding``) this rank's contiguous block, read off ``w_q``'s
        weight, a DTensor sharded by rows. ALiBi takes these heads' slopes, and a mask with
        a head dimension these heads' rows."""
        weight = self.w_q.weight
        if type(weight) in (nn.Parameter, Tensor):  # no DTensor: spare importing its module
            return slice(0, self.num_heads)
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(weight, DTensor):
            return slice(0, self.num_heads)
        mesh, rows, start = weight.device_mesh, weight.shape[0], 0
        for dim, placement in enumerate(weight.placements):
            if isinstance(placement, Shard) and placement.dim == 0:
                rows //= mesh.size(dim)
                start += mesh.get_coordinate()[dim] * rows
        if weight.to_local().shape[0] != rows or start % self.d_head or rows % self.d_head:
            raise ValueError(
                f"{type(self).__name__}: w_q's rows must be split by whole heads of "
                f"{self.d_head}; this rank holds {weight.to_local().shape[0]} of "
                f"{weight.shape[0]} (shard with attentions_torch.sharding.tensor_parallel)"
            )
        return slice(start // self.d_head, (start + rows) // self.d_head)

    def core_options(self, device: torch.device) -> dict[str, Any]:
        """Extra keyword arguments of the core for this mechanism (ALiBi: its slopes)."""
        return {}

    @property
    def dropout_p(self) -> float:
        """The dropout rate in training, 0.0 in eval mode."""
        return self.dropout if self.training else 0.0

    def positional_name(self) -> str:
        """What makes this layer positional (for the cross-attention error), or ``""``."""
        name = type(self).__name__
        if self.positional:
            return name
        return f"{name} with rope=True" if self.rope else ""

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = True,
        sequence_parallel: dist.ProcessGroup | parallel.SequenceParallel | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Self-attention over ``x``, or cross-attention from ``x`` to ``context``.

        Args:
          x: ``(B, L, input_dim)``, the queries (and the keys and values without context).
          mask: keep-mask ``(L, S)``, ``(B, L, S)`` or broadcastable to ``(B, H, L, S)``;
            non-zero / ``True`` = may attend (``S = L`` without context).
          context: ``(B, S, context_dim)``: keys and values come from it (cross-attention;
            the mechanisms without positions only, and not with ``is_causal``).
          is_causal: also hide keys after the query.
          need_weights: return the ``(B, H, L, S)`` weights; ``False`` takes the fast path
            and returns ``None`` for them.
          sequence_parallel: a ``torch.distributed`` process group (or
            ``parallel.SequenceParallel(group, layout)``; a bare group is the contiguous
            layout): ``x`` is this rank's shard ``(B, L/N, input_dim)`` of a sequence
            sharded over the group's N ranks, and the layer attends to the whole sequence
            (the dense family by ring attention, local and block attention with their
            neighbours' keys, dilated by a ring over the residue classes, linear through
            its state: ``attentions_torch.parallel``; fast path only:
            ``need_weights=False``, no mask, context or dropout). Every rank calls the
            layer; out is the rank's shard ``(B, L/N, E)``.

        Returns:
          ``(out, weights)``: out ``(B, L, E)``, weights ``(B, H, L, S)`` or ``None``.
        """
        if sequence_parallel is not None:
            return self._forward_sharded(
                x,
                mask,
                context=context,
                is_causal=is_causal,
                need_weights=need_weights,
                spec=parallel.as_sequence_parallel(sequence_parallel),
            )
        validate_input(x.shape, self.input_dim)
        batch, length, _ = x.shape
        validate_context(
            None if context is None else context.shape,
            self.context_dim,
            batch,
            input_dim=self.input_dim,
            mechanism=self.positional_name(),
            is_causal=is_causal,
        )
        source = x if context is None else context
        keys = None if context is None else context.shape[1]
        keep = as_keep_mask(mask, batch, self.num_heads, length, keys)
        if keep is not None and keep.shape[1] > 1:
            keep = keep[:, self.local_heads()]
        q, k, v = self.project_heads(x, source)
        out, weights = self.attend(q, k, v, keep, is_causal=is_causal, need_weights=need_weights)
        return self.w_o(merge_heads(out)), weights

    def _forward_sharded(
        self,
        x: Tensor,
        mask: Tensor | None,
        *,
        context: Tensor | None,
        is_causal: bool,
        need_weights: bool,
        spec: parallel.SequenceParallel,
    ) -> tuple[Tensor, None]:
        """The call on this rank's shard ``x`` ``(B, Ll, input_dim)``: project, RoPE at the
        global positions, ring, project out. Everything is checked before any
        communication."""
        parallel.check_call(
            type(self).__name__,
            need_weights=need_weights,
            mask=mask,
            context=context,
            dropping=self.dropout_p > 0.0,
        )
        self.validate_sharded(spec)
        validate_input(x.shape, self.input_dim)
        shards = dist.get_world_size(spec.group)
        rank = dist.get_rank(spec.group)
        positions = parallel.shard_positions(rank, shards, x.shape[1], spec.layout)
        q, k, v = self.project_heads(x, x, positions=positions.to(x.device))
        out = self.attend_sharded(q, k, v, spec, is_causal=is_causal, positions=positions)
        return self.w_o(merge_heads(out)), None

    def cache_rule(self) -> kv_cache.CacheRule:
        """How this mechanism keeps and reads keys when decoding: dense, slot = position
        (``attentions_torch.cache``); local, dilated and block attention say otherwise."""
        return kv_cache.CacheRule()

    def init_cache(
        self,
        batch: int,
        max_length: int | None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> kv_cache.Cache:
        """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (``dtype``,
        ``device``: the parameters' unless given): a ``KVCache``, keys and values
        ``(B, K, S_max, D)`` and lengths ``(B,)`` int32, or for local and block attention a
        ``WindowCache`` of their last keys, for linear attention a ``LinearCache``
        (``max_length=None``: no limit for these three)."""
        return kv_cache.init_cache(self, batch, max_length, dtype=dtype, device=device)

    def decode(
        self, cache: kv_cache.Cache, x: Tensor, mask: Tensor | None = None
    ) -> tuple[kv_cache.Cache, Tensor]:
        """Causal attention of T new tokens ``x`` ``(B, T, input_dim)`` to the cache and to
        each other; ``mask`` ``(B, T)`` marks the real tokens (``None``: all).

        Returns ``(cache, out)``: the cache updated in place (the same object), out
        ``(B, T, E)``, zero for padded tokens. A prompt and then one token per call give the
        outputs of ``layer(x, is_causal=True)`` at the same positions. Writing past
        ``max_length`` raises ``ValueError``; under ``torch.compile`` an overflowing token's
        output is NaN instead (``attentions_torch.cache``). No dropout.

        Example::

            cache = attn.init_cache(batch=2, max_length=64)
            cache, out = attn.decode(cache, prompt, mask)      # (2, T, E)
            cache, out = attn.decode(cache, next_token)        # (2, 1, E)
        """
        return kv_cache.decode(self, cache, x, mask)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, rope={self.rope}"
            + (f", rope_base={self.rope_base}" if self.rope else "")
            + (f", context_dim={self.context_dim}" if self.context_dim != self.input_dim else "")
        )

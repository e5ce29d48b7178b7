"""The pipeline every layer shares: project, split heads, RoPE, attend, merge, project out.

The logic lives in ``Mechanism``, a plain class that knows no module system: its
configuration is the layer's attributes, its parameters are reached through two hooks
(``project`` and ``param_dtype``). A mechanism is a subclass (``MultiHead``, ``Local``,
...): the dense ones differ only in their head counts and core options (ALiBi's slopes);
the sparse ones compute their pattern on tiles in their own ``attend`` (``sparse.py``).
The Flax modules are thin shells over it: ``SelfAttention`` here (linen, each
mechanism's dataclass fields next to its mixin) and ``attentions_jax.nnx`` (NNX, built
from the same classes), so a mechanism is written once for both.

Shape legend: B batch, L query length, S key length (``S = L`` in self-attention, the
context's length in cross-attention), H query heads, K kv heads, D head width, E model
width, C context width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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

__all__ = ["PROJECTIONS", "Mechanism", "SelfAttention"]

PROJECTIONS = ("w_q", "w_k", "w_v", "w_o")
"""The parameter names, in the order of the pipeline (SPEC §5's weight layout)."""


def _option(default):
    """A keyword-only dataclass field, so subclasses can add required fields after it."""
    return dataclasses.field(default=default, kw_only=True)


class Mechanism:
    """What a layer computes, apart from how its module system holds the parameters.

    Reads the configuration from attributes the shell provides: ``d_model``,
    ``input_dim``, ``dropout``, ``bias``, ``temperature``, ``rope``, ``rope_interleaved``,
    ``rope_base``, ``context_dim`` and the mechanism's own (``num_heads``,
    ``window_size``, ...). The shell implements ``project`` (apply a named projection) and
    ``param_dtype``, and calls ``validate`` once it holds the configuration.
    """

    positional = False
    """The mechanism's pattern or bias is defined on positions (local, dilated, block,
    ALiBi), so it cannot attend to a ``context`` (cross-attention); ``rope=True`` too."""

    def validate(self) -> None:
        """``ValueError`` for a configuration no layer can have (SPEC §7)."""
        num_heads, num_kv_heads = self.head_counts()
        d_head = validate_heads(self.d_model, num_heads, num_kv_heads)
        validate_options(
            input_dim=self.input_dim,
            dropout=self.dropout,
            temperature=self.temperature,
            rope=self.rope,
            d_head=d_head,
            context_dim=self.context_dim,
        )
        validate_rope_base(self.rope_base)

    def head_counts(self) -> tuple[int, int]:
        """``(H, K)``: query heads and kv heads."""
        return self.num_heads, self.num_heads

    @property
    def d_head(self) -> int:
        return self.d_model // self.head_counts()[0]

    @property
    def scale(self) -> float:
        """Score scale ``1 / (sqrt(D) * temperature)``."""
        return 1.0 / (math.sqrt(self.d_head) * self.temperature)

    def features(self) -> dict[str, tuple[int, int]]:
        """``name -> (in, out)`` widths of the four projections."""
        num_heads, num_kv_heads = self.head_counts()
        input_dim = self.d_model if self.input_dim is None else self.input_dim
        context_dim = input_dim if self.context_dim is None else self.context_dim
        return {
            "w_q": (input_dim, num_heads * self.d_head),
            "w_k": (context_dim, num_kv_heads * self.d_head),
            "w_v": (context_dim, num_kv_heads * self.d_head),
            "w_o": (self.d_model, self.d_model),
        }

    def project(self, name: str, x: jax.Array) -> jax.Array:
        """The projection ``name`` (one of ``PROJECTIONS``) applied to ``x``; the shell's."""
        raise NotImplementedError

    def param_dtype(self) -> jnp.dtype:
        """The dtype of the parameters (a cache's default); the shell's."""
        raise NotImplementedError

    def core_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the core for this mechanism (ALiBi: its slopes)."""
        return {}

    def cache_rule(self) -> kv_cache.CacheRule:
        """How this mechanism keeps and reads keys when decoding: dense, slot = position
        (``attentions_jax.cache``); local, dilated and block attention say otherwise."""
        return kv_cache.CacheRule()

    def positional_name(self) -> str:
        """What makes this layer positional (for the cross-attention error), or ``""``."""
        name = type(self).__name__
        if self.positional:
            return name
        return f"{name} with rope=True" if self.rope else ""

    def project_heads(
        self, x: jax.Array, source: jax.Array, *, positions: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q ``(B, H, L, D)`` from ``x``, k and v ``(B, K, S, D)`` from ``source`` (x itself
        in self-attention), RoPE applied at ``positions`` (``None``: ``0..L-1``; see
        ``rope.apply_rope``) when the layer has it. The head counts are read off the
        projections' widths (D each), so a projection holding a slice of the heads gives
        that slice."""
        q, k, v = (
            self.project(name, y) for name, y in (("w_q", x), ("w_k", source), ("w_v", source))
        )
        q, k, v = (split_heads(y, y.shape[-1] // self.d_head) for y in (q, k, v))
        if self.rope:
            rope = {"positions": positions, "base": self.rope_base}
            q = apply_rope(q, **rope, interleaved=self.rope_interleaved)
            k = apply_rope(k, **rope, interleaved=self.rope_interleaved)
        return q, k, v

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
        """Core attention on heads: q ``(B, H, L, D)``, k/v ``(B, K, S, D)``.

        ``mask`` is the caller's rank-4 keep-mask (or ``None``); ``dropout_rng`` a key when
        dropout applies. The positions of the queries and keys (docs/semantics.md,
        "Positions"): ``None`` for ``0..L-1`` and ``0..S-1``, a start offset, or (dense
        mechanisms) integer arrays ``(L,)``/``(B, L)`` and ``(S,)``/``(B, S)``; causal,
        the patterns and ALiBi are stated on them. RoPE is applied before, by the caller.
        Mechanisms with a pattern of their own override this with a compact kernel
        (``sparse.py``, ``linear.py``).
        """
        return dot_product_attention(
            q,
            k,
            v,
            mask,
            **self.core_options(),
            is_causal=is_causal,
            scale=self.scale,
            dropout_rate=self.dropout,
            dropout_rng=dropout_rng,
            need_weights=need_weights,
            query_positions=query_positions,
            key_positions=key_positions,
        )

    def validate_sharded(self, spec: parallel.SequenceParallel) -> None:
        """``ValueError`` for a sequence-parallel call this mechanism cannot make (before
        any communication); the dense family takes every layout."""

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
        """Core attention of this device's shard to the sequence sharded over
        ``spec.axis`` (``attentions_jax.parallel``): q ``(B, H, Ll, D)``, k/v
        ``(B, K, Ll, D)`` at the global ``positions`` ``(Ll,)``; the dense family's ring."""
        return parallel.ring_attention(
            q,
            k,
            v,
            axis=spec.axis,
            layout=spec.layout,
            is_causal=is_causal,
            scale=self.scale,
            query_positions=positions,
            **self.core_options(),
        )

    def forward(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        context: jax.Array | None,
        is_causal: bool,
        need_weights: bool,
        dropout_rng: jax.Array | None,
        sequence_parallel: str | parallel.SequenceParallel | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The layer's call (see ``SelfAttention.__call__``), dropout drawn from
        ``dropout_rng`` when it is given."""
        if sequence_parallel is not None:
            return self._forward_sharded(
                x,
                mask,
                context=context,
                is_causal=is_causal,
                need_weights=need_weights,
                dropping=dropout_rng is not None,
                spec=parallel.as_sequence_parallel(sequence_parallel),
            )
        num_heads = self.head_counts()[0]
        input_dim = self.d_model if self.input_dim is None else self.input_dim
        validate_input(x.shape, input_dim)
        batch, length, _ = x.shape
        validate_context(
            None if context is None else context.shape,
            input_dim if self.context_dim is None else self.context_dim,
            batch,
            input_dim=input_dim,
            mechanism=self.positional_name(),
            is_causal=is_causal,
        )
        source = x if context is None else context
        keys = None if context is None else context.shape[1]
        keep = as_keep_mask(mask, batch, num_heads, length, keys)
        q, k, v = self.project_heads(x, source)
        out, weights = self.attend(
            q, k, v, keep, is_causal=is_causal, need_weights=need_weights, dropout_rng=dropout_rng
        )
        return self.project("w_o", merge_heads(out)), weights

    def _forward_sharded(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        context: jax.Array | None,
        is_causal: bool,
        need_weights: bool,
        dropping: bool,
        spec: parallel.SequenceParallel,
    ) -> tuple[jax.Array, None]:
        """The call on this device's shard ``x`` ``(B, Ll, input_dim)`` (inside
        ``shard_map``): project, RoPE at the global positions, ring, project out."""
        parallel.check_call(
            type(self).__name__,
            need_weights=need_weights,
            mask=mask,
            context=context,
            dropping=dropping,
        )
        self.validate_sharded(spec)
        validate_input(x.shape, self.d_model if self.input_dim is None else self.input_dim)
        shards = jax.lax.axis_size(spec.axis)
        rank = jax.lax.axis_index(spec.axis)
        positions = parallel.shard_positions(rank, shards, x.shape[1], spec.layout)
        q, k, v = self.project_heads(x, x, positions=positions)
        out = self.attend_sharded(q, k, v, spec, is_causal=is_causal, positions=positions)
        return self.project("w_o", merge_heads(out)), None

    def init_cache(
        self, batch: int, max_length: int | None, *, dtype: jnp.dtype | None = None
    ) -> kv_cache.Cache:
        """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (``dtype``:
        the parameters' unless given): a ``KVCache``, keys and values ``(B, K, S_max, D)``
        and lengths ``(B,)`` int32, or for local and block attention a ``WindowCache`` of
        their last keys, for linear attention a ``LinearCache`` (``max_length=None``: no
        limit for these three).

        linen: ``apply(variables, batch, max_length, method="init_cache")``; NNX:
        ``layer.init_cache(batch, max_length)``.
        """
        return kv_cache.init_cache(self, batch, max_length, dtype=dtype)

    def decode(
        self, cache: kv_cache.Cache, x: jax.Array, mask: jax.Array | None = None
    ) -> tuple[kv_cache.Cache, jax.Array]:
        """Causal attention of T new tokens ``x`` ``(B, T, input_dim)`` to the cache and to
        each other; ``mask`` ``(B, T)`` marks the real tokens (``None``: all).

        linen: ``apply(variables, cache, x, mask, method="decode")``; NNX:
        ``layer.decode(cache, x, mask)``. Jit-able, and a ``lax.scan`` body. Returns
        ``(cache, out)``: the new cache, out ``(B, T, E)``, zero for padded tokens. A prompt
        and then one token per call give the outputs of ``layer(x, is_causal=True)`` at
        the same positions. Writing past ``max_length`` raises ``ValueError`` when the
        lengths are concrete; under ``jax.jit`` an overflowing token's output is NaN
        instead (``attentions_jax.cache``). No dropout.

        Example::

            cache = attn.apply(variables, 2, 64, method="init_cache")
            cache, out = attn.apply(variables, cache, prompt, mask, method="decode")
            cache, out = attn.apply(variables, cache, next_token, method="decode")
        """
        return kv_cache.decode(self, cache, x, mask)


class SelfAttention(Mechanism, nn.Module):
    """The linen shell: dense softmax self-attention; subclasses fix the head counts and
    the pattern.

    Parameters: ``w_q`` (input_dim -> H*D), ``w_k``/``w_v`` (context_dim -> K*D; context_dim
    defaults to input_dim), ``w_o`` (E -> E) as ``nn.Dense``, Xavier-uniform kernels, zero
    biases.
    """

    d_model: int
    input_dim: int | None = _option(None)
    dropout: float = _option(0.0)
    bias: bool = _option(False)
    temperature: float = _option(1.0)
    rope: bool = _option(False)
    rope_interleaved: bool = _option(True)
    rope_base: float = _option(10000.0)
    context_dim: int | None = _option(None)

    def __post_init__(self) -> None:
        self.validate()
        super().__post_init__()

    def setup(self) -> None:
        for name, (_, features) in self.features().items():
            dense = nn.Dense(
                features,
                use_bias=self.bias,
                kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.zeros,
            )
            setattr(self, name, dense)

    def project(self, name: str, x: jax.Array) -> jax.Array:
        return getattr(self, name)(x)

    def param_dtype(self) -> jnp.dtype:
        return self.variables["params"]["w_q"]["kernel"].dtype

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        context: jax.Array | None = None,
        is_causal: bool = False,
        need_weights: bool = True,
        deterministic: bool = True,
        sequence_parallel: str | parallel.SequenceParallel | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Self-attention over ``x``, or cross-attention from ``x`` to ``context``.

        Args:
          x: ``(B, L, input_dim)``, the queries (and the keys and values without context).
          mask: keep-mask ``(L, S)``, ``(B, L, S)`` or broadcastable to ``(B, H, L, S)``;
            non-zero / ``True`` = may attend (``S = L`` without context).
          context: ``(B, S, context_dim)``: keys and values come from it (cross-attention;
            the mechanisms without positions only, and not with ``is_causal``).
          is_causal: also hide keys after the query (static under ``jax.jit``).
          need_weights: return the ``(B, H, L, S)`` weights; ``False`` takes the fast path
            and returns ``None`` for them (static under ``jax.jit``).
          deterministic: no dropout; otherwise draws from the ``"dropout"`` rng stream.
          sequence_parallel: a mesh axis name (or ``parallel.SequenceParallel(axis,
            layout)``): inside ``jax.shard_map``, ``x`` is this device's shard
            ``(B, L/N, input_dim)`` of a sequence sharded over that axis, and the layer
            attends to the whole sequence: the dense family by ring attention, local and
            block attention with their neighbours' keys, dilated by a ring over the
            residue classes, linear through its state (``attentions_jax.parallel``; fast
            path only: ``need_weights=False``, no mask, context or dropout).

        Returns:
          ``(out, weights)``: out ``(B, L, E)``, weights ``(B, H, L, S)`` or ``None``.
        """
        dropping = not deterministic and self.dropout > 0.0
        return self.forward(
            x,
            mask,
            context=context,
            is_causal=is_causal,
            need_weights=need_weights,
            dropout_rng=self.make_rng("dropout") if dropping else None,
            sequence_parallel=sequence_parallel,
        )

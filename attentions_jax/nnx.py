"""Flax NNX layers: the same mechanisms as the linen ones, as ``nnx.Module`` (SPEC §12).

Each class here is a thin shell: the mechanism (its pattern, tiling, core options, cache
rule, validation) is the mixin its linen twin uses (``attentions_jax.base.Mechanism`` and
the per-mechanism ``*Mechanism`` classes), and the constructor arguments are read from the
linen twin's dataclass fields, so nothing is written twice. What the shell adds is how NNX
holds things:

* parameters: ``w_q``, ``w_k``, ``w_v``, ``w_o`` as ``nnx.Linear`` (Xavier-uniform kernels,
  zero biases), so ``nnx.state(layer, nnx.Param)`` has the tree of the linen ``params``
  (``w_q.kernel``, ``w_q.bias``, ...) and ``parity.torch_to_nnx`` / ``nnx.update`` move
  weights in;
* dropout by NNX convention: a layer starts in training mode like ``nnx.Dropout``
  (``layer.eval()`` / ``layer.train()``, or ``nnx.view(layer, deterministic=True)``);
  a call's ``deterministic=`` overrides the mode. Keys come from the ``rngs`` given at
  construction (its ``dropout`` stream, else ``default``), or from a call's ``rngs=``;
* decoding: ``layer.init_cache(batch, max_length)`` and ``layer.decode(cache, x, mask)``,
  the same functions as linen's ``apply(..., method=...)``.

Example::

    from flax import nnx
    from attentions_jax.nnx import MultiHeadSelfAttention

    attn = MultiHeadSelfAttention(d_model=128, num_heads=8, rngs=nnx.Rngs(0))
    out, weights = attn(x)                      # (4, 512, 128), (4, 8, 512, 512)
    out, _ = nnx.jit(lambda m, x: m(x, is_causal=True, need_weights=False))(attn, x)

Shape legend: B batch, L query length, S key length, H query heads, E model width.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from . import alibi, block, dilated, grouped, linear, local, multi_head, rotary, vanilla
from . import base as linen_base
from .base import Mechanism
from .parallel import SequenceParallel

__all__ = [
    "ALiBiSelfAttention",
    "AlibiSelfAttention",
    "BlockSelfAttention",
    "DilatedSelfAttention",
    "GroupedSelfAttention",
    "LinearSelfAttention",
    "LocalSelfAttention",
    "MultiHeadSelfAttention",
    "RotarySelfAttention",
    "SelfAttention",
    "VanillaSelfAttention",
]

_NOT_ARGUMENTS = ("parent", "name")
"""linen's own dataclass fields, not constructor arguments of a layer."""


def _arguments(twin: type[nn.Module]) -> list[inspect.Parameter]:
    """The linen twin's constructor arguments (its dataclass fields), in ``__init__`` order."""
    signature = inspect.signature(twin.__init__)
    return [
        parameter
        for name, parameter in signature.parameters.items()
        if name != "self" and name not in _NOT_ARGUMENTS
    ]


class SelfAttention(Mechanism, nnx.Module):
    """The NNX shell: dense softmax attention; subclasses name their linen twin.

    ``Subclass(*args, rngs=nnx.Rngs(0), **options)`` takes the twin's arguments (the same
    names, order and defaults) plus ``rngs``, which draws the parameters (``params``
    stream) and, when ``dropout > 0``, is kept for dropout keys.
    """

    twin: ClassVar[type[linen_base.SelfAttention]] = linen_base.SelfAttention
    """The linen class whose fields are this class's constructor arguments."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # ``inspect.signature(cls)`` shows the twin's arguments plus ``rngs``
        rngs = inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY, annotation="nnx.Rngs")
        cls.__signature__ = inspect.Signature([*_arguments(cls.twin), rngs])

    def __init__(self, *args: Any, rngs: nnx.Rngs, **kwargs: Any) -> None:
        config = inspect.Signature(_arguments(self.twin)).bind(*args, **kwargs)
        config.apply_defaults()
        for name, value in config.arguments.items():
            setattr(self, name, value)
        self.validate()
        for name, (fan_in, fan_out) in self.features().items():
            layer = nnx.Linear(
                fan_in,
                fan_out,
                use_bias=self.bias,
                kernel_init=nnx.initializers.xavier_uniform(),
                bias_init=nnx.initializers.zeros_init(),
                rngs=rngs,
            )
            setattr(self, name, layer)
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if self.dropout > 0.0 else nnx.data(None)

    def project(self, name: str, x: jax.Array) -> jax.Array:
        return getattr(self, name)(x)

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view(model, deterministic=...)`` sets the mode, as on ``nnx.Dropout``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def param_dtype(self) -> jnp.dtype:
        return self.w_q.kernel[...].dtype

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        context: jax.Array | None = None,
        is_causal: bool = False,
        need_weights: bool = True,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
        sequence_parallel: str | SequenceParallel | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Self-attention over ``x``, or cross-attention from ``x`` to ``context``: the
        arguments and results of the linen call (``attentions_jax.SelfAttention.__call__``;
        ``is_causal`` and ``need_weights`` static under ``nnx.jit``), but for dropout:

        Args:
          deterministic: no dropout; ``None``: the layer's mode (``train()``/``eval()``).
          rngs: where this call's dropout key comes from; ``None``: the layer's ``rngs``.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        dropping = not deterministic and self.dropout > 0.0
        return self.forward(
            x,
            mask,
            context=context,
            is_causal=is_causal,
            need_weights=need_weights,
            dropout_rng=self._dropout_key(rngs) if dropping else None,
            sequence_parallel=sequence_parallel,
        )

    def _dropout_key(self, rngs: nnx.Rngs | nnx.RngStream | jax.Array | None) -> jax.Array:
        """A key for this call's dropout, from ``rngs`` or the layer's stream."""
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs["dropout"]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise ValueError(
            f"{type(self).__name__}: dropout={self.dropout} in training mode needs a key: "
            "pass rngs (an nnx.Rngs, an RngStream or a key) to the call, or call "
            "layer.eval() / deterministic=True for no dropout"
        )


class VanillaSelfAttention(vanilla.VanillaMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.VanillaSelfAttention``: one head as wide as the model."""

    twin = vanilla.VanillaSelfAttention


class MultiHeadSelfAttention(SelfAttention):
    """NNX twin of ``attentions_jax.MultiHeadSelfAttention``: dense, H heads."""

    twin = multi_head.MultiHeadSelfAttention


class GroupedSelfAttention(grouped.GroupedMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.GroupedSelfAttention``: GQA (MQA with one kv head)."""

    twin = grouped.GroupedSelfAttention


class ALiBiSelfAttention(alibi.ALiBiMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.ALiBiSelfAttention``: dense plus ``-m_h·|p_i - s_j|``."""

    twin = alibi.ALiBiSelfAttention


AlibiSelfAttention = ALiBiSelfAttention


class RotarySelfAttention(SelfAttention):
    """NNX twin of ``attentions_jax.RotarySelfAttention``: dense, RoPE on q and k."""

    twin = rotary.RotarySelfAttention


class LocalSelfAttention(local.LocalMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.LocalSelfAttention``: a sliding window, on tiles."""

    twin = local.LocalSelfAttention


class DilatedSelfAttention(dilated.DilatedMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.DilatedSelfAttention``: residue classes, on tiles."""

    twin = dilated.DilatedSelfAttention


class BlockSelfAttention(block.BlockMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.BlockSelfAttention``: fixed blocks, on tiles."""

    twin = block.BlockSelfAttention


class LinearSelfAttention(linear.LinearMechanism, SelfAttention):
    """NNX twin of ``attentions_jax.LinearSelfAttention``: the ``phi(q)·phi(k)`` kernel."""

    twin = linear.LinearSelfAttention

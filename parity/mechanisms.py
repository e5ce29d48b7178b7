"""The one registry of mechanisms: the parity report, the benchmark and the tests read it.

One row per mechanism: its registry name, its class name (the same in both packages),
the pattern it computes, and two configurations: a small one for the parity report and
the tests (its sequence length, 13, is a multiple of no window, block or rate here) and
the benchmark's size (d_model 512, 8 heads, window 64, block 64, rate 4, 2 kv heads).
Adding a mechanism touches this file only.

The packages are imported when a layer is built, so the registry itself imports with
either framework alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DENSE_LENGTHS",
    "LONG_LENGTHS",
    "MECHANISMS",
    "PATTERNS",
    "Mechanism",
    "by_name",
]

DENSE_LENGTHS = (256, 512, 1024, 2048, 4096)
LONG_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)

PATTERNS = {
    "dense": None,
    "alibi": None,
    "rope": None,
    "local": "window_size",
    "dilated": "dilation_rate",
    "block": "block_size",
    "linear": None,
}
"""Each pattern and the constructor argument that sizes it (``None``: no size).

``dense``: every key; ``alibi``: dense plus the ALiBi bias; ``rope``: dense, RoPE on q and
k; ``local``: ``|i - j| <= size // 2``; ``dilated``: ``(i - j) % size == 0``; ``block``:
``i // size == j // size``; ``linear``: kernel attention (no softmax).
"""


@dataclass(frozen=True)
class Mechanism:
    """One mechanism of the registry.

    Attributes:
      name: registry name (``"multi_head"``), used on command lines and in test ids.
      class_name: the class in both packages (``"MultiHeadSelfAttention"``).
      kwargs: the small constructor arguments of the parity report and the tests.
      bench_kwargs: the constructor arguments at the benchmark's size.
      pattern: one of ``PATTERNS``.
      bench_lengths: the benchmark's default sequence lengths.
    """

    name: str
    class_name: str
    kwargs: Mapping[str, Any]
    bench_kwargs: Mapping[str, Any]
    pattern: str = "dense"
    bench_lengths: tuple[int, ...] = DENSE_LENGTHS

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {list(PATTERNS)}, got {self.pattern!r}")

    @property
    def size_argument(self) -> str | None:
        """The constructor argument that sizes the pattern (``"window_size"``), or ``None``."""
        return PATTERNS[self.pattern]

    def size(self, kwargs: Mapping[str, Any] | None = None) -> int:
        """The pattern's size in ``kwargs`` (default: the small ones); 0 when it has none."""
        kwargs = self.kwargs if kwargs is None else kwargs
        return kwargs[self.size_argument] if self.size_argument else 0

    def head_counts(self, kwargs: Mapping[str, Any] | None = None) -> tuple[int, int]:
        """``(H, K)``: query and kv heads in ``kwargs`` (one head when none is named)."""
        kwargs = self.kwargs if kwargs is None else kwargs
        heads = kwargs.get("num_heads", kwargs.get("num_query_heads", 1))
        return heads, kwargs.get("num_kv_heads", heads)

    @property
    def softmax(self) -> bool:
        return self.pattern != "linear"

    @property
    def cross_attention(self) -> bool:
        """Whether the mechanism attends to a ``context`` (no positions: dense, linear)."""
        return self.pattern in ("dense", "linear")

    def available(self, framework: str) -> bool:
        """Whether the package of ``framework`` (``"torch"`` or ``"jax"``) defines the class."""
        return hasattr(_package(framework), self.class_name)

    def layer_class(self, framework: str) -> type:
        return getattr(_package(framework), self.class_name)

    def torch_layer(self, **overrides: Any):
        """The PyTorch layer with the small configuration (``overrides`` replace entries)."""
        return self.layer_class("torch")(**{**self.kwargs, **overrides})

    def flax_layer(self, **overrides: Any):
        """The Flax layer with the small configuration (``overrides`` replace entries)."""
        return self.layer_class("jax")(**{**self.kwargs, **overrides})

    def nnx_layer(self, *, seed: int = 0, **overrides: Any):
        """The Flax NNX layer (``attentions_jax.nnx``) with the small configuration, its
        parameters drawn from ``nnx.Rngs(seed)``."""
        from flax import nnx

        cls = getattr(importlib.import_module("attentions_jax.nnx"), self.class_name)
        return cls(**{**self.kwargs, **overrides}, rngs=nnx.Rngs(seed))


def _package(framework: str):
    if framework not in ("torch", "jax"):
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    return importlib.import_module(f"attentions_{framework}")


def _dense(heads: int = 8) -> dict[str, Any]:
    return {"d_model": 512, "num_heads": heads}


MECHANISMS: tuple[Mechanism, ...] = (
    Mechanism("vanilla", "VanillaSelfAttention", {"d_model": 32}, {"d_model": 512}),
    Mechanism("multi_head", "MultiHeadSelfAttention", {"d_model": 32, "num_heads": 4}, _dense()),
    Mechanism(
        "grouped",
        "GroupedSelfAttention",
        {"d_model": 32, "num_query_heads": 4, "num_kv_heads": 2},
        {"d_model": 512, "num_query_heads": 8, "num_kv_heads": 2},
    ),
    Mechanism("alibi", "ALiBiSelfAttention", {"d_model": 48, "num_heads": 6}, _dense(), "alibi"),
    Mechanism("rotary", "RotarySelfAttention", {"d_model": 32, "num_heads": 4}, _dense(), "rope"),
    Mechanism(
        "local",
        "LocalSelfAttention",
        {"d_model": 32, "window_size": 5, "num_heads": 4},
        {**_dense(), "window_size": 64},
        "local",
        LONG_LENGTHS,
    ),
    Mechanism(
        "dilated",
        "DilatedSelfAttention",
        {"d_model": 32, "dilation_rate": 3, "num_heads": 4},
        {**_dense(), "dilation_rate": 4},
        "dilated",
        LONG_LENGTHS,
    ),
    Mechanism(
        "block",
        "BlockSelfAttention",
        {"d_model": 32, "block_size": 4, "num_heads": 4},
        {**_dense(), "block_size": 64},
        "block",
        LONG_LENGTHS,
    ),
    Mechanism(
        "linear",
        "LinearSelfAttention",
        {"d_model": 32, "num_heads": 4},
        _dense(),
        "linear",
        LONG_LENGTHS,
    ),
)


def by_name(name: str) -> Mechanism:
    """The registry row called ``name``; ``ValueError`` listing the names otherwise."""
    for mechanism in MECHANISMS:
        if mechanism.name == name:
            return mechanism
    raise ValueError(f"unknown mechanism {name!r}; expected one of {[m.name for m in MECHANISMS]}")

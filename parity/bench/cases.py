"""The benchmark table: one row per mechanism, at the benchmark's size.

A row names the class (the same in both packages), its constructor arguments at the big
size of issue 6 (d_model=512, 8 heads, window 64, block 64, rate 4, 2 kv heads), the
pattern the fused references must reproduce, and the default lengths. A class that a
package does not define yet is skipped with a note, so a mechanism plugs in by its row.

Shape legend: B batch, L length, H query heads, K kv heads, D head width, E model width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CASES",
    "DENSE_LENGTHS",
    "LONG_LENGTHS",
    "BenchCase",
    "alibi_slopes",
    "by_name",
    "visible_pairs",
]

DENSE_LENGTHS = (256, 512, 1024, 2048, 4096)
LONG_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class BenchCase:
    """One mechanism at benchmark size.

    ``pattern`` is what the mechanism computes, for the references and the FLOP count:
    ``"dense"``, ``"alibi"`` (dense plus the ALiBi bias), ``"rope"`` (dense, RoPE on q and
    k), ``"local"``/``"dilated"``/``"block"`` (a keep pattern with parameter ``size``), or
    ``"linear"`` (kernel attention: no softmax reference computes it).
    """

    name: str
    class_name: str
    kwargs: Mapping[str, Any]
    pattern: str = "dense"
    size: int = 0
    lengths: tuple[int, ...] = DENSE_LENGTHS

    def constructor_kwargs(self, d_model: int | None = None) -> dict[str, Any]:
        """The constructor arguments, with ``d_model`` replaced when given."""
        kwargs = dict(self.kwargs)
        if d_model is not None:
            kwargs["d_model"] = d_model
        return kwargs

    def head_counts(self) -> tuple[int, int]:
        """``(H, K)`` read from the constructor arguments (one head when none is named)."""
        heads = self.kwargs.get("num_heads", self.kwargs.get("num_query_heads", 1))
        return heads, self.kwargs.get("num_kv_heads", heads)

    @property
    def softmax(self) -> bool:
        return self.pattern != "linear"


CASES: tuple[BenchCase, ...] = (
    BenchCase("vanilla", "VanillaSelfAttention", {"d_model": 512}),
    BenchCase("multi_head", "MultiHeadSelfAttention", {"d_model": 512, "num_heads": 8}),
    BenchCase(
        "grouped",
        "GroupedSelfAttention",
        {"d_model": 512, "num_query_heads": 8, "num_kv_heads": 2},
    ),
    BenchCase("alibi", "ALiBiSelfAttention", {"d_model": 512, "num_heads": 8}, "alibi"),
    BenchCase("rotary", "RotarySelfAttention", {"d_model": 512, "num_heads": 8}, "rope"),
    BenchCase(
        "local",
        "LocalSelfAttention",
        {"d_model": 512, "window_size": 64, "num_heads": 8},
        "local",
        64,
        LONG_LENGTHS,
    ),
    BenchCase(
        "dilated",
        "DilatedSelfAttention",
        {"d_model": 512, "dilation_rate": 4, "num_heads": 8},
        "dilated",
        4,
        LONG_LENGTHS,
    ),
    BenchCase(
        "block",
        "BlockSelfAttention",
        {"d_model": 512, "block_size": 64, "num_heads": 8},
        "block",
        64,
        LONG_LENGTHS,
    ),
    BenchCase(
        "linear",
        "LinearSelfAttention",
        {"d_model": 512, "num_heads": 8},
        "linear",
        0,
        LONG_LENGTHS,
    ),
)


def by_name(name: str) -> BenchCase:
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown mechanism {name!r}; expected one of {[c.name for c in CASES]}")


def _group_sizes(length: int, count: int, size: int) -> np.ndarray:
    """Sizes of ``count`` groups of ``length`` positions (blocks or residue classes)."""
    return np.array([len(range(g * size, min((g + 1) * size, length))) for g in range(count)])


def _pairs_in_groups(sizes: np.ndarray, is_causal: bool) -> int:
    """q·k pairs when every group attends within itself (n² or n(n+1)/2 per group)."""
    sizes = sizes.astype(np.int64)
    return int((sizes * (sizes + 1) // 2).sum() if is_causal else (sizes * sizes).sum())


def visible_pairs(pattern: str, size: int, length: int, is_causal: bool = False) -> int:
    """How many (query, key) pairs the pattern lets through at length ``length``.

    The count the useful FLOPs are made of: dense ``L²`` (``L(L+1)/2`` causal), local
    ``≈ L·(w+1)``, dilated ``≈ L²/r``, block ``≈ L·b``. ``"linear"`` has no pairs.
    """
    if pattern in ("dense", "alibi", "rope"):
        return length * (length + 1) // 2 if is_causal else length * length
    if pattern == "local":
        queries = np.arange(length, dtype=np.int64)
        last = queries if is_causal else np.minimum(queries + size // 2, length - 1)
        return int((last - np.maximum(queries - size // 2, 0) + 1).sum())
    if pattern == "dilated":
        # residue class c holds positions c, c + r, ...: a dense group of its own
        sizes = np.array([len(range(c, length, size)) for c in range(min(size, length))])
        return _pairs_in_groups(sizes, is_causal)
    if pattern == "block":
        return _pairs_in_groups(_group_sizes(length, -(-length // size), size), is_causal)
    if pattern == "linear":
        return 0
    raise ValueError(f"unknown pattern {pattern!r}")


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi slopes per SPEC §2, written independently of the packages (for the reference).

    For H a power of two ``2 ** (-8 h / H)``, h = 1..H; otherwise the P slopes of the
    largest power of two P below H, then ``2 ** (-4 k / P)`` for k = 1, 3, 5, ...
    """
    power = 1 << (heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * h / power) for h in range(1, power + 1)]
    slopes += [2.0 ** (-4.0 * k / power) for k in range(1, 2 * (heads - power), 2)]
    return np.array(slopes[:heads])

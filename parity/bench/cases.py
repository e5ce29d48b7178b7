"""What the references and the FLOP counts need of a pattern, written apart from the packages.

The mechanisms themselves are listed once, in ``parity.mechanisms.MECHANISMS`` (their
benchmark size is ``bench_kwargs``, their default lengths ``bench_lengths``); this module
only counts the (query, key) pairs a pattern lets through and gives the ALiBi slopes, each
written independently of ``attentions_torch``/``attentions_jax`` so that the references
check the layers rather than repeat them.

Shape legend: B batch, L length, H query heads, K kv heads, D head width, E model width.
"""

from __future__ import annotations

import numpy as np

__all__ = ["alibi_slopes", "visible_pairs"]


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
    """ALiBi slopes as docs/semantics.md states them, written apart from the packages.

    For H a power of two ``2 ** (-8 h / H)``, h = 1..H; otherwise the P slopes of the
    largest power of two P below H, then ``2 ** (-4 k / P)`` for k = 1, 3, 5, ...
    """
    power = 1 << (heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * h / power) for h in range(1, power + 1)]
    slopes += [2.0 ** (-4.0 * k / power) for k in range(1, 2 * (heads - power), 2)]
    return np.array(slopes[:heads])

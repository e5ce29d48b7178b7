"""Keep-mask builders (docs/semantics.md, "Masks"): ``True`` means "may attend".

Shape legend (the whole project): B batch, L length, H query heads, K kv heads,
D head width, E model width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import validate_mask, validate_positive

__all__ = [
    "as_keep_mask",
    "block_mask",
    "causal_mask",
    "combine_masks",
    "dilated_mask",
    "local_mask",
    "padding_mask",
]


def window_keep(queries: Tensor, keys: Tensor, window_size: int) -> Tensor:
    """Local attention's rule on positions (broadcasting): ``abs(i - j) <= window_size // 2``.

    The one statement of the pattern: ``local_mask`` and the local tiles both use it.
    """
    return abs(queries - keys) <= window_size // 2


def dilation_keep(queries: Tensor, keys: Tensor, dilation_rate: int) -> Tensor:
    """Dilated attention's rule on positions: ``(i - j) % dilation_rate == 0``."""
    return (queries - keys) % dilation_rate == 0


def block_keep(queries: Tensor, keys: Tensor, block_size: int) -> Tensor:
    """Block attention's rule on positions: ``i // block_size == j // block_size``."""
    return queries // block_size == keys // block_size


def _positions(length: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Query positions ``(L, 1)`` and key positions ``(1, L)`` of a self-attention call."""
    pos = torch.arange(length, device=device)
    return pos[:, None], pos[None, :]


def causal_mask(length: int, device: torch.device | str | None = None) -> Tensor:
    """``(L, L)``: key j visible from query i iff ``j <= i``."""
    queries, keys = _positions(length, device)
    return keys <= queries


def padding_mask(lengths: Tensor, length: int) -> Tensor:
    """``(B, 1, 1, L)`` key-padding mask from the true lengths ``(B,)`` of each sequence."""
    pos = torch.arange(length, device=lengths.device)
    return (pos[None, :] < lengths[:, None])[:, None, None, :]


def local_mask(length: int, window_size: int, device: torch.device | str | None = None) -> Tensor:
    """``(L, L)``: visible iff ``abs(i - j) <= window_size // 2``."""
    validate_positive("window_size", window_size)
    return window_keep(*_positions(length, device), window_size)


def dilated_mask(
    length: int, dilation_rate: int, device: torch.device | str | None = None
) -> Tensor:
    """``(L, L)``: visible iff ``(i - j) % dilation_rate == 0``."""
    validate_positive("dilation_rate", dilation_rate)
    return dilation_keep(*_positions(length, device), dilation_rate)


def block_mask(length: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """``(L, L)``: visible iff ``i // block_size == j // block_size``."""
    validate_positive("block_size", block_size)
    return block_keep(*_positions(length, device), block_size)


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """AND of the given keep-masks (broadcasting), skipping ``None``; ``None`` if all are."""
    kept = [m for m in masks if m is not None]
    if not kept:
        return None
    out = kept[0].bool()
    for m in kept[1:]:
        out = out & m.bool()
    return out


def as_keep_mask(
    mask: Tensor | None, batch: int, heads: int, length: int, keys: int | None = None
) -> Tensor | None:
    """Validate a user mask and return it as a rank-4 bool keep-mask.

    Accepts ``(L, S)``, ``(B, L, S)`` or rank 4 broadcastable to ``(B, H, L, S)``
    (``keys = S``, ``None`` for self-attention, ``S = L``); any non-zero number counts as
    "keep", so a 0/1 float mask such as ``torch.tril(torch.ones(L, L))`` works.
    """
    if mask is None:
        return None
    validate_mask(mask.shape, batch, heads, length, keys)
    keep = mask if mask.dtype == torch.bool else mask != 0
    if keep.dim() == 2:
        return keep[None, None]
    if keep.dim() == 3:
        return keep[:, None]
    return keep

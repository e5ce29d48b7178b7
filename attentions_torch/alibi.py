"""ALiBi self-attention (Press et al. 2022): dense, plus the bias ``-m_h * abs(i - j)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._validation import validate_positive
from .base import SelfAttention

__all__ = ["ALiBiSelfAttention", "AlibiSelfAttention", "alibi_slopes"]


def _power_of_two_slopes(heads: int) -> list[float]:
    """``2 ** (-8 h / H)`` for h = 1..H."""
    return [2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)]


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> Tensor:
    """``(H,)`` float64 slopes m_h of the ALiBi paper, for any head count.

    H a power of two: ``2 ** (-8 h / H)`` for h = 1..H. Otherwise, with P the largest power
    of two below H: the P slopes for P, then ``2 ** (-4 k / P)`` for k = 1, 3, 5, ... (every
    other slope for 2P) until there are H; not the power-of-two slopes repeated.
    """
    validate_positive("num_heads", num_heads)
    base = 1 << (num_heads.bit_length() - 1)  # the largest power of two <= H
    slopes = _power_of_two_slopes(base) + _power_of_two_slopes(2 * base)[0::2]
    return torch.tensor(slopes[:num_heads], dtype=torch.float64, device=device)


class ALiBiSelfAttention(SelfAttention):
    """Multi-head self-attention with linear biases: scores
    ``q·k / (sqrt(D) * temperature) - m_h * abs(p_i - s_j)`` on the positions of query i
    and key j (``0..L-1`` in a self-attention call).

    The bias is made per call from positions for the length at hand, so any L works and
    the state_dict holds only the projections. Complexity: O(L² · E) time; the fast path
    (``need_weights=False``) calls ``F.scaled_dot_product_attention`` with the bias as a
    strided ``(1, H, L, L)`` view of ``H · (2L − 1)`` values, O(H · L) memory; with a mask,
    on ``QUERY_CHUNK`` queries at a time, O(H · chunk · L) memory.

    Example::

        attn = ALiBiSelfAttention(d_model=128, num_heads=12)
        out, weights = attn(torch.randn(4, 512, 128))   # (4, 512, 128), (4, 12, 512, 512)
    """

    positional = True

    def __init__(self, d_model: int, num_heads: int, **options: Any) -> None:
        super().__init__(d_model, num_heads, num_heads, **options)

    def core_options(self, device: torch.device) -> dict[str, Any]:
        """The ALiBi slopes of the heads this module computes (all of them, or this rank's
        under tensor parallelism), handed to the core."""
        return {"alibi_slopes": alibi_slopes(self.num_heads, device)[self.local_heads()]}


AlibiSelfAttention = ALiBiSelfAttention

"""ALiBiMechanism self-attention (Press et al. 2022): dense, plus the bias ``-m_h * abs(i - j)``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import validate_positive
from .base import Mechanism, SelfAttention

__all__ = ["ALiBiMechanism", "ALiBiSelfAttention", "AlibiSelfAttention", "alibi_slopes"]


def _power_of_two_slopes(heads: int) -> list[float]:
    """``2 ** (-8 h / H)`` for h = 1..H."""
    return [2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """``(H,)`` float64 slopes m_h of the ALiBiMechanism paper, for any head count.

    H a power of two: ``2 ** (-8 h / H)`` for h = 1..H. Otherwise, with P the largest power
    of two below H: the P slopes for P, then ``2 ** (-4 k / P)`` for k = 1, 3, 5, ... (every
    other slope for 2P) until there are H; not the power-of-two slopes repeated. NumPy, so
    the slopes are jit constants.
    """
    validate_positive("num_heads", num_heads)
    base = 1 << (num_heads.bit_length() - 1)  # the largest power of two <= H
    slopes = _power_of_two_slopes(base) + _power_of_two_slopes(2 * base)[0::2]
    return np.array(slopes[:num_heads], dtype=np.float64)


class ALiBiMechanism(Mechanism):
    """Dense attention plus the bias ``-m_h * abs(p_i - s_j)`` on positions."""

    positional = True

    def core_options(self) -> dict[str, Any]:
        """The ALiBiMechanism slopes, handed to the core."""
        return {"alibi_slopes": alibi_slopes(self.num_heads)}


class ALiBiSelfAttention(ALiBiMechanism, SelfAttention):
    """Multi-head self-attention with linear biases: scores
    ``q·k / (sqrt(D) * temperature) - m_h * abs(p_i - s_j)`` on the positions of query i
    and key j (``0..L-1`` in a self-attention call).

    The bias is made per call from positions for the length at hand, so any L works and
    the params hold only the projections. Complexity: O(L² · E) time; the fast path
    (``need_weights=False``) is the query-chunked core, which builds the bias per chunk,
    O(H · chunk · L) memory.

    Example::

        attn = ALiBiSelfAttention(d_model=128, num_heads=12)
        variables = attn.init(jax.random.key(0), x)
        out, weights = attn.apply(variables, x)   # (4, 512, 128), (4, 12, 512, 512)
    """

    num_heads: int


AlibiSelfAttention = ALiBiSelfAttention

"""VanillaMechanism self-attention: one head as wide as the model."""

from __future__ import annotations

from .base import Mechanism, SelfAttention

__all__ = ["VanillaMechanism", "VanillaSelfAttention"]


class VanillaMechanism(Mechanism):
    """One head as wide as the model."""

    def head_counts(self) -> tuple[int, int]:
        return 1, 1


class VanillaSelfAttention(VanillaMechanism, SelfAttention):
    """Single-head scaled dot-product self-attention, head width ``D = E``.

    Complexity: O(L² · E) time; weights are ``(B, 1, L, L)``.

    Example::

        attn = VanillaSelfAttention(d_model=128)
        variables = attn.init(jax.random.key(0), x)
        out, weights = attn.apply(variables, x)   # (4, 512, 128), (4, 1, 512, 512)
    """

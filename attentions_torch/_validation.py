"""Validation helpers shared in spirit (and in text) by both packages.

These functions look only at Python ints and shape tuples, so ``attentions_torch`` and
``attentions_jax`` raise the very same ``ValueError`` messages; a parametrized test holds
the two copies of this file to that. Every message says what was expected and what was
given.
"""

from __future__ import annotations

from collections.abc import Sequence

FEATURE_MAPS = ("elu", "relu")


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def validate_positive(name: str, value: int) -> None:
    """``value`` must be a positive int (window, block, rate, head counts, widths)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate_heads(d_model: int, num_heads: int, num_kv_heads: int) -> int:
    """Check the head configuration and return the head width ``D = d_model // num_heads``."""
    validate_positive("d_model", d_model)
    validate_positive("num_heads", num_heads)
    validate_positive("num_kv_heads", num_kv_heads)
    if d_model % num_heads:
        raise ValueError(
            f"d_model must be divisible by num_heads, got d_model={d_model} and "
            f"num_heads={num_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_query_heads must be divisible by num_kv_heads, got "
            f"num_query_heads={num_heads} and num_kv_heads={num_kv_heads}"
        )
    return d_model // num_heads


def validate_options(
    *, input_dim: int | None, dropout: float, temperature: float, rope: bool, d_head: int
) -> None:
    """Check the keyword options every layer shares."""
    if input_dim is not None:
        validate_positive("input_dim", input_dim)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if rope and d_head % 2:
        raise ValueError(f"rope needs an even head width d_head, got d_head={d_head}")


def validate_rope_base(rope_base: float) -> None:
    """RoPE's base must be a finite positive number (10000.0 in RoFormer and LLaMA)."""
    if not 0.0 < rope_base < float("inf"):
        raise ValueError(f"rope_base must be a finite positive number, got {rope_base!r}")


def validate_feature_map(feature_map: str) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def validate_unscaled(temperature: float) -> None:
    """Linear attention has no score scaling, so any temperature but 1.0 would be ignored."""
    if temperature != 1.0:
        raise ValueError(
            f"temperature must be 1.0 for linear attention (it has no score scaling), "
            f"got {temperature!r}"
        )


def validate_step_input(shape: Sequence[int], input_dim: int, batch: int) -> None:
    """A recurrent step's ``x_t`` must be ``(B, input_dim)`` with the state's B."""
    shape = _shape(shape)
    if shape != (batch, input_dim):
        raise ValueError(
            f"expected x_t of shape (B, input_dim) = ({batch}, {input_dim}) to match the "
            f"state, got {shape}"
        )


def validate_input(shape: Sequence[int], input_dim: int) -> None:
    """``x`` must be ``(B, L, input_dim)``."""
    shape = _shape(shape)
    if len(shape) != 3 or shape[-1] != input_dim:
        raise ValueError(f"expected x of shape (B, L, {input_dim}), got {shape}")
    if shape[1] == 0:
        raise ValueError(f"expected a sequence length L >= 1, got x of shape {shape}")


def validate_mask(shape: Sequence[int], batch: int, heads: int, length: int) -> None:
    """A keep-mask is ``(L, L)``, ``(B, L, L)`` or rank 4 broadcastable to ``(B, H, L, L)``."""
    shape = _shape(shape)
    target = (batch, heads, length, length)
    if len(shape) == 2:
        padded = (1, 1, *shape)
    elif len(shape) == 3:
        padded = (shape[0], 1, *shape[1:])
    else:
        padded = shape
    fits = len(padded) == 4 and all(d in (1, t) for d, t in zip(padded, target, strict=True))
    if len(shape) in (2, 3):
        fits = fits and shape[-2:] == (length, length)
    if not fits:
        raise ValueError(
            f"mask of shape {shape} does not fit (B, H, L, L) = {target}; expected "
            f"(L, L), (B, L, L) or a rank-4 shape broadcastable to (B, H, L, L)"
        )

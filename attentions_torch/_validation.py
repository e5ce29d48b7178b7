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
    """The shape as a tuple; symbolic sizes (``torch.export``'s ``SymInt``, ``jax.export``'s
    symbolic dimensions) stay symbolic, so validating never pins a length to a constant."""
    return tuple(d if isinstance(d, int) else _symbolic(d) for d in shape)


def _symbolic(d):
    try:
        return int(d) if type(d).__name__ not in ("SymInt", "_DimExpr") else d
    except TypeError:
        return d


def _is(d, value: int) -> bool:
    """``d == value`` for a size known to be ``value``; ``False`` for a symbolic size."""
    return isinstance(d, int) and d == value


def _same(a, b) -> bool:
    """Two sizes are equal: ints compare; a symbolic size equals only itself."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a is b or str(a) == str(b):
        return True
    try:  # two symbols that export constrains to one value (a shared torch Dim) compare
        return bool(a == b)
    except Exception:  # jax.export: a comparison its symbolic algebra cannot decide
        return False


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
    *,
    input_dim: int | None,
    dropout: float,
    temperature: float,
    rope: bool,
    d_head: int,
    context_dim: int | None = None,
) -> None:
    """Check the keyword options every layer shares."""
    if input_dim is not None:
        validate_positive("input_dim", input_dim)
    if context_dim is not None:
        validate_positive("context_dim", context_dim)
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


def validate_input(shape: Sequence[int], input_dim: int) -> None:
    """``x`` must be ``(B, L, input_dim)``."""
    shape = _shape(shape)
    if len(shape) != 3 or not _same(shape[-1], input_dim):
        raise ValueError(f"expected x of shape (B, L, {input_dim}), got {shape}")
    if _is(shape[1], 0):
        raise ValueError(f"expected a sequence length L >= 1, got x of shape {shape}")


def validate_context(
    shape: Sequence[int] | None,
    context_dim: int,
    batch: int,
    *,
    input_dim: int,
    mechanism: str,
    is_causal: bool,
) -> None:
    """Cross-attention (docs/semantics.md): ``context`` is ``(B, S, context_dim)`` with x's B,
    served by the mechanisms without positions, and never with ``is_causal``.

    ``shape`` is ``None`` for self-attention, which a layer built with a ``context_dim``
    other than its ``input_dim`` cannot do (its ``w_k``, ``w_v`` read the context's width).
    ``mechanism`` names what makes the layer positional, empty when nothing does.
    """
    if shape is None:
        if context_dim != input_dim:
            raise ValueError(
                f"this layer was built for cross-attention with context_dim={context_dim} "
                f"!= input_dim={input_dim}: pass context=... of shape (B, S, {context_dim})"
            )
        return
    if mechanism:
        raise ValueError(
            f"context (cross-attention) is served by the mechanisms without positions "
            f"(VanillaSelfAttention, MultiHeadSelfAttention, GroupedSelfAttention, "
            f"LinearSelfAttention); {mechanism} defines its pattern on positions that a "
            f"separate key sequence does not share"
        )
    if is_causal:
        raise ValueError(
            "is_causal=True cannot be used with context: causality compares the positions "
            "of queries and keys, and the context's keys are another sequence"
        )
    shape = _shape(shape)
    if len(shape) != 3 or not _same(shape[-1], context_dim):
        raise ValueError(f"expected context of shape (B, S, {context_dim}), got {shape}")
    if not _same(shape[0], batch):
        raise ValueError(
            f"context batch {shape[0]} does not match the batch of x, B = {batch}; "
            f"got context of shape {shape}"
        )
    if _is(shape[1], 0):
        raise ValueError(f"expected a context length S >= 1, got context of shape {shape}")


def validate_start(name: str, value) -> None:
    """A tiled (sparse) mechanism takes positions as a start offset: a Python int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(
            f"{name} of a tiled mechanism (local, dilated, block) must be None or a start "
            f"offset (a Python int: positions start, start + 1, ...), got {type(value).__name__}"
        )


def validate_mask(
    shape: Sequence[int], batch: int, heads: int, length: int, keys: int | None = None
) -> None:
    """A keep-mask is ``(L, S)``, ``(B, L, S)`` or rank 4 broadcastable to ``(B, H, L, S)``
    (``S = L`` in self-attention)."""
    shape = _shape(shape)
    names, square = "(B, H, L, S)", "(L, S), (B, L, S)"
    if keys is None:
        keys, names, square = length, "(B, H, L, L)", "(L, L), (B, L, L)"
    target = (batch, heads, length, keys)
    if len(shape) == 2:
        padded = (1, 1, *shape)
    elif len(shape) == 3:
        padded = (shape[0], 1, *shape[1:])
    else:
        padded = shape
    fits = len(padded) == 4 and all(
        _is(d, 1) or _same(d, t) for d, t in zip(padded, target, strict=True)
    )
    if len(shape) in (2, 3):
        fits = fits and _same(shape[-2], length) and _same(shape[-1], keys)
    if not fits:
        raise ValueError(
            f"mask of shape {shape} does not fit {names} = {target}; expected "
            f"{square} or a rank-4 shape broadcastable to {names}"
        )


NO_LIMIT = 2**31 - 1
"""The ``max_length`` a fixed-size cache (local, block, linear) stores for ``None``: the
largest int32, which ``lengths`` cannot pass."""


def validate_cache_size(batch: int, max_length: int | None, *, fixed_size: bool = False) -> None:
    """``init_cache``'s sizes: positive ints; ``max_length=None`` (no limit) only for a
    cache whose size does not grow with the stream (``fixed_size``)."""
    validate_positive("batch", batch)
    if max_length is None and fixed_size:
        return
    if max_length is None:
        raise ValueError(
            "max_length must be a positive integer, got None: only the caches of fixed size "
            "(LocalSelfAttention, BlockSelfAttention, LinearSelfAttention) take None"
        )
    validate_positive("max_length", max_length)
    if max_length > NO_LIMIT:
        raise ValueError(f"max_length must be at most 2**31 - 1 (int32), got {max_length}")


def _template(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def validate_cache(
    kind: str,
    fields: dict[str, Sequence[int]] | None,
    expected_kind: str,
    expected: dict[str, tuple[int | str, ...]],
) -> None:
    """A cache of this layer: a ``expected_kind`` NamedTuple whose fields have the shapes of
    ``expected``, where the names ``"B"`` and ``"S_max"`` stand for one size each (the
    same in every field). ``fields`` maps the given cache's fields to their shapes
    (``None``: not a cache at all)."""
    shapes = {name: _shape(shape) for name, shape in (fields or {}).items()}
    sizes: dict[str, object] = {}

    def fits(shape: tuple, template: tuple) -> bool:
        if len(shape) != len(template):
            return False
        for d, want in zip(shape, template, strict=True):
            if isinstance(want, int):
                if not _same(d, want):
                    return False
            elif not _same(sizes.setdefault(want, d), d):
                return False
        return True

    if (
        kind != expected_kind
        or list(shapes) != list(expected)
        or not all(fits(shapes[name], template) for name, template in expected.items())
    ):
        want = ", ".join(f"{name} {_template(t)}" for name, t in expected.items())
        got = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"expected a {expected_kind} of this layer ({want}), got a {kind}"
            + (f" ({got})" if got else "")
            + "; make it with init_cache(batch, max_length)"
        )


def validate_decode_input(shape: Sequence[int], input_dim: int, batch: int) -> None:
    """``decode``'s x: ``(B, T, input_dim)`` with the cache's B and T >= 1 new tokens."""
    shape = _shape(shape)
    if len(shape) != 3 or not _same(shape[-1], input_dim):
        raise ValueError(f"expected x of shape (B, T, {input_dim}), got {shape}")
    if not _same(shape[0], batch):
        raise ValueError(
            f"x holds {shape[0]} sequences but the cache holds B = {batch}; got x of shape {shape}"
        )
    if _is(shape[1], 0):
        raise ValueError(f"expected T >= 1 new tokens, got x of shape {shape}")


def validate_decode_mask(shape: Sequence[int] | None, batch: int, tokens: int) -> None:
    """``decode``'s mask marks the real tokens of x: ``(B, T)``, or ``None`` (all real)."""
    if shape is None:
        return
    shape = _shape(shape)
    if len(shape) != 2 or not (_same(shape[0], batch) and _same(shape[1], tokens)):
        raise ValueError(
            f"expected a mask of shape (B, T) = ({batch}, {tokens}) marking the real tokens "
            f"of x, got {shape}"
        )


def validate_cache_room(lengths: Sequence[int], max_length: int) -> None:
    """No sequence may hold more than ``max_length`` tokens after a decoding call;
    ``lengths`` are the lengths it would leave (Python ints)."""
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(
                f"decoding would write past the end of the cache: sequence {index} would hold "
                f"{length} tokens, max_length = {max_length}; make the cache with "
                f"init_cache(batch, max_length) for at least {max(lengths)} tokens"
            )

"""Helpers shared by the tests: run both frameworks, user masks, the float64 reference check.

The references themselves live in ``tests/reference.py`` (NumPy only, written from
docs/semantics.md); this module is the glue between them, the registry
(``parity.mechanisms``) and the two packages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity import compare_layers, torch_to_flax
from parity.mechanisms import Mechanism
from tests import reference

MASK_KINDS = ("none", "padding", "square", "batched", "per_head", "per_query")
"""Every kind of user keep-mask ``user_mask`` makes, one per accepted rank and broadcast."""


def user_mask(
    kind: str, rng: np.random.Generator, batch: int, length: int, heads: int = 1
) -> np.ndarray | None:
    """A boolean keep-mask of docs/semantics.md of one kind (``MASK_KINDS``).

    ``padding``: key padding ``(B, 1, 1, L)``, the second sequence ``L // 2 + 1`` long;
    ``square``: ``(L, L)``; ``batched``: ``(B, L, L)``; ``per_head``: ``(B, H, L, L)``;
    ``per_query``: ``(B, 1, L, 1)``, whole query rows. The random ones hide query
    ``L // 3`` from every key (in every sequence for ``square``, in the last sequence and
    the first head otherwise), so blind rows are always exercised.
    """
    blind = length // 3
    if kind == "none":
        return None
    if kind == "padding":
        lengths = np.resize([length, length // 2 + 1], batch)
        return (np.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "square":
        keep = rng.random((length, length)) > 0.3
        keep[blind] = False
        return keep
    if kind == "batched":
        keep = rng.random((batch, length, length)) > 0.4
        keep[-1, blind] = False
        return keep
    if kind == "per_head":
        keep = rng.random((batch, heads, length, length)) > 0.5
        keep[-1, 0, blind] = False
        return keep
    if kind == "per_query":
        keep = rng.random((batch, 1, length, 1)) > 0.4
        keep[-1, 0, blind] = False
        return keep
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


def to_numpy(value: Any) -> Any:
    """Tensors and JAX arrays (also inside tuples and lists) as NumPy; anything else as is."""
    if isinstance(value, (tuple, list)):
        return type(value)(to_numpy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    if isinstance(value, jax.Array):
        return np.asarray(value)
    return value


def call_both(torch_fn: Callable, jax_fn: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``{"torch": ..., "jax": ...}``: the twin functions called on the same arguments.

    NumPy arrays among the arguments become a ``torch.tensor`` for ``torch_fn`` (called
    under ``torch.no_grad``) and a ``jnp`` array for ``jax_fn``; anything else is passed as
    is. Arrays in the results come back as NumPy (``to_numpy``).
    """

    def convert(to: Callable) -> tuple[list, dict]:
        as_array = lambda a: to(a) if isinstance(a, np.ndarray) else a  # noqa: E731
        return [as_array(a) for a in args], {k: as_array(v) for k, v in kwargs.items()}

    t_args, t_kwargs = convert(torch.tensor)
    with torch.no_grad():
        torch_result = torch_fn(*t_args, **t_kwargs)
    j_args, j_kwargs = convert(jnp.asarray)
    return {"torch": to_numpy(torch_result), "jax": to_numpy(jax_fn(*j_args, **j_kwargs))}


def run_both(
    torch_layer: torch.nn.Module,
    flax_layer,
    x: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    dtype: str = "float64",
    **call: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{framework: (out, weights)}`` as NumPy from the same weights in ``dtype``.

    The PyTorch layer is cast to ``dtype`` (in place) and run eagerly in eval mode; the
    Flax layer gets its weights (``torch_to_flax``) and runs under ``jax.jit`` with the
    call's options (``is_causal``, ``need_weights``) static: one compiled program costs
    less than eager JAX's compile per operation and shape. NumPy arrays among the call's
    options (``context``) are cast to ``dtype`` and passed as arrays.
    """
    torch_layer = torch_layer.to(getattr(torch, dtype)).eval()
    variables = {"params": torch_to_flax(torch_layer)}
    static = tuple(k for k, v in call.items() if not isinstance(v, np.ndarray))
    apply = partial(jax.jit(flax_layer.apply, static_argnames=static), variables)
    arrays = {k: np.asarray(v, dtype) for k, v in call.items() if k not in static}
    options = {k: v for k, v in call.items() if k in static}
    return call_both(torch_layer, apply, np.asarray(x, dtype), mask, **arrays, **options)


def float64_state(torch_layer: torch.nn.Module) -> dict[str, np.ndarray]:
    """The layer's ``state_dict`` as float64 NumPy arrays (what the references read)."""
    return {k: v.detach().double().numpy() for k, v in torch_layer.state_dict().items()}


def input_width(mechanism: Mechanism, config: Mapping[str, Any] | None = None) -> int:
    """The last dimension of the layer's input: ``input_dim``, else ``d_model``."""
    config = mechanism.kwargs if config is None else config
    return config.get("input_dim") or config["d_model"]


def make_layers(mechanism: Mechanism, config: Mapping[str, Any]) -> tuple[torch.nn.Module, Any]:
    """``(torch_layer, flax_layer)`` of a registry row from its whole constructor ``config``.

    The PyTorch layer is in float64 and its projection biases, if any, are drawn at random
    (from torch's seed): the zero biases of the initialization would hide a bias the
    layer drops.
    """
    torch_layer = mechanism.layer_class("torch")(**config).double()
    with torch.no_grad():
        for name, parameter in torch_layer.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_()
    return torch_layer, mechanism.layer_class("jax")(**config)


def reference_keep(
    mechanism: Mechanism,
    config: Mapping[str, Any],
    length: int,
    mask: np.ndarray | None = None,
    is_causal: bool = False,
) -> np.ndarray:
    """What each query may see: the row's pattern (written in tests/reference.py, sized by
    ``config``) AND causal AND ``mask``, ``(B|1, H|1, L, L)``."""
    size = mechanism.size(config)
    return reference.keep_mask(length, mask, is_causal, mechanism.pattern, size)


def reference_layer(
    mechanism: Mechanism,
    config: Mapping[str, Any],
    state: Mapping[str, np.ndarray],
    x: np.ndarray,
    mask: np.ndarray | None = None,
    is_causal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(out, weights)`` of the float64 reference of the layer ``config`` builds.

    The documented defaults are written here again (``temperature=1``, ``rope`` on only for the
    ``rope`` pattern, interleaved, base 10000, feature map ``"elu"``): a default changed in
    both packages fails too.
    """
    heads, kv_heads = mechanism.head_counts(config)
    length = np.shape(x)[1]
    rope = config.get("rope", mechanism.pattern == "rope")
    return reference.self_attention(
        x,
        dict(state),
        heads,
        kv_heads,
        reference_keep(mechanism, config, length, mask, is_causal),
        bias=reference.alibi_bias(heads, length) if mechanism.pattern == "alibi" else None,
        temperature=config.get("temperature", 1.0),
        rope=("interleaved" if config.get("rope_interleaved", True) else "half") if rope else None,
        rope_base=config.get("rope_base", 10000.0),
        feature_map=config.get("feature_map", "elu") if mechanism.pattern == "linear" else None,
    )


def check_reference(
    mechanism: Mechanism,
    config: Mapping[str, Any],
    x: np.ndarray,
    mask: np.ndarray | None = None,
    is_causal: bool = False,
    *,
    atol: float = 1e-12,
) -> None:
    """Both frameworks, weights path and fast path, equal the float64 reference of the
    layer ``config`` builds (``make_layers``); weights are exactly zero on hidden keys and
    ``None`` on the fast path."""
    torch_layer, flax_layer = make_layers(mechanism, config)
    length = np.shape(x)[1]
    keep = reference_keep(mechanism, config, length, mask, is_causal)
    ref_out, ref_w = reference_layer(
        mechanism, config, float64_state(torch_layer), x, mask, is_causal
    )
    for need_weights in (True, False):
        runs = run_both(
            torch_layer, flax_layer, x, mask, is_causal=is_causal, need_weights=need_weights
        )
        for framework, (out, weights) in runs.items():
            where = f"{framework}, need_weights={need_weights}"
            np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0, err_msg=f"out, {where}")
            if not need_weights:
                assert weights is None, where
                continue
            np.testing.assert_allclose(weights, ref_w, atol=atol, rtol=0, err_msg=where)
            hidden = ~np.broadcast_to(keep, weights.shape)
            assert not np.any(weights[hidden]), f"weights on hidden keys, {where}"


def check_parity(torch_layer, flax_layer, x: np.ndarray, mask=None, **options: Any) -> None:
    """``parity.compare_layers`` passes (outputs, weights and every gradient within the
    §6); the assertion lists the comparisons that failed."""
    report = compare_layers(torch_layer, flax_layer, x, mask, **options)
    assert report.passed, [c for c in report.comparisons if not c.passed]

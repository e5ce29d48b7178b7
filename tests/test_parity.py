"""Cross-framework parity of every registered mechanism via ``parity.compare_layers``.

The dtypes follow the run's JAX mode (``conftest.py``): float64 in the 64-bit run, float32
and bfloat16 in the default-precision run, where JAX users meet them.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from parity import MECHANISMS, compare_layers

B, L = 2, 13
DTYPES = ("float64",) if jax.config.jax_enable_x64 else ("float32", "bfloat16")
MASKS = ("none", "causal", "padding", "random_with_empty_row")


def _case(mechanism, mask_kind: str):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, L, mechanism.kwargs.get("input_dim", mechanism.kwargs["d_model"])))
    if mask_kind == "padding":
        return x, (np.arange(L)[None] < np.array([L, 7])[:, None])[:, None, None, :], False
    if mask_kind == "random_with_empty_row":
        keep = rng.random((B, L, L)) > 0.4
        keep[1, 5] = False
        return x, keep, False
    return x, None, mask_kind == "causal"


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_parity(mechanism, dtype, mask_kind, need_weights):
    x, mask, is_causal = _case(mechanism, mask_kind)
    torch.manual_seed(0)
    report = compare_layers(
        mechanism.torch_layer(),
        mechanism.flax_layer(),
        x,
        mask,
        is_causal=is_causal,
        need_weights=need_weights,
        dtype=dtype,
    )
    failed = [c for c in report.comparisons if not c.passed]
    assert not failed, failed
    assert (report.get("weights") is not None) == need_weights
    assert any(c.name.startswith("grad w_") for c in report.comparisons)


@pytest.mark.parametrize(
    "mechanism", [m for m in MECHANISMS if m.cross_attention], ids=lambda m: m.name
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_cross_attention_parity(mechanism, dtype, need_weights):
    """Cross-attention (a context of S = 9 tokens, 20 wide) under a random ``(B, L, S)``
    mask with a blind row: outputs, weights and the gradients of x, the context and every
    parameter (with biases) agree; the context's gradient is compared."""
    rng = np.random.default_rng(2)
    x, _, _ = _case(mechanism, "none")
    context = rng.standard_normal((B, 9, 20))
    keep = rng.random((B, L, 9)) > 0.4
    keep[0, 3] = False
    torch.manual_seed(0)
    report = compare_layers(
        mechanism.torch_layer(context_dim=20, bias=True),
        mechanism.flax_layer(context_dim=20, bias=True),
        x,
        keep,
        context=context,
        need_weights=need_weights,
        dtype=dtype,
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]
    assert report.get("grad context") is not None
    assert report.get("grad w_k.weight").max_abs < float("inf")


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_parity_under_jax_jit(mechanism, dtype, need_weights):
    """With projection biases, so their gradients are compared too."""
    x, mask, _ = _case(mechanism, "random_with_empty_row")
    torch.manual_seed(0)
    report = compare_layers(
        mechanism.torch_layer(bias=True),
        mechanism.flax_layer(bias=True),
        x,
        mask,
        need_weights=need_weights,
        dtype=dtype,
        jit=True,
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]


@pytest.mark.slow
@pytest.mark.skipif(jax.config.jax_enable_x64, reason="float32: the default-precision run")
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_parity_under_torch_compile(mechanism):
    """One compiled case per mechanism: torch.compile costs ~25 s per graph on this CPU."""
    x, mask, _ = _case(mechanism, "random_with_empty_row")
    torch.manual_seed(0)
    report = compare_layers(
        mechanism.torch_layer(),
        mechanism.flax_layer(),
        x,
        mask,
        dtype="float32",
        jit=True,
        compile=True,
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]

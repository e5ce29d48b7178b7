"""jax.jit and torch.compile give the same numbers as eager (docs/semantics.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("is_causal", [True, False])
def test_jax_jit_equals_eager(need_weights, is_causal):
    layer = aj.MultiHeadSelfAttention(16, 4, rope=True)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    mask = jnp.arange(7)[None, None, None, :] < jnp.array([7, 4])[:, None, None, None]
    variables = layer.init(jax.random.key(1), x)
    eager = layer.apply(variables, x, mask, is_causal=is_causal, need_weights=need_weights)
    jitted = jax.jit(layer.apply, static_argnames=("is_causal", "need_weights"))(
        variables, x, mask, is_causal=is_causal, need_weights=need_weights
    )
    for a, b in zip(eager, jitted, strict=True):
        if a is None:
            assert b is None
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_torch_compile_equals_eager():
    layer = at.MultiHeadSelfAttention(16, 4, rope=True).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.arange(7)[None, None, None, :] < torch.tensor([7, 4])[:, None, None, None]
    compiled = torch.compile(layer)
    for need_weights in (True, False):
        eager_out, eager_w = layer(x, mask, need_weights=need_weights)
        out, w = compiled(x, mask, need_weights=need_weights)
        torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-6)
        if need_weights:
            torch.testing.assert_close(w, eager_w, atol=1e-6, rtol=1e-6)

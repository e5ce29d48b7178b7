"""A few AdamW steps leave the same parameters in both frameworks (docs/semantics.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from parity import MECHANISMS, flax_to_torch, torch_to_flax
from tests import helpers

STEPS = 3
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_steps_match(mechanism, dtype):
    torch_dtype = getattr(torch, dtype)
    # Softmax ignores w_k.bias (it adds q·b to a whole row of scores), so its gradient is
    # rounding noise that Adam's normalization blows up to full-size steps in float32.
    bias = dtype == "float64"
    torch.manual_seed(0)
    torch_layer = mechanism.torch_layer(bias=bias).to(torch_dtype)
    flax_layer = mechanism.flax_layer(bias=bias)
    params = torch_to_flax(torch_layer)
    rng = np.random.default_rng(0)
    width = helpers.input_width(mechanism)
    xs = [rng.standard_normal((2, 9, width)).astype(dtype) for _ in range(STEPS)]
    target = rng.standard_normal((2, 9, mechanism.kwargs["d_model"])).astype(dtype)

    opt = torch.optim.AdamW(torch_layer.parameters(), **HYPER)
    for x in xs:
        opt.zero_grad()
        out, _ = torch_layer(torch.tensor(x), is_causal=True, need_weights=False)
        ((out - torch.tensor(target)) ** 2).mean().backward()
        opt.step()

    tx = optax.adamw(
        HYPER["lr"],
        b1=HYPER["betas"][0],
        b2=HYPER["betas"][1],
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
    )
    state = tx.init(params)

    def loss(p, x):
        out, _ = flax_layer.apply({"params": p}, x, is_causal=True, need_weights=False)
        return ((out - jnp.asarray(target)) ** 2).mean()

    @jax.jit  # one compiled step: eager JAX compiles every operation of the backward apart
    def step(params, state, x):
        updates, state = tx.update(jax.grad(loss)(params, x), state, params)
        return optax.apply_updates(params, updates), state

    for x in xs:
        params, state = step(params, state, jnp.asarray(x))

    ours = flax_to_torch(params)
    atol, rtol = (1e-10, 0.0) if dtype == "float64" else (1e-5, 1e-5)
    for name, value in torch_layer.state_dict().items():
        np.testing.assert_allclose(
            ours[name].numpy(), value.numpy(), atol=atol, rtol=rtol, err_msg=name
        )

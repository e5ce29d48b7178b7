"""Vanilla and Multi-Head layers in both frameworks against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at
from parity import flax_to_torch, torch_to_flax
from parity.mechanisms import by_name
from tests import helpers

LAYERS = {"vanilla": {"d_model": 16}, "multi_head": {"d_model": 16, "num_heads": 4}}
"""The registry rows tested here, with this file's sizes."""
OPTIONS = [
    {},
    {"bias": True, "temperature": 0.7},
    {"input_dim": 12},
    {"rope": True},
    {"rope": True, "rope_interleaved": False},
]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_layer_matches_float64_reference(rng, name, options):
    mechanism, config = by_name(name), {**LAYERS[name], **options}
    x = rng.standard_normal((2, 9, helpers.input_width(mechanism, config)))
    helpers.check_reference(mechanism, config, x, helpers.user_mask("batched", rng, 2, 9))


def test_seed_usage_shapes():
    vanilla_attn = at.VanillaSelfAttention(d_model=128)
    multi_head_attn = at.MultiHeadSelfAttention(d_model=128, num_heads=8)
    x = torch.randn(2, 64, 128)
    output, attention_weights = vanilla_attn(x)
    assert output.shape == (2, 64, 128) and attention_weights.shape == (2, 1, 64, 64)
    output, weights = multi_head_attn(x)
    assert weights.shape == (2, 8, 64, 64)
    causal = torch.tril(torch.ones(64, 64))
    masked_output, masked_weights = multi_head_attn(x, mask=causal)
    assert torch.all(masked_weights.triu(1) == 0)
    torch.testing.assert_close(masked_weights.sum(-1), torch.ones(2, 8, 64))
    fast, none = multi_head_attn(x, is_causal=True, need_weights=False)
    assert none is None
    torch.testing.assert_close(fast, masked_output, atol=1e-5, rtol=1e-5)

    xj = jnp.asarray(x.numpy())
    flax_attn = aj.MultiHeadSelfAttention(d_model=128, num_heads=8)
    variables = flax_attn.init(jax.random.key(0), xj)
    out, w = flax_attn.apply(variables, xj, mask=jnp.tril(jnp.ones((64, 64))))
    assert out.shape == (2, 64, 128) and w.shape == (2, 8, 64, 64)
    assert jnp.all(jnp.triu(w, 1) == 0)


def test_parameters_names_shapes_and_xavier_init():
    torch_layer = at.MultiHeadSelfAttention(64, 4, input_dim=48, bias=True)
    shapes = {k: tuple(v.shape) for k, v in torch_layer.state_dict().items()}
    assert shapes == {
        "w_q.weight": (64, 48),
        "w_q.bias": (64,),
        "w_k.weight": (64, 48),
        "w_k.bias": (64,),
        "w_v.weight": (64, 48),
        "w_v.bias": (64,),
        "w_o.weight": (64, 64),
        "w_o.bias": (64,),
    }
    flax_layer = aj.MultiHeadSelfAttention(64, 4, input_dim=48, bias=True)
    params = flax_layer.init(jax.random.key(0), jnp.ones((1, 3, 48)))["params"]
    assert {k: tuple(v.shape) for k, v in flax_to_torch(params).items()} == shapes
    bound = np.sqrt(6.0 / (48 + 64))
    for weight in (torch_layer.w_q.weight.detach().numpy(), np.asarray(params["w_q"]["kernel"])):
        assert np.abs(weight).max() <= bound
        assert np.abs(weight).max() > 0.9 * bound  # uniform over the whole Xavier range
        assert abs(weight.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert torch.all(torch_layer.w_q.bias == 0) and jnp.all(params["w_q"]["bias"] == 0)


def test_dropout_train_eval_and_deterministic(rng):
    x = rng.standard_normal((2, 8, 16)).astype(np.float32)
    layer = at.MultiHeadSelfAttention(16, 4, dropout=0.5)
    layer.eval()
    a, _ = layer(torch.tensor(x))
    b, _ = layer(torch.tensor(x), need_weights=False)
    torch.testing.assert_close(a, b)
    layer.train()
    c, w = layer(torch.tensor(x))
    d, _ = layer(torch.tensor(x), need_weights=False)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 8))  # weights before dropout

    flax_layer = aj.MultiHeadSelfAttention(16, 4, dropout=0.5)
    variables = {"params": torch_to_flax(layer)}
    xj = jnp.asarray(x)
    det, _ = flax_layer.apply(variables, xj)
    np.testing.assert_allclose(np.asarray(det), a.detach().numpy(), atol=1e-5)
    key = jax.random.key(3)
    for need_weights in (True, False):
        out1, _ = flax_layer.apply(
            variables, xj, deterministic=False, need_weights=need_weights, rngs={"dropout": key}
        )
        out2, _ = flax_layer.apply(
            variables, xj, deterministic=False, need_weights=need_weights, rngs={"dropout": key}
        )
        np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
        assert not np.allclose(np.asarray(out1), np.asarray(det))


def test_empty_batch_returns_empty_output():
    out, w = at.MultiHeadSelfAttention(16, 4)(torch.zeros(0, 5, 16))
    assert out.shape == (0, 5, 16) and w.shape == (0, 4, 5, 5)
    layer = aj.MultiHeadSelfAttention(16, 4)
    variables = layer.init(jax.random.key(0), jnp.zeros((1, 5, 16)))
    out, w = layer.apply(variables, jnp.zeros((0, 5, 16)))
    assert out.shape == (0, 5, 16) and w.shape == (0, 4, 5, 5)

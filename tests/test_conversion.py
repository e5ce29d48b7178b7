"""Weight conversion: bit-exact round trips, users' own models, clear errors, safetensors."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import attentions_jax as aj
import attentions_torch as at
from parity import (
    MECHANISMS,
    ConversionError,
    flax_to_torch,
    load_flax_params,
    load_state_dict,
    save_flax_params,
    save_state_dict,
    torch_to_flax,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype):
    layer = at.MultiHeadSelfAttention(32, 4, bias=True).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    back = flax_to_torch(torch_to_flax(layer))
    for key, value in layer.state_dict().items():
        assert back[key].dtype == dtype
        assert torch.equal(back[key].view(torch.uint8), value.contiguous().view(torch.uint8))


def test_flax_init_params_load_into_torch_and_agree():
    flax_layer = aj.MultiHeadSelfAttention(16, 2, bias=True)
    x = np.random.default_rng(0).standard_normal((2, 6, 16)).astype(np.float32)
    variables = flax_layer.init(jax.random.key(0), jnp.asarray(x))
    torch_layer = at.MultiHeadSelfAttention(16, 2, bias=True)
    torch_layer.load_state_dict(flax_to_torch(variables, like=torch_layer))
    out_t, _ = torch_layer(torch.tensor(x))
    out_j, _ = flax_layer.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(out_t.detach().numpy(), np.asarray(out_j), atol=1e-5)


class TorchModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.blocks = nn.ModuleList([at.MultiHeadSelfAttention(16, 4, bias=True)])
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        h = h + self.blocks[0](h, need_weights=False)[0]
        return self.head(h)


class FlaxModel(fnn.Module):
    @fnn.compact
    def __call__(self, tokens):
        h = fnn.LayerNorm(epsilon=1e-5, name="norm")(fnn.Embed(50, 16, name="embed")(tokens))
        h = (
            h
            + aj.MultiHeadSelfAttention(16, 4, bias=True, name="blocks_0")(h, need_weights=False)[0]
        )
        return fnn.Dense(3, name="head")(h)


def test_users_own_model_converts_with_generic_rules():
    model = TorchModel()
    tokens = np.random.default_rng(0).integers(0, 50, (2, 7))
    flax_model = FlaxModel()
    like = flax_model.init(jax.random.key(0), jnp.asarray(tokens))
    params = torch_to_flax(model, like=like)
    assert set(params) == {"embed", "norm", "blocks_0", "head"}
    out_j = flax_model.apply({"params": params}, jnp.asarray(tokens))
    out_t = model(torch.tensor(tokens))
    np.testing.assert_allclose(out_t.detach().numpy(), np.asarray(out_j), atol=1e-5)
    back = flax_to_torch(params, like=model)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_errors_name_missing_unexpected_and_misshaped_entries():
    layer = at.MultiHeadSelfAttention(16, 4)
    params = dict(torch_to_flax(layer))
    like = aj.MultiHeadSelfAttention(16, 4, bias=True).init(jax.random.key(0), jnp.ones((1, 2, 16)))
    with pytest.raises(ConversionError, match=r"missing \['w_k/bias'"):
        torch_to_flax(layer, like=like)
    params["extra"] = {"kernel": jnp.ones((2, 2))}
    params["w_q"] = {"kernel": jnp.ones((16, 8))}
    with pytest.raises(ConversionError) as err:
        flax_to_torch(params, like=layer)
    message = str(err.value)
    assert "unexpected ['extra.weight']" in message
    assert "w_q.weight: expected (16, 16), got (8, 16)" in message
    with pytest.raises(ConversionError, match="only kernel, bias, scale and embedding"):
        flax_to_torch({"w_q": {"kernel": jnp.ones((2, 2)), "mystery": jnp.ones(2)}})


def test_safetensors_files_cross_frameworks(tmp_path):
    layer = at.MultiHeadSelfAttention(16, 4, bias=True)
    path = tmp_path / "layer.safetensors"
    save_state_dict(layer, path)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    params = load_flax_params(path)
    flat_expected = torch_to_flax(layer)
    for name in ("w_q", "w_o"):
        np.testing.assert_array_equal(params[name]["kernel"], flat_expected[name]["kernel"])
    path2 = tmp_path / "from_flax.safetensors"
    save_flax_params(params, path2)
    state = load_state_dict(path2)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_every_mechanism_converts_both_ways_through_files(mechanism, tmp_path):
    torch_layer = mechanism.torch_layer(bias=True)
    flax_layer = mechanism.flax_layer(bias=True)
    width = mechanism.kwargs.get("input_dim", mechanism.kwargs["d_model"])
    x = np.random.default_rng(0).standard_normal((2, 5, width)).astype(np.float32)
    variables = flax_layer.init(jax.random.key(0), jnp.asarray(x))

    # Flax -> file -> PyTorch, and the two layers agree
    save_flax_params(variables, tmp_path / "flax.safetensors")
    torch_layer.load_state_dict(load_state_dict(tmp_path / "flax.safetensors"))
    out_t, _ = torch_layer(torch.tensor(x))
    out_j, _ = flax_layer.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(out_t.detach().numpy(), np.asarray(out_j), atol=1e-5, rtol=1e-5)

    # PyTorch -> file -> Flax is the identity on every entry
    save_state_dict(torch_layer, tmp_path / "torch.safetensors")
    params = load_flax_params(tmp_path / "torch.safetensors", like=variables)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        got = params
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))

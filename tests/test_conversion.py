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


# --- convolutions, norms, and entries without a rule --------------------------------------


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize(
    ("torch_conv", "flax_conv", "spatial"),
    [
        (
            nn.Conv1d(4, 6, 3, padding=1, groups=2),
            fnn.Conv(6, (3,), padding=((1, 1),), feature_group_count=2),
            (9,),
        ),
        (
            nn.Conv2d(3, 5, (3, 2), stride=(1, 2), dilation=(2, 1)),
            fnn.Conv(5, (3, 2), strides=(1, 2), kernel_dilation=(2, 1), padding="VALID"),
            (8, 7),
        ),
        (
            nn.Conv3d(2, 3, 2, bias=False),
            fnn.Conv(3, (2, 2, 2), use_bias=False, padding=0),
            (4,) * 3,
        ),
    ],
    ids=["conv1d", "conv2d", "conv3d"],
)
def test_conv_converts_to_flax_layout_and_agrees(torch_conv, flax_conv, spatial):
    conv = _randomize(torch_conv).double()
    channels = conv.in_channels
    x = np.random.default_rng(0).standard_normal((2, channels, *spatial))
    x_last = np.moveaxis(x, 1, -1)  # Flax convolutions are channels-last
    like = flax_conv.init(jax.random.key(0), jnp.asarray(x_last))
    params = torch_to_flax(conv, like=like)  # layout matches flax.linen.Conv's own init
    weight = conv.weight.detach().numpy()
    np.testing.assert_array_equal(
        params["kernel"], np.moveaxis(weight, (0, 1), (-1, -2))
    )  # (out, in, *k) -> (*k, in, out)
    out_j = flax_conv.apply({"params": params}, jnp.asarray(x_last))
    out_t = conv(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(np.moveaxis(out_t, 1, -1), np.asarray(out_j), atol=1e-12)
    back = flax_to_torch(params, like=conv)
    for key, value in conv.state_dict().items():
        assert torch.equal(back[key], value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conv_round_trip_is_bit_exact(dtype):
    model = _randomize(nn.Sequential(nn.Conv1d(4, 6, 3), nn.Conv2d(6, 2, (2, 3)))).to(dtype)
    params = torch_to_flax(model)
    assert params["0"]["kernel"].shape == (3, 4, 6)
    assert params["1"]["kernel"].shape == (2, 3, 6, 2)
    back = flax_to_torch(params, like=model)
    for key, value in model.state_dict().items():
        assert back[key].dtype == dtype
        assert torch.equal(back[key].view(torch.uint8), value.contiguous().view(torch.uint8))


def test_flax_conv_params_load_into_torch():
    """Flax -> PyTorch: a rank-3+ kernel is a Conv kernel, a rank-2 one a Dense kernel."""

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.Conv(5, (3,), padding="VALID", name="conv")(x)
            return fnn.Dense(2, name="head")(h)

    class TorchNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv1d(4, 5, 3), nn.Linear(5, 2)

        def forward(self, x):  # channels-last in and out, like the Flax net
            return self.head(self.conv(x.transpose(1, 2)).transpose(1, 2))

    x = np.random.default_rng(0).standard_normal((2, 8, 4)).astype(np.float32)
    variables = Net().init(jax.random.key(1), jnp.asarray(x))
    torch_net = TorchNet()
    torch_net.load_state_dict(flax_to_torch(variables, like=torch_net))
    out_t = torch_net(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(out_t, np.asarray(Net().apply(variables, jnp.asarray(x))), atol=1e-5)


def test_rms_norm_and_group_norm_convert_to_scale():
    x = np.random.default_rng(0).standard_normal((2, 5, 6))
    rms = _randomize(nn.RMSNorm(6, eps=1e-5)).double()
    params = torch_to_flax(rms)
    assert set(params) == {"scale"}
    out_j = fnn.RMSNorm(epsilon=1e-5).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(rms(torch.tensor(x)).detach().numpy(), np.asarray(out_j), atol=1e-12)

    group = _randomize(nn.GroupNorm(3, 6)).double()
    params = torch_to_flax(group)
    assert set(params) == {"scale", "bias"}
    out_j = fnn.GroupNorm(num_groups=3, epsilon=1e-5).apply({"params": params}, jnp.asarray(x))
    out_t = group(torch.tensor(x).transpose(1, 2)).transpose(1, 2)  # channels first in torch
    np.testing.assert_allclose(out_t.detach().numpy(), np.asarray(out_j), atol=1e-12)
    assert all(torch.equal(flax_to_torch(params)[k], v) for k, v in group.state_dict().items())


class _Custom(nn.Module):
    def __init__(self, persistent: bool):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.ones(3), persistent=persistent)


class _WithParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.ones(4))


@pytest.mark.parametrize(
    ("module", "named"),
    [
        (
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            [
                "'1.weight' (parameter of BatchNorm1d)",
                "'1.running_mean' (buffer of BatchNorm1d)",
                "'1.num_batches_tracked'",
            ],
        ),
        (
            nn.MultiheadAttention(8, 2),
            ["'in_proj_weight' (parameter of MultiheadAttention)", "'in_proj_bias'"],
        ),
        (_WithParameter(), ["'gain' (parameter of _WithParameter)"]),
        (_Custom(persistent=True), ["'table' (buffer of _Custom)"]),
        (nn.ConvTranspose1d(3, 4, 2), ["'weight' (parameter of ConvTranspose1d)"]),
    ],
    ids=[
        "batchnorm",
        "multihead_attention",
        "bare_parameter",
        "persistent_buffer",
        "conv_transpose",
    ],
)
def test_entries_without_a_rule_raise_naming_them(module, named):
    with pytest.raises(ConversionError, match="no conversion rule for") as err:
        torch_to_flax(module)
    for name in named:
        assert name in str(err.value)
    assert "'proj.weight'" not in str(err.value)  # the convertible entries are not blamed
    assert "'out_proj.weight'" not in str(err.value)


def test_non_persistent_buffers_are_not_converted():
    params = torch_to_flax(_Custom(persistent=False))
    assert set(params) == {"proj"}


def test_bare_state_dict_rules():
    conv = nn.Conv1d(2, 3, 4)
    with pytest.raises(ConversionError, match=r"'c\.weight': a 3-D weight .* pass the module"):
        torch_to_flax({"c.weight": conv.weight, "c.bias": conv.bias})
    # 2-D is a Linear, 1-D a norm scale (documented, relied on)
    params = torch_to_flax({"a.weight": torch.ones(3, 2), "n.weight": torch.ones(3)})
    assert params["a"]["kernel"].shape == (2, 3)
    assert set(params["n"]) == {"scale"}
    with pytest.raises(ConversionError, match=r"'w_q/kernel': a 1-D kernel"):
        flax_to_torch({"w_q": {"kernel": jnp.ones(3)}})


def test_like_resolves_convolutions_and_embeddings_in_files(tmp_path):
    """A file holds no types; ``like`` (the Flax model's params) supplies them."""

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, tokens):
            h = fnn.Embed(10, 4, name="embed")(tokens)
            h = fnn.Conv(6, (3,), name="conv")(h)
            return fnn.Dense(2, name="head")(fnn.LayerNorm(name="norm")(h))

    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 4),
            "conv": nn.Conv1d(4, 6, 3),
            "norm": nn.LayerNorm(6),
            "head": nn.Linear(6, 2),
        }
    )
    _randomize(model)
    like = Net().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    path = tmp_path / "net.safetensors"
    save_state_dict(model, path)
    params = load_flax_params(path, like=like)
    expected = torch_to_flax(model, like=like)
    for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        got = params
        for key in leaf_path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
    with pytest.raises(ConversionError, match=r"'conv\.weight'.*pass the module"):
        load_flax_params(path)  # without like, a 3-D weight is ambiguous
    save_flax_params(params, tmp_path / "back.safetensors")
    back = load_state_dict(tmp_path / "back.safetensors")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())

"""Cross-attention (docs/semantics.md, "Cross-attention"): keys and values from a context.

Against the float64 reference, ``torch.nn.MultiheadAttention(kdim, vdim)``, Flax's
``MultiHeadDotProductAttention(inputs_q, inputs_kv)`` and SDPA with ``enable_gqa``, all
loaded with the same weights; parity between the frameworks; bad input.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attentions_jax as aj
import attentions_torch as at
from parity import torch_to_flax
from parity.mechanisms import MECHANISMS, by_name
from tests import reference
from tests.helpers import check_parity, float64_state, make_layers, run_both

CROSS = [m for m in MECHANISMS if m.cross_attention]
POSITIONAL = [m for m in MECHANISMS if not m.cross_attention]
B, L, S, C = 2, 6, 11, 12
"""Batch, queries, context tokens, context width (different from every d_model)."""


def _context_masks(rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    """One keep-mask of each accepted form for ``(L, S)``, with a blind query row."""
    per_head = rng.random((B, 1, L, S)) > 0.5
    per_head[-1, 0, 2] = False
    square = rng.random((L, S)) > 0.3
    square[1] = False
    return {
        "none": None,
        "padding": (np.arange(S)[None, :] < np.array([S, 5])[:, None])[:, None, None, :],
        "square": square,
        "batched": rng.random((B, L, S)) > 0.4,
        "rank4": per_head,
    }


@pytest.mark.parametrize("mask_kind", ["none", "padding", "square", "batched", "rank4"])
@pytest.mark.parametrize("mechanism", CROSS, ids=lambda m: m.name)
def test_cross_attention_matches_reference(mechanism, mask_kind, rng):
    config = {**mechanism.kwargs, "context_dim": C, "bias": True}
    torch_layer, flax_layer = make_layers(mechanism, config)
    width = config.get("input_dim") or config["d_model"]
    x, context = rng.standard_normal((B, L, width)), rng.standard_normal((B, S, C))
    mask = _context_masks(rng)[mask_kind]
    heads, kv_heads = mechanism.head_counts(config)
    keep = reference.keep_mask(L, mask, keys=S)
    linear = mechanism.pattern == "linear"
    ref_out, ref_w = reference.self_attention(
        x,
        float64_state(torch_layer),
        heads,
        kv_heads,
        keep,
        feature_map="elu" if linear else None,
        context=context,
    )
    for need_weights in (True, False):
        runs = run_both(
            torch_layer, flax_layer, x, mask, context=context, need_weights=need_weights
        )
        for framework, (out, weights) in runs.items():
            where = f"{framework}, need_weights={need_weights}"
            np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0, err_msg=where)
            if need_weights:
                assert weights.shape == (B, heads, L, S), where
                np.testing.assert_allclose(weights, ref_w, atol=1e-12, rtol=0, err_msg=where)
                assert not np.any(weights[~np.broadcast_to(keep, weights.shape)]), where
            else:
                assert weights is None, where


@pytest.mark.parametrize("mechanism", CROSS, ids=lambda m: m.name)
def test_cross_attention_parity_and_gradients(mechanism, rng):
    """float32 parity of outputs, weights and the gradients of x, context and weights."""
    config = {**mechanism.kwargs, "context_dim": C}
    x, context = rng.standard_normal((B, L, config["d_model"])), rng.standard_normal((B, S, C))
    mask = (np.arange(S)[None, :] < np.array([S, 7])[:, None])[:, None, None, :]
    torch_layer = mechanism.layer_class("torch")(**config)
    flax_layer = mechanism.layer_class("jax")(**config)
    check_parity(torch_layer, flax_layer, x, mask, context=context, dtype="float32", jit=True)


def _mha_weights(mha: torch.nn.MultiheadAttention, layer: at.MultiHeadSelfAttention) -> None:
    """Copy ``nn.MultiheadAttention``'s separate projections (``kdim != embed_dim``) into
    ``w_q``, ``w_k``, ``w_v``, ``w_o``."""
    width = layer.d_model
    with torch.no_grad():
        for name, weight, part in (
            ("w_q", mha.q_proj_weight, 0),
            ("w_k", mha.k_proj_weight, 1),
            ("w_v", mha.v_proj_weight, 2),
        ):
            getattr(layer, name).weight.copy_(weight)
            getattr(layer, name).bias.copy_(mha.in_proj_bias[part * width : (part + 1) * width])
        layer.w_o.weight.copy_(mha.out_proj.weight)
        layer.w_o.bias.copy_(mha.out_proj.bias)


def test_matches_torch_multihead_attention(rng):
    """``nn.MultiheadAttention(kdim=vdim=C)``, same weights: both packages agree with it
    (float64), with a key-padding mask, weights per head."""
    d_model, heads = 16, 4
    mha = torch.nn.MultiheadAttention(d_model, heads, kdim=C, vdim=C, batch_first=True)
    mha = mha.double().eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    layer = at.MultiHeadSelfAttention(d_model, heads, context_dim=C, bias=True).double()
    _mha_weights(mha, layer)
    x, context = rng.standard_normal((B, L, d_model)), rng.standard_normal((B, S, C))
    lengths = np.array([S, 4])
    padded = np.arange(S)[None, :] >= lengths[:, None]  # MHA: True = ignore
    with torch.no_grad():
        expected, expected_w = mha(
            torch.tensor(x),
            torch.tensor(context),
            torch.tensor(context),
            key_padding_mask=torch.tensor(padded),
            average_attn_weights=False,
        )
    keep = aj.padding_mask(jnp.asarray(lengths), S)
    runs = run_both(
        layer,
        aj.MultiHeadSelfAttention(d_model, heads, context_dim=C, bias=True),
        x,
        np.asarray(keep),
        context=context,
    )
    for framework, (out, weights) in runs.items():
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-12, rtol=0, err_msg=framework)
        np.testing.assert_allclose(
            weights, expected_w.numpy(), atol=1e-12, rtol=0, err_msg=framework
        )


def test_matches_flax_multi_head_dot_product_attention(rng):
    """``flax.linen.MultiHeadDotProductAttention(inputs_q, inputs_kv)`` with our weights
    reshaped to its ``(in, H, D)`` / ``(H, D, out)`` kernels: both packages agree with it
    (float64), under a ``(B, 1, L, S)`` mask."""
    d_model, heads = 16, 4
    d_head = d_model // heads
    torch_layer = at.MultiHeadSelfAttention(d_model, heads, context_dim=C, bias=True).double()
    with torch.no_grad():
        for parameter in torch_layer.parameters():
            parameter.normal_(0.0, 0.3)
    params = torch_to_flax(torch_layer)
    theirs = {
        name: {
            "kernel": params[ours]["kernel"].reshape(-1, heads, d_head),
            "bias": params[ours]["bias"].reshape(heads, d_head),
        }
        for name, ours in (("query", "w_q"), ("key", "w_k"), ("value", "w_v"))
    }
    theirs["out"] = {
        "kernel": params["w_o"]["kernel"].reshape(heads, d_head, d_model),
        "bias": params["w_o"]["bias"],
    }
    mhdpa = fnn.MultiHeadDotProductAttention(
        num_heads=heads,
        qkv_features=d_model,
        out_features=d_model,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
    )
    x, context = rng.standard_normal((B, L, d_model)), rng.standard_normal((B, S, C))
    mask = rng.random((B, 1, L, S)) > 0.3
    mask[..., 0] = True  # Flax gives a blind row mean(V): keep every row seeing a key
    expected = mhdpa.apply(
        {"params": theirs}, jnp.asarray(x), jnp.asarray(context), mask=jnp.asarray(mask)
    )
    runs = run_both(
        torch_layer,
        aj.MultiHeadSelfAttention(d_model, heads, context_dim=C, bias=True),
        x,
        mask,
        context=context,
    )
    for framework, (out, _) in runs.items():
        np.testing.assert_allclose(out, np.asarray(expected), atol=1e-12, rtol=0, err_msg=framework)


def test_grouped_matches_sdpa_enable_gqa(rng):
    """GQA cross-attention equals SDPA with ``enable_gqa=True`` on the layer's own
    projections (PyTorch), and the Flax twin equals the PyTorch layer."""
    layer = at.GroupedSelfAttention(24, 6, 2, context_dim=C).double().eval()
    x = torch.tensor(rng.standard_normal((B, L, 24)))
    context = torch.tensor(rng.standard_normal((B, S, C)))
    with torch.no_grad():
        q = layer.w_q(x).view(B, L, 6, 4).transpose(1, 2)
        k = layer.w_k(context).view(B, S, 2, 4).transpose(1, 2)
        v = layer.w_v(context).view(B, S, 2, 4).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        expected = layer.w_o(attended.transpose(1, 2).reshape(B, L, 24)).numpy()
    runs = run_both(
        layer,
        aj.GroupedSelfAttention(24, 6, 2, context_dim=C),
        x.numpy(),
        None,
        context=context.numpy(),
        need_weights=False,
    )
    for framework, (out, _) in runs.items():
        np.testing.assert_allclose(out, expected, atol=1e-12, rtol=0, err_msg=framework)


def test_jax_jit_and_grad_through_context(rng):
    layer = aj.GroupedSelfAttention(24, 6, 3, context_dim=C)
    x, context = (
        jnp.asarray(rng.standard_normal((B, L, 24))),
        jnp.asarray(rng.standard_normal((B, S, C))),
    )
    variables = layer.init(jax.random.key(0), x, context=context)
    assert variables["params"]["w_k"]["kernel"].shape == (C, 12)

    def loss(context, need_weights):
        out, _ = layer.apply(variables, x, context=context, need_weights=need_weights)
        return (out**2).sum()

    grads = [
        jax.jit(jax.grad(loss), static_argnums=1)(context, need_weights)
        for need_weights in (True, False)
    ]
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-10, rtol=0)
    eager, _ = layer.apply(variables, x, context=context)
    jitted, _ = jax.jit(layer.apply)(variables, x, context=context)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-12, rtol=0)


@pytest.mark.slow
def test_torch_compile_cross_attention(rng):
    layer = at.MultiHeadSelfAttention(16, 4, context_dim=C).eval()
    x, context = torch.randn(B, L, 16), torch.randn(B, S, C)
    mask = at.padding_mask(torch.tensor([S, 5]), S)
    compiled = torch.compile(layer)
    for need_weights in (True, False):
        expected, expected_w = layer(x, mask, context=context, need_weights=need_weights)
        out, w = compiled(x, mask, context=context, need_weights=need_weights)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        if need_weights:
            torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=1e-6)


def _errors(mechanism, config, x, **call) -> list[str]:
    """The ``ValueError`` texts of both packages for one bad call (same text asserted)."""
    torch_layer, flax_layer = make_layers(mechanism, config)
    messages = []
    with pytest.raises(ValueError) as caught:
        torch_layer(
            torch.tensor(x),
            **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in call.items()},
        )
    messages.append(str(caught.value))
    with pytest.raises(ValueError) as caught:
        arrays = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in call.items()}
        flax_layer.init(jax.random.key(0), jnp.asarray(x), **arrays)
    messages.append(str(caught.value))
    assert messages[0] == messages[1]
    return messages


@pytest.mark.parametrize("mechanism", POSITIONAL, ids=lambda m: m.name)
def test_positional_mechanisms_refuse_context(mechanism, rng):
    x = rng.standard_normal((B, L, mechanism.kwargs["d_model"]))
    context = rng.standard_normal((B, S, mechanism.kwargs["d_model"]))
    message = _errors(mechanism, dict(mechanism.kwargs), x, context=context)[0]
    assert mechanism.class_name in message and "positions" in message


def test_rope_refuses_context(rng):
    config = {"d_model": 16, "num_heads": 4, "rope": True}
    x = rng.standard_normal((B, L, 16))
    message = _errors(by_name("multi_head"), config, x, context=x)[0]
    assert "MultiHeadSelfAttention with rope=True" in message


@pytest.mark.parametrize(
    "case, expected",
    [
        ("causal", "is_causal=True cannot be used with context"),
        ("width", f"expected context of shape (B, S, {C}), got (2, 11, 5)"),
        ("batch", "context batch 3 does not match the batch of x, B = 2"),
        ("empty", "expected a context length S >= 1"),
        ("square mask", f"mask of shape ({L}, {L}) does not fit (B, H, L, S)"),
        ("no context", f"context_dim={C} != input_dim=16"),
    ],
)
def test_bad_cross_attention_calls(case, expected, rng):
    mechanism = by_name("multi_head")
    config = {"d_model": 16, "num_heads": 4, "context_dim": C}
    x = rng.standard_normal((B, L, 16))
    context = rng.standard_normal((B, S, C))
    call = {
        "causal": {"context": context, "is_causal": True},
        "width": {"context": rng.standard_normal((B, S, 5))},
        "batch": {"context": rng.standard_normal((3, S, C))},
        "empty": {"context": rng.standard_normal((B, 0, C))},
        "square mask": {"context": context, "mask": np.ones((L, L), bool)},
        "no context": {},
    }[case]
    assert expected in _errors(mechanism, config, x, **call)[0]


def test_context_dim_is_validated():
    for make in (at.MultiHeadSelfAttention, aj.MultiHeadSelfAttention):
        with pytest.raises(ValueError, match="context_dim must be a positive integer, got 0"):
            layer = make(16, 4, context_dim=0)
            layer.init(jax.random.key(0), jnp.ones((1, 2, 16)))  # Flax validates on use

"""GroupedSelfAttention (GQA, MQA) in both frameworks: reference, parity, fast path, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at
from parity.mechanisms import by_name
from tests import helpers
from tests.reference import softmax_attention

B, L, E, H = 2, 7, 32, 4


GROUPED = by_name("grouped")


def _mask(kind: str, rng: np.random.Generator) -> np.ndarray | None:
    """``helpers.user_mask`` at this module's sizes."""
    return helpers.user_mask(kind, rng, B, L, H)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "batched"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_float64_reference(kv_heads, mask_kind, is_causal, rng):
    """Both frameworks, weights path and fast path, against repeat_interleave semantics."""
    config = {"d_model": E, "num_query_heads": H, "num_kv_heads": kv_heads, "bias": True}
    x = rng.standard_normal((B, L, E))
    helpers.check_reference(GROUPED, config, x, _mask(mask_kind, rng), is_causal)


def test_contiguous_groups_in_the_core(rng):
    """Query head h reads kv head ``h // G`` (repeat_interleave), not ``h % K`` (tile)."""
    q, k, v = (rng.standard_normal((1, n, 5, 8)) for n in (6, 2, 2))
    expected, _ = softmax_attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1))
    for need_weights in (True, False):
        runs = helpers.call_both(
            at.dot_product_attention, aj.dot_product_attention, q, k, v, need_weights=need_weights
        )
        for out, _ in runs.values():
            np.testing.assert_allclose(out, expected, atol=1e-12, rtol=0)


def test_torch_fast_path_does_not_repeat_kv(monkeypatch, rng):
    """SDPA receives the K kv heads and ``enable_gqa=True``, not repeated K/V."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1], kwargs["enable_gqa"]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    layer = at.GroupedSelfAttention(E, H, 1).eval()
    x = torch.tensor(rng.standard_normal((B, L, E)), dtype=torch.float32)
    layer(x, need_weights=False)
    layer(x, torch.tensor(_mask("padding", rng)), is_causal=True, need_weights=False)
    assert seen == [(H, 1, 1, True)] * 2


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_equals_multi_head_when_kv_heads_equal_query_heads(framework, rng):
    torch_gqa = at.GroupedSelfAttention(E, H, H, bias=True).double()
    torch_mha = at.MultiHeadSelfAttention(E, H, bias=True).double()
    torch_mha.load_state_dict(torch_gqa.state_dict())
    x = rng.standard_normal((B, L, E))
    mask = _mask("batched", rng)
    gqa = helpers.run_both(
        torch_gqa, aj.GroupedSelfAttention(E, H, H, bias=True), x, mask, is_causal=True
    )
    mha = helpers.run_both(
        torch_mha, aj.MultiHeadSelfAttention(E, H, bias=True), x, mask, is_causal=True
    )
    for got, want in zip(gqa[framework], mha[framework], strict=True):
        np.testing.assert_array_equal(got, want)


def test_mqa_projection_shapes():
    """``w_k``/``w_v`` are ``num_kv_heads * D`` wide; the state_dict holds only projections."""
    torch_layer = at.GroupedSelfAttention(E, 8, 1, input_dim=24, bias=True)
    d_head = E // 8
    shapes = {k: tuple(v.shape) for k, v in torch_layer.state_dict().items()}
    assert shapes == {
        "w_q.weight": (E, 24),
        "w_q.bias": (E,),
        "w_k.weight": (d_head, 24),
        "w_k.bias": (d_head,),
        "w_v.weight": (d_head, 24),
        "w_v.bias": (d_head,),
        "w_o.weight": (E, E),
        "w_o.bias": (E,),
    }
    flax_layer = aj.GroupedSelfAttention(E, 8, 1, input_dim=24, bias=True)
    params = flax_layer.init(jax.random.key(0), jnp.zeros((1, 3, 24)))["params"]
    assert params["w_k"]["kernel"].shape == (24, d_head)
    assert params["w_v"]["kernel"].shape == (24, d_head)
    out, weights = flax_layer.apply({"params": params}, jnp.zeros((1, 3, 24)))
    assert out.shape == (1, 3, E) and weights.shape == (1, 8, 3, 3)


@pytest.mark.parametrize(
    ("kv_heads", "dtype", "mask_kind", "jit"),
    [
        (1, "float64", "padding", False),
        (1, "float32", "padding", False),
        (1, "bfloat16", "padding", False),
        (2, "float32", "batched", True),
    ],
)
def test_parity(kv_heads, dtype, mask_kind, jit, rng):
    """MQA and GQA outputs and every gradient agree across frameworks within the tolerances, eager
    and under ``jax.jit`` (the registered GQA row runs through tests/test_parity.py)."""
    helpers.check_parity(
        at.GroupedSelfAttention(E, H, kv_heads),
        aj.GroupedSelfAttention(E, H, kv_heads),
        rng.standard_normal((B, L, E)),
        _mask(mask_kind, rng),
        is_causal=True,
        need_weights=False,
        dtype=dtype,
        jit=jit,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((E, 4, 3), "num_query_heads must be divisible by num_kv_heads"),
        ((E, 6, 2), "d_model must be divisible by num_heads"),
        ((E, 4, 0), "num_kv_heads must be a positive integer"),
    ],
)
def test_invalid_configuration(args, message):
    with pytest.raises(ValueError, match=message) as torch_error:
        at.GroupedSelfAttention(*args)
    with pytest.raises(ValueError, match=message) as jax_error:
        aj.GroupedSelfAttention(*args)
    assert str(torch_error.value) == str(jax_error.value)

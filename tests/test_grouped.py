"""GroupedSelfAttention (GQA, MQA) in both frameworks: reference, parity, fast path, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at
from parity import compare_layers, torch_to_flax
from tests.reference import self_attention

B, L, E, H = 2, 7, 32, 4


def _mask(kind: str, rng: np.random.Generator) -> np.ndarray | None:
    """A keep-mask: none, key padding ``(B, 1, 1, L)`` or ``(B, L, L)`` with a blind query."""
    if kind == "none":
        return None
    if kind == "padding":
        return (np.arange(L)[None, :] < np.array([L, 3])[:, None])[:, None, None, :]
    keep = rng.random((B, L, L)) > 0.4
    keep[1, 2] = False  # query 2 of sequence 1 sees no key
    return keep


def _reference_keep(mask: np.ndarray | None, is_causal: bool) -> np.ndarray:
    keep = np.ones((B, 1, L, L), bool)
    if mask is not None:
        keep = keep & (mask[:, None] if mask.ndim == 3 else mask)
    return keep & np.tril(np.ones((L, L), bool)) if is_causal else keep


def _both(torch_layer, flax_layer, x, mask, **call):
    """``{framework: (out, weights)}`` as float64 NumPy from the same weights."""
    torch_layer = torch_layer.double().eval()
    variables = {"params": torch_to_flax(torch_layer)}
    with torch.no_grad():
        t_out, t_w = torch_layer(
            torch.tensor(x), None if mask is None else torch.tensor(mask), **call
        )
    j_out, j_w = flax_layer.apply(
        variables, jnp.asarray(x), None if mask is None else jnp.asarray(mask), **call
    )
    return {
        "torch": (t_out.numpy(), None if t_w is None else t_w.numpy()),
        "jax": (np.asarray(j_out), None if j_w is None else np.asarray(j_w)),
    }


def _state(torch_layer) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in torch_layer.state_dict().items()}


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "blind_row"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_float64_reference(kv_heads, mask_kind, is_causal, rng):
    """Both frameworks, weights path and fast path, against repeat_interleave semantics."""
    torch_layer = at.GroupedSelfAttention(E, H, kv_heads, bias=True)
    flax_layer = aj.GroupedSelfAttention(E, H, kv_heads, bias=True)
    x = rng.standard_normal((B, L, E))
    mask = _mask(mask_kind, rng)
    keep = _reference_keep(mask, is_causal)
    ref_out, ref_w = self_attention(x, _state(torch_layer), H, kv_heads, keep)
    for need_weights in (True, False):
        runs = _both(
            torch_layer, flax_layer, x, mask, is_causal=is_causal, need_weights=need_weights
        )
        for out, weights in runs.values():
            np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
            if need_weights:
                np.testing.assert_allclose(weights, ref_w, atol=1e-12, rtol=0)
            else:
                assert weights is None


def test_contiguous_groups_in_the_core(rng):
    """Query head h reads kv head ``h // G`` (repeat_interleave), not ``h % K`` (tile)."""
    q, k, v = (rng.standard_normal((1, n, 5, 8)) for n in (6, 2, 2))
    expected, _ = at.dot_product_attention(
        torch.tensor(q),
        torch.tensor(k).repeat_interleave(3, 1),
        torch.tensor(v).repeat_interleave(3, 1),
    )
    for need_weights in (True, False):
        t_out, _ = at.dot_product_attention(
            *map(torch.tensor, (q, k, v)), need_weights=need_weights
        )
        j_out, _ = aj.dot_product_attention(*map(jnp.asarray, (q, k, v)), need_weights=need_weights)
        np.testing.assert_allclose(t_out.numpy(), expected.numpy(), atol=1e-12, rtol=0)
        np.testing.assert_allclose(np.asarray(j_out), expected.numpy(), atol=1e-12, rtol=0)


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
    mask = _mask("blind_row", rng)
    gqa = _both(torch_gqa, aj.GroupedSelfAttention(E, H, H, bias=True), x, mask, is_causal=True)
    mha = _both(torch_mha, aj.MultiHeadSelfAttention(E, H, bias=True), x, mask, is_causal=True)
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


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_mqa_parity(dtype, rng):
    """MQA outputs and every gradient agree across frameworks within SPEC §6 (the
    registered GQA row runs through tests/test_parity.py)."""
    report = compare_layers(
        at.GroupedSelfAttention(E, H, 1),
        aj.GroupedSelfAttention(E, H, 1),
        rng.standard_normal((B, L, E)),
        _mask("padding", rng),
        is_causal=True,
        need_weights=False,
        dtype=dtype,
    )
    assert report.passed, report.comparisons


def test_parity_under_jit(rng):
    report = compare_layers(
        at.GroupedSelfAttention(E, H, 2),
        aj.GroupedSelfAttention(E, H, 2),
        rng.standard_normal((B, L, E)),
        _mask("blind_row", rng),
        need_weights=False,
        dtype="float32",
        jit=True,
    )
    assert report.passed, report.comparisons


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

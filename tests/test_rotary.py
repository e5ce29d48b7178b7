"""RotarySelfAttention and the ``rope`` flag in both frameworks: RoPE properties, reference,
both layouts, parity, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at
from parity import compare_layers, torch_to_flax
from tests.reference import rotate, self_attention

B, L, E, H = 2, 9, 32, 4
D = E // H
LAYOUTS = {"interleaved": True, "half": False}


def _blind_row_mask(rng: np.random.Generator) -> np.ndarray:
    """``(B, L, L)`` random keep-mask in which query 2 of sequence 1 sees no key."""
    keep = rng.random((B, L, L)) > 0.4
    keep[1, 2] = False
    return keep


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


def _rope_both(x: np.ndarray, base: float, interleaved: bool) -> list[np.ndarray]:
    return [
        at.apply_rope(torch.tensor(x), base=base, interleaved=interleaved).numpy(),
        np.asarray(aj.apply_rope(jnp.asarray(x), base=base, interleaved=interleaved)),
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_scores_depend_only_on_relative_position(layout, base, rng):
    """The same q at every position and the same k at every position: after RoPE the score
    of (i, j) is a function of i - j, so the score matrix is constant along diagonals."""
    a, b = rng.standard_normal((2, 1, 1, 1, D))
    q, k = np.broadcast_to(a, (1, 1, L, D)), np.broadcast_to(b, (1, 1, L, D))
    for rq, rk in zip(*(_rope_both(t, base, LAYOUTS[layout]) for t in (q, k)), strict=True):
        scores = (rq @ np.swapaxes(rk, -1, -2))[0, 0]
        np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-12, rtol=0)
        assert np.ptp(scores[0]) > 1e-2  # but it does change with i - j


@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_rope_matches_explicit_rotations(layout, rng):
    x = rng.standard_normal((B, H, L, D))
    for got in _rope_both(x, 500.0, LAYOUTS[layout]):
        np.testing.assert_allclose(got, rotate(x, 500.0, layout), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rope_base", [10000.0, 500.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_float64_reference(layout, rope_base, is_causal, rng):
    """Weights path and fast path, both frameworks, a mask with a blind query."""
    options = {"rope_interleaved": LAYOUTS[layout], "bias": True}
    torch_layer = at.RotarySelfAttention(E, H, rope_base, **options)
    flax_layer = aj.RotarySelfAttention(E, H, rope_base, **options)
    x = rng.standard_normal((B, L, E))
    mask = _blind_row_mask(rng)
    keep = mask[:, None] & (np.tril(np.ones((L, L), bool)) if is_causal else True)
    state = {k: v.double().numpy() for k, v in torch_layer.state_dict().items()}
    ref_out, ref_w = self_attention(x, state, H, H, keep, rope=layout, rope_base=rope_base)
    for need_weights in (True, False):
        runs = _both(
            torch_layer, flax_layer, x, mask, is_causal=is_causal, need_weights=need_weights
        )
        for out, weights in runs.values():
            np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
            if need_weights:
                np.testing.assert_allclose(weights, ref_w, atol=1e-12, rtol=0)


def _alibi_bias(heads: int) -> np.ndarray:
    pos = np.arange(L)
    slopes = at.alibi_slopes(heads).numpy()
    return -slopes[None, :, None, None] * np.abs(pos[:, None] - pos[None, :])


ROPE_ON = {
    "multi_head": ("MultiHeadSelfAttention", (E, H), H, None),
    "grouped": ("GroupedSelfAttention", (E, H, 2), 2, None),
    "mqa": ("GroupedSelfAttention", (E, H, 1), 1, None),
    "alibi": ("ALiBiSelfAttention", (E, H), H, _alibi_bias(H)),
}


@pytest.mark.parametrize("config", ROPE_ON)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_flag_on_other_softmax_mechanisms(config, layout, rng):
    class_name, args, kv_heads, bias = ROPE_ON[config]
    options = {"rope": True, "rope_interleaved": LAYOUTS[layout]}
    torch_layer = getattr(at, class_name)(*args, **options)
    flax_layer = getattr(aj, class_name)(*args, **options)
    x = rng.standard_normal((B, L, E))
    state = {k: v.double().numpy() for k, v in torch_layer.state_dict().items()}
    ref_out, _ = self_attention(x, state, H, kv_heads, None, bias, rope=layout)
    for need_weights in (True, False):
        for out, _ in _both(torch_layer, flax_layer, x, None, need_weights=need_weights).values():
            np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)


def test_half_split_equals_interleaved_with_permuted_rows(rng):
    """Half-split RoPE on projections whose rows are permuted (per head: even rows first,
    then odd ones) computes what interleaved RoPE computes on the original rows: this is
    how GPT-J-style (interleaved) weights load into a GPT-NeoX/LLaMA-style (half) layer."""
    interleaved = at.RotarySelfAttention(E, H, rope_interleaved=True, bias=True).double()
    half = at.RotarySelfAttention(E, H, rope_interleaved=False, bias=True).double()
    per_head = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])
    rows = torch.tensor(np.concatenate([h * D + per_head for h in range(H)]))
    state = interleaved.state_dict()
    for name in ("w_q.weight", "w_q.bias", "w_k.weight", "w_k.bias"):
        state[name] = state[name][rows]
    half.load_state_dict(state)
    x = rng.standard_normal((B, L, E))
    mask = _blind_row_mask(rng)
    want = _both(interleaved, aj.RotarySelfAttention(E, H), x, mask, is_causal=True)
    got = _both(half, aj.RotarySelfAttention(E, H, rope_interleaved=False), x, mask, is_causal=True)
    for framework in ("torch", "jax"):
        for a, b in zip(got[framework], want[framework], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_half_split_parity(dtype, rng):
    """LLaMA layout with a small base, every gradient included, within SPEC §6 (the default
    configuration runs through tests/test_parity.py)."""
    report = compare_layers(
        at.RotarySelfAttention(E, H, 500.0, rope_interleaved=False),
        aj.RotarySelfAttention(E, H, 500.0, rope_interleaved=False),
        rng.standard_normal((B, L, E)),
        _blind_row_mask(rng),
        is_causal=True,
        dtype=dtype,
    )
    assert report.passed, report.comparisons


def test_parity_under_jit(rng):
    report = compare_layers(
        at.RotarySelfAttention(E, H, 500.0),
        aj.RotarySelfAttention(E, H, 500.0),
        rng.standard_normal((B, L, E)),
        _blind_row_mask(rng),
        need_weights=False,
        dtype="float64",
        jit=True,
    )
    assert report.passed, report.comparisons


def test_constructor_defaults_and_state():
    torch_layer, flax_layer = at.RotarySelfAttention(E, H), aj.RotarySelfAttention(E, H)
    for layer in (torch_layer, flax_layer):
        assert (layer.rope, layer.rope_interleaved, layer.rope_base) == (True, True, 10000.0)
    assert (
        at.RotarySelfAttention(E, H, 500).rope_base == aj.RotarySelfAttention(E, H, 500).rope_base
    )
    assert sorted(torch_layer.state_dict()) == [
        "w_k.weight",
        "w_o.weight",
        "w_q.weight",
        "w_v.weight",
    ]
    assert list(torch_layer.buffers()) == []
    params = flax_layer.init(jax.random.key(0), jnp.zeros((1, 3, E)))
    assert sorted(params) == ["params"] and sorted(params["params"]) == ["w_k", "w_o", "w_q", "w_v"]


def test_rope_false_is_multi_head(rng):
    rotary = at.RotarySelfAttention(E, H, rope=False).double()
    mha = at.MultiHeadSelfAttention(E, H).double()
    mha.load_state_dict(rotary.state_dict())
    x = rng.standard_normal((B, L, E))
    for got, want in zip(
        _both(rotary, aj.RotarySelfAttention(E, H, rope=False), x, None).values(),
        _both(mha, aj.MultiHeadSelfAttention(E, H), x, None).values(),
        strict=True,
    ):
        np.testing.assert_array_equal(got[0], want[0])


BAD = {
    "odd d_head": (("RotarySelfAttention", (30, 6), {}), "rope needs an even head width"),
    "odd d_head, multi-head": (
        ("MultiHeadSelfAttention", (12, 4), {"rope": True}),
        "rope needs an even head width",
    ),
    "odd d_head, grouped": (
        ("GroupedSelfAttention", (12, 4, 2), {"rope": True}),
        "rope needs an even head width",
    ),
    "odd d_head, alibi": (
        ("ALiBiSelfAttention", (12, 4), {"rope": True}),
        "rope needs an even head width",
    ),
    "zero base": (("RotarySelfAttention", (E, H, 0.0), {}), "rope_base must be"),
    "negative base": (("RotarySelfAttention", (E, H, -10.0), {}), "rope_base must be"),
    "nan base": (("RotarySelfAttention", (E, H, float("nan")), {}), "rope_base must be"),
    "infinite base": (("RotarySelfAttention", (E, H, float("inf")), {}), "rope_base must be"),
}


@pytest.mark.parametrize("case", BAD)
def test_invalid_configuration(case):
    (class_name, args, options), message = BAD[case]
    with pytest.raises(ValueError, match=message) as torch_error:
        getattr(at, class_name)(*args, **options)
    with pytest.raises(ValueError, match=message) as jax_error:
        getattr(aj, class_name)(*args, **options)
    assert str(torch_error.value) == str(jax_error.value)

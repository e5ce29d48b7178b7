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
from parity.mechanisms import by_name
from tests import helpers
from tests.reference import rotate

B, L, E, H = 2, 9, 32, 4
D = E // H
LAYOUTS = {"interleaved": True, "half": False}


def _blind_row_mask(rng: np.random.Generator) -> np.ndarray:
    """``(B, L, L)`` random keep-mask in which one query of the last sequence sees no key."""
    return helpers.user_mask("batched", rng, B, L)


def _rope_both(x: np.ndarray, base: float, interleaved: bool) -> list[np.ndarray]:
    return list(
        helpers.call_both(
            at.apply_rope, aj.apply_rope, x, base=base, interleaved=interleaved
        ).values()
    )


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
    config = {"d_model": E, "num_heads": H, "rope_base": rope_base, "bias": True}
    config["rope_interleaved"] = LAYOUTS[layout]
    x = rng.standard_normal((B, L, E))
    helpers.check_reference(by_name("rotary"), config, x, _blind_row_mask(rng), is_causal)


ROPE_ON = {
    "multi_head": ("multi_head", {"num_heads": H}),
    "grouped": ("grouped", {"num_query_heads": H, "num_kv_heads": 2}),
    "mqa": ("grouped", {"num_query_heads": H, "num_kv_heads": 1}),
    "alibi": ("alibi", {"num_heads": H}),
    "local": ("local", {"num_heads": H, "window_size": 5}),
    "linear": ("linear", {"num_heads": H}),
}
"""Registry rows, with their heads and sizes, that take ``rope=True`` besides the rotary one."""


@pytest.mark.parametrize("config", ROPE_ON)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_flag_on_other_mechanisms(config, layout, rng):
    name, arguments = ROPE_ON[config]
    options = {"d_model": E, **arguments, "rope": True, "rope_interleaved": LAYOUTS[layout]}
    x = rng.standard_normal((B, L, E))
    helpers.check_reference(by_name(name), options, x)


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
    want = helpers.run_both(interleaved, aj.RotarySelfAttention(E, H), x, mask, is_causal=True)
    flax_half = aj.RotarySelfAttention(E, H, rope_interleaved=False)
    got = helpers.run_both(half, flax_half, x, mask, is_causal=True)
    for framework in ("torch", "jax"):
        for a, b in zip(got[framework], want[framework], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_half_split_parity(dtype, rng):
    """LLaMA layout with a small base, every gradient included, within the tolerances (the default
    configuration runs through tests/test_parity.py)."""
    helpers.check_parity(
        at.RotarySelfAttention(E, H, rope_base=500.0, rope_interleaved=False),
        aj.RotarySelfAttention(E, H, rope_base=500.0, rope_interleaved=False),
        rng.standard_normal((B, L, E)),
        _blind_row_mask(rng),
        is_causal=True,
        dtype=dtype,
    )


def test_parity_under_jit(rng):
    helpers.check_parity(
        at.RotarySelfAttention(E, H, rope_base=500.0),
        aj.RotarySelfAttention(E, H, rope_base=500.0),
        rng.standard_normal((B, L, E)),
        _blind_row_mask(rng),
        need_weights=False,
        dtype="float64",
        jit=True,
    )


def test_constructor_defaults_and_state():
    torch_layer, flax_layer = at.RotarySelfAttention(E, H), aj.RotarySelfAttention(E, H)
    for layer in (torch_layer, flax_layer):
        assert (layer.rope, layer.rope_interleaved, layer.rope_base) == (True, True, 10000.0)
    for name in ("RotarySelfAttention", "MultiHeadSelfAttention"):
        torch_base = getattr(at, name)(E, H, rope_base=500.0).rope_base
        assert torch_base == getattr(aj, name)(E, H, rope_base=500.0).rope_base == 500.0
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
        helpers.run_both(rotary, aj.RotarySelfAttention(E, H, rope=False), x).values(),
        helpers.run_both(mha, aj.MultiHeadSelfAttention(E, H), x).values(),
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
    "zero base": (("RotarySelfAttention", (E, H), {"rope_base": 0.0}), "rope_base must be"),
    "negative base": (
        ("GroupedSelfAttention", (E, H, 2), {"rope": True, "rope_base": -10.0}),
        "rope_base must be",
    ),
    "nan base": (
        ("LocalSelfAttention", (E, 4, H), {"rope_base": float("nan")}),
        "rope_base must be",
    ),
    "infinite base": (
        ("LinearSelfAttention", (E, H), {"rope_base": float("inf")}),
        "rope_base must be",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_invalid_configuration(case):
    (class_name, args, options), message = BAD[case]
    with pytest.raises(ValueError, match=message) as torch_error:
        getattr(at, class_name)(*args, **options)
    with pytest.raises(ValueError, match=message) as jax_error:
        getattr(aj, class_name)(*args, **options)
    assert str(torch_error.value) == str(jax_error.value)


def test_llama3_grouped_layer_takes_its_rope_base(rng):
    """``GroupedSelfAttention(..., rope=True, rope_interleaved=False, rope_base=500000.0)``:
    LLaMA 3's attention, against the float64 reference, in both frameworks."""
    mechanism = by_name("grouped")
    config = {
        "d_model": 32,
        "num_query_heads": 4,
        "num_kv_heads": 2,
        "rope": True,
        "rope_interleaved": False,
        "rope_base": 500000.0,
    }
    x = rng.standard_normal((B, L, 32))
    helpers.check_reference(mechanism, config, x, is_causal=True)

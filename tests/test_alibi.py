"""ALiBiSelfAttention in both frameworks: slopes, bias, chunked fast path, parity, compile."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_jax.functional as jax_functional
import attentions_torch as at
import attentions_torch.functional as torch_functional
from parity import torch_to_flax
from parity.mechanisms import by_name
from tests import helpers, reference
from tests.reference import softmax_attention

B, L, E, H = 2, 7, 24, 6

# docs/semantics.md, written out by hand: the slopes for P = 2^floor(log2 H), then 2^(-4k/P), k odd
SLOPE_EXPONENTS = {
    1: [-8],
    6: [-2, -4, -6, -8, -1, -3],
    8: [-1, -2, -3, -4, -5, -6, -7, -8],
    12: [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5],
    20: [-0.5 * h for h in range(1, 17)] + [-0.25, -0.75, -1.25, -1.75],
}


def _paper_slopes(n: int) -> list[float]:
    """``get_slopes`` as published with the ALiBi paper (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_slopes(2 * closest)[0::2][: n - closest]


ALIBI = by_name("alibi")


def _mask(kind: str, rng: np.random.Generator, length: int = L) -> np.ndarray | None:
    """``helpers.user_mask`` at this module's sizes."""
    return helpers.user_mask(kind, rng, B, length, H)


def _check_against_reference(heads, length, mask, is_causal, rng, rope=None, **options):
    """Both frameworks, both paths, against the float64 reference; ``rope`` names a layout."""
    if rope is not None:
        options.update(rope=True, rope_interleaved=rope == "interleaved")
    config = {"d_model": 4 * heads, "num_heads": heads, **options}
    x = rng.standard_normal((B, length, 4 * heads))
    helpers.check_reference(ALIBI, config, x, mask, is_causal)


SLOPES = {
    "torch": lambda heads: at.alibi_slopes(heads).numpy(),
    "jax": lambda heads: np.asarray(aj.alibi_slopes(heads)),
    "reference": reference.alibi_slopes,
}
"""Both packages' slopes and the tests' own (tests/reference.py, which the layer checks use)."""


@pytest.mark.parametrize("source", SLOPES)
@pytest.mark.parametrize("heads", sorted(SLOPE_EXPONENTS))
def test_slopes_exact(source, heads):
    slopes = SLOPES[source](heads)
    assert slopes.dtype == np.float64
    np.testing.assert_array_equal(slopes, [2.0**e for e in SLOPE_EXPONENTS[heads]])


@pytest.mark.parametrize("source", SLOPES)
def test_slopes_match_the_paper_code_for_every_head_count(source):
    for heads in range(1, 65):
        np.testing.assert_allclose(SLOPES[source](heads), _paper_slopes(heads), rtol=1e-14)
    # the pitfall: the power-of-two slopes repeated for the remainder
    assert SLOPES[source](6).tolist()[4:] != SLOPES[source](4).tolist()[:2]


@pytest.mark.parametrize("heads", [1, 6, 8])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_float64_reference(heads, is_causal, rng):
    """Weights path and fast path, both frameworks, a mask with a blind query."""
    _check_against_reference(heads, L, _mask("batched", rng), is_causal, rng)


@pytest.mark.parametrize("length", [1, 40])
def test_any_length(length, rng):
    """No maximum length: the bias is made per call for the L at hand."""
    _check_against_reference(H, length, _mask("padding", rng, length), True, rng, temperature=0.7)


def test_rope_and_bias_options(rng):
    _check_against_reference(H, L, None, False, rng, rope="half", bias=True)


def test_state_holds_only_projections():
    layer = at.ALiBiSelfAttention(E, H)
    assert sorted(layer.state_dict()) == ["w_k.weight", "w_o.weight", "w_q.weight", "w_v.weight"]
    assert list(layer.buffers()) == []
    params = aj.ALiBiSelfAttention(E, H).init(jax.random.key(0), jnp.zeros((1, 3, E)))
    assert sorted(params) == ["params"]
    assert sorted(params["params"]) == ["w_k", "w_o", "w_q", "w_v"]
    assert aj.AlibiSelfAttention is aj.ALiBiSelfAttention
    assert at.AlibiSelfAttention is at.ALiBiSelfAttention


def test_core_slopes_equal_an_explicit_bias(rng):
    """``alibi_slopes=`` in the core equals passing ``alibi_bias`` as ``bias``, with a bias."""
    q, k, v = (rng.standard_normal((B, n, 9, 4)) for n in (6, 2, 2))
    extra = rng.standard_normal((B, 1, 9, 9))
    keep = _mask("batched", rng, 9)[:, None]
    ref_out, ref_w = softmax_attention(q, k, v, keep, extra + reference.alibi_bias(6, 9))
    for need_weights in (True, False):
        runs = helpers.call_both(
            at.dot_product_attention,
            aj.dot_product_attention,
            q,
            k,
            v,
            keep,
            bias=extra,
            alibi_slopes=reference.alibi_slopes(6),
            need_weights=need_weights,
        )
        for out, weights in runs.values():
            np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
            if need_weights:
                np.testing.assert_allclose(weights, ref_w, atol=1e-12, rtol=0)


def _spy_on_sdpa(monkeypatch) -> list:
    """Record the ``attn_mask`` of every SDPA call."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return masks


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_fast_path_reads_bias_from_h_by_2l_values(monkeypatch, rng, is_causal, dtype):
    """Without a mask, SDPA gets one rank-4 bias view over ``H·(2L − 1)`` numbers (O(H·L)
    memory) and gives the output of the materialized bias, to the last few bits (a float64
    SDPA may round one ulp differently with a strided mask)."""
    heads, length, d_head = 4, 37, 8
    q, k, v = (
        torch.tensor(rng.standard_normal((2, heads, length, d_head))).to(dtype) for _ in "qkv"
    )
    slopes = at.alibi_slopes(heads)
    bias = at.functional.alibi_bias(slopes.double(), torch.arange(length), length)[None]
    keep = torch.ones(length, length, dtype=torch.bool)
    keep = keep.tril() if is_causal else keep
    bias = bias.to(dtype).masked_fill(~keep, torch.finfo(dtype).min)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    masks = _spy_on_sdpa(monkeypatch)
    out, _ = at.dot_product_attention(
        q, k, v, alibi_slopes=slopes, is_causal=is_causal, need_weights=False
    )
    [mask] = masks
    assert mask.shape == (1, heads, length, length)
    assert mask.untyped_storage().nbytes() == heads * (2 * length - 1) * mask.element_size()
    ulps = 4 * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=ulps, rtol=0)
    weights_path, _ = at.dot_product_attention(
        q.double(), k.double(), v.double(), alibi_slopes=slopes, is_causal=is_causal
    )
    torch.testing.assert_close(out.double(), weights_path, **_TOLERANCE[dtype])


_TOLERANCE = {
    torch.float64: {"atol": 1e-12, "rtol": 0},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def test_torch_fast_path_bias_is_per_query_chunk(monkeypatch, rng):
    """With a mask, SDPA never sees more than ``QUERY_CHUNK`` rows of bias (O(H·chunk·L)
    memory), and sees it as a rank-4 mask (a rank-3 one sends CPU SDPA to its slow math
    kernel)."""
    monkeypatch.setattr(torch_functional, "QUERY_CHUNK", 8)
    masks = _spy_on_sdpa(monkeypatch)
    length = 20
    _check_against_reference(H, length, _mask("padding", rng, length), True, rng)
    assert [(mask.dim(), mask.shape[-2]) for mask in masks] == [(4, 8), (4, 8), (4, 4)]


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest value any equation (nested ones included) produces."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                sizes.append(_largest_intermediate(inner))
    return max(sizes)


def test_jax_fast_path_bias_is_per_query_chunk(monkeypatch, rng):
    """The traced fast path holds no ``(H, L, L)`` value; the weights path does."""
    monkeypatch.setattr(jax_functional, "QUERY_CHUNK", 8)
    heads, d_model, length = 4, 16, 64
    layer = aj.ALiBiSelfAttention(d_model, heads)
    x = jnp.asarray(rng.standard_normal((1, length, d_model)))
    variables = layer.init(jax.random.key(0), x)
    fast = jax.make_jaxpr(partial(layer.apply, is_causal=True, need_weights=False))
    slow = jax.make_jaxpr(partial(layer.apply, is_causal=True, need_weights=True))
    assert _largest_intermediate(fast(variables, x).jaxpr) <= heads * 8 * length
    assert _largest_intermediate(slow(variables, x).jaxpr) >= heads * length * length


@pytest.mark.parametrize(
    ("dtype", "mask_kind", "jit"),
    [
        ("float64", "batched", False),
        ("float32", "batched", False),
        ("bfloat16", "batched", False),
        ("float64", "padding", True),
    ],
)
def test_chunked_fast_path_parity(dtype, mask_kind, jit, monkeypatch, rng):
    """Both frameworks on several query chunks agree within the tolerances, gradients included,
    eager and under ``jax.jit``."""
    monkeypatch.setattr(torch_functional, "QUERY_CHUNK", 4)
    monkeypatch.setattr(jax_functional, "QUERY_CHUNK", 4)
    helpers.check_parity(
        at.ALiBiSelfAttention(32, 8),
        aj.ALiBiSelfAttention(32, 8),
        rng.standard_normal((B, 13, 32)),
        _mask(mask_kind, rng, 13),
        is_causal=True,
        need_weights=False,
        dtype=dtype,
        jit=jit,
    )


def test_dropout_in_training(rng):
    """Dropout changes the output in training only; the returned weights are before it."""
    x = rng.standard_normal((B, L, E))
    torch_layer = at.ALiBiSelfAttention(E, H, dropout=0.5).double()
    eval_out, eval_w = torch_layer.eval()(torch.tensor(x))
    train_out, train_w = torch_layer.train()(torch.tensor(x))
    assert not torch.allclose(train_out, eval_out)
    torch.testing.assert_close(train_w, eval_w)
    flax_layer = aj.ALiBiSelfAttention(E, H, dropout=0.5)
    variables = {"params": torch_to_flax(torch_layer)}
    eval_out, eval_w = flax_layer.apply(variables, jnp.asarray(x))
    train_out, train_w = flax_layer.apply(
        variables, jnp.asarray(x), deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.allclose(train_out, eval_out) and np.isfinite(train_out).all()
    np.testing.assert_allclose(train_w, eval_w, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_equals_eager(rng):
    """The fast path (bias from positions, masked SDPA, zeroed blind rows) compiles."""
    layer = at.ALiBiSelfAttention(E, H).eval()
    x = torch.tensor(rng.standard_normal((B, L, E)), dtype=torch.float32)
    mask = torch.tensor(_mask("batched", rng))
    eager, _ = layer(x, mask, is_causal=True, need_weights=False)
    got, _ = torch.compile(layer)(x, mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)


def test_invalid_head_count():
    for make in (at.alibi_slopes, aj.alibi_slopes):
        with pytest.raises(ValueError, match="num_heads must be a positive integer, got 0"):
            make(0)
    with pytest.raises(ValueError, match="d_model must be divisible by num_heads") as torch_error:
        at.ALiBiSelfAttention(E, 5)
    with pytest.raises(ValueError, match="d_model must be divisible by num_heads") as jax_error:
        aj.ALiBiSelfAttention(E, 5)
    assert str(torch_error.value) == str(jax_error.value)

"""The functional core of both packages against the float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax.functional as jf
import attentions_torch.functional as tf
from attentions_jax import masks as jmasks
from attentions_torch import masks as tmasks
from tests import helpers, reference
from tests.reference import softmax_attention

B, H, L, D = 2, 4, 11, 8


def _qkv(rng, kv_heads=H, dtype=np.float64):
    q = rng.standard_normal((B, H, L, D)).astype(dtype)
    k = rng.standard_normal((B, kv_heads, L, D)).astype(dtype)
    v = rng.standard_normal((B, kv_heads, L, D)).astype(dtype)
    return q, k, v


def _run_both(q, k, v, keep, **call) -> dict[str, tuple]:
    """``{framework: (out, weights)}`` of both cores on the same NumPy arguments."""
    return helpers.call_both(
        tf.dot_product_attention, jf.dot_product_attention, q, k, v, keep, **call
    )


@pytest.mark.parametrize("mask_kind", helpers.MASK_KINDS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_core_matches_float64_reference(rng, mask_kind, is_causal, need_weights):
    """Every kind of keep-mask, broadcast to rank 4 as the layers hand it to the core."""
    q, k, v = _qkv(rng)
    mask = helpers.user_mask(mask_kind, rng, B, L, H)
    keep4 = None if mask is None else reference.keep_mask(L, mask)
    ref_out, ref_w = softmax_attention(q, k, v, reference.keep_mask(L, mask, is_causal))
    runs = _run_both(q, k, v, keep4, is_causal=is_causal, need_weights=need_weights)
    for out, w in runs.values():
        np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
        if need_weights:
            np.testing.assert_allclose(w, ref_w, atol=1e-12, rtol=0)
        else:
            assert w is None


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_heads_and_bias(rng, kv_heads):
    q, k, v = _qkv(rng, kv_heads)
    bias = -0.3 * np.abs(np.arange(L)[:, None] - np.arange(L)[None, :]) * np.ones((H, 1, 1))
    ref_out, ref_w = softmax_attention(q, k, v, None, bias)
    for need_weights in (True, False):
        for out, w in _run_both(q, k, v, None, bias=bias, need_weights=need_weights).values():
            np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
            if need_weights:
                np.testing.assert_allclose(w, ref_w, atol=1e-12, rtol=0)


def test_fully_masked_rows_are_zero_with_finite_gradients(rng):
    q, k, v = _qkv(rng, dtype=np.float32)
    keep = np.ones((1, 1, L, L), bool)
    keep[..., 4, :] = False
    for need_weights in (True, False):
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        out, w = tf.dot_product_attention(tq, tk, tv, torch.tensor(keep), need_weights=need_weights)
        out.sum().backward()
        assert torch.all(out[:, :, 4] == 0)
        assert all(torch.isfinite(t.grad).all() for t in (tq, tk, tv))
        if need_weights:
            assert torch.all(w[:, :, 4] == 0)

        def loss(q, k, v, need_weights=need_weights):
            out, _ = jf.dot_product_attention(q, k, v, jnp.asarray(keep), need_weights=need_weights)
            return out.sum()

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(a) for a in (q, k, v)))
        jout, _ = jf.dot_product_attention(
            *(jnp.asarray(a) for a in (q, k, v)), jnp.asarray(keep), need_weights=need_weights
        )
        assert np.all(np.asarray(jout)[:, :, 4] == 0)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_low_precision_keeps_dtype_and_accuracy(rng):
    q, k, v = _qkv(rng, dtype=np.float32)
    ref_out, _ = softmax_attention(q, k, v)
    t_out, t_w = tf.dot_product_attention(*(torch.tensor(a).bfloat16() for a in (q, k, v)))
    j_out, j_w = jf.dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert t_out.dtype == torch.bfloat16 and t_w.dtype == torch.bfloat16
    assert j_out.dtype == jnp.bfloat16 and j_w.dtype == jnp.bfloat16
    scale = np.abs(ref_out).max()
    assert np.abs(t_out.float().numpy() - ref_out).max() <= 2e-2 * scale
    assert np.abs(np.asarray(j_out, np.float64) - ref_out).max() <= 2e-2 * scale


STEP_MODES = {
    # (QUERY_CHUNK, UNIT_CHUNK, STEP_PAIRS) with L = 23, S = 23, G = 2 below
    "all heads per step": (8, 1024, 2**21),
    "one head group per step": (8, 8, 2 * 8 * 23),
}


@pytest.mark.parametrize("mode", sorted(STEP_MODES))
@pytest.mark.parametrize("mask_kind", helpers.MASK_KINDS)
def test_fast_path_steps_match_the_weights_path(mode, mask_kind, monkeypatch, rng):
    """Steps over all heads or over one head group, with a ragged last chunk (L = 23 is
    2.9 chunks of 8), GQA, a bias and ALiBi slopes: the padding and the slicing of every
    broadcast shape must not leak into the result."""
    query_chunk, unit_chunk, step_pairs = STEP_MODES[mode]
    monkeypatch.setattr(jf, "QUERY_CHUNK", query_chunk)
    monkeypatch.setattr(jf, "UNIT_CHUNK", unit_chunk)
    monkeypatch.setattr(jf, "STEP_PAIRS", step_pairs)
    batch, heads, kv_heads, length = 2, 6, 3, 23
    q = jnp.asarray(rng.standard_normal((batch, heads, length, 4)))
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, length, 4))) for _ in "kv")
    mask = helpers.user_mask(mask_kind, rng, batch, length, heads)
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]  # (B, 1, L, L), as the layers hand a rank-3 mask to the core
    mask = None if mask is None else jnp.asarray(mask)
    bias = jnp.asarray(rng.standard_normal((1, heads, length, length)))
    slopes = jnp.asarray(rng.random(heads))
    for is_causal in (False, True):
        for extra in ({}, {"bias": bias, "alibi_slopes": slopes}):
            call = dict(mask=mask, is_causal=is_causal, **extra)
            fast, _ = jf.dot_product_attention(q, k, v, need_weights=False, **call)
            slow, weights = jf.dot_product_attention(q, k, v, need_weights=True, **call)
            np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=1e-12, rtol=0)
            blind = ~np.asarray(weights).any(-1)
            assert np.all(np.asarray(fast)[blind] == 0)


@pytest.mark.parametrize("builder", ["causal", "local", "dilated", "block"])
def test_mask_builders_agree_with_definitions(builder):
    length, size = 10, {"causal": 0, "local": 5, "dilated": 3, "block": 4}[builder]
    args = (length, size) if size else (length,)
    if builder == "causal":
        expected = reference.keep_mask(length, is_causal=True)[0, 0]
    else:
        expected = reference.pattern_keep(builder, size, length)
    runs = helpers.call_both(
        getattr(tmasks, f"{builder}_mask"), getattr(jmasks, f"{builder}_mask"), *args
    )
    for mask in runs.values():
        np.testing.assert_array_equal(mask, expected)


def test_padding_and_combine_masks():
    lengths = np.array([3, 5])
    expected = (np.arange(5)[None] < lengths[:, None])[:, None, None, :]
    np.testing.assert_array_equal(tmasks.padding_mask(torch.tensor(lengths), 5).numpy(), expected)
    np.testing.assert_array_equal(
        np.asarray(jmasks.padding_mask(jnp.asarray(lengths), 5)), expected
    )
    both = expected & np.tril(np.ones((5, 5), bool))
    t = tmasks.combine_masks(
        None, tmasks.padding_mask(torch.tensor(lengths), 5), tmasks.causal_mask(5), None
    )
    j = jmasks.combine_masks(
        None, jmasks.padding_mask(jnp.asarray(lengths), 5), jmasks.causal_mask(5)
    )
    np.testing.assert_array_equal(t.numpy(), both)
    np.testing.assert_array_equal(np.asarray(j), both)
    assert tmasks.combine_masks(None, None) is None and jmasks.combine_masks() is None

"""The functional core of both packages against the float64 NumPy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax.functional as jf
import attentions_torch.functional as tf
from attentions_jax import masks as jmasks
from attentions_torch import masks as tmasks
from tests.reference import softmax_attention

B, H, L, D = 2, 4, 11, 8


def _qkv(rng, kv_heads=H, dtype=np.float64):
    q = rng.standard_normal((B, H, L, D)).astype(dtype)
    k = rng.standard_normal((B, kv_heads, L, D)).astype(dtype)
    v = rng.standard_normal((B, kv_heads, L, D)).astype(dtype)
    return q, k, v


def _run_both(q, k, v, keep, *, is_causal=False, need_weights=True, bias=None):
    t_keep = None if keep is None else torch.tensor(keep)
    t_bias = None if bias is None else torch.tensor(bias)
    t_out, t_w = tf.dot_product_attention(
        *(torch.tensor(a) for a in (q, k, v)),
        t_keep,
        bias=t_bias,
        is_causal=is_causal,
        need_weights=need_weights,
    )
    j_keep = None if keep is None else jnp.asarray(keep)
    j_bias = None if bias is None else jnp.asarray(bias)
    j_out, j_w = jf.dot_product_attention(
        *(jnp.asarray(a) for a in (q, k, v)),
        j_keep,
        bias=j_bias,
        is_causal=is_causal,
        need_weights=need_weights,
    )
    as_np = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    return (t_out.numpy(), as_np(t_w)), (np.asarray(j_out), as_np(j_w))


def _keep_cases(rng):
    full = rng.random((B, H, L, L)) > 0.4
    full[0, 1, 3] = False  # a query that sees nothing
    return {
        "none": None,
        "rank2": rng.random((L, L)) > 0.3,
        "rank3": rng.random((B, L, L)) > 0.3,
        "padding": (np.arange(L)[None, :] < np.array([L, 6])[:, None])[:, None, None, :],
        "rank4_with_empty_row": full,
    }


@pytest.mark.parametrize("case", ["none", "rank2", "rank3", "padding", "rank4_with_empty_row"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_core_matches_float64_reference(rng, case, is_causal, need_weights):
    q, k, v = _qkv(rng)
    keep = _keep_cases(rng)[case]
    if keep is not None and keep.ndim < 4:
        keep4 = keep[None, None] if keep.ndim == 2 else keep[:, None]
    else:
        keep4 = keep
    ref_keep = keep4
    if is_causal:
        causal = np.tril(np.ones((L, L), bool))
        ref_keep = causal if keep4 is None else keep4 & causal
    ref_out, ref_w = softmax_attention(q, k, v, ref_keep)
    for out, w in _run_both(q, k, v, keep4, is_causal=is_causal, need_weights=need_weights):
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
        for out, w in _run_both(q, k, v, None, bias=bias, need_weights=need_weights):
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

        import jax

        def loss(q, k, v, need_weights=need_weights):
            return jf.dot_product_attention(q, k, v, jnp.asarray(keep), need_weights=need_weights)[
                0
            ].sum()

        grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(a) for a in (q, k, v)))
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


def _step_mask(kind: str, rng, batch: int, heads: int, length: int) -> np.ndarray | None:
    """Keep-masks of every broadcast shape the steps slice, with a blind query."""
    shape = {
        "none": None,
        "padding": (batch, 1, 1, length),
        "square": (length, length),
        "per_head": (batch, heads, length, length),
        "per_query": (batch, 1, length, 1),
    }[kind]
    if shape is None:
        return None
    keep = rng.random(shape) > 0.4
    if kind in ("square", "per_head"):
        keep[..., 3, :] = False  # query 3 sees no key
    return keep


@pytest.mark.parametrize("mode", sorted(STEP_MODES))
@pytest.mark.parametrize("mask_kind", ["none", "padding", "square", "per_head", "per_query"])
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
    mask = _step_mask(mask_kind, rng, batch, heads, length)
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
    length = 10
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    expected, t_mask, j_mask = {
        "causal": (j <= i, tmasks.causal_mask(length), jmasks.causal_mask(length)),
        "local": (np.abs(i - j) <= 2, tmasks.local_mask(length, 5), jmasks.local_mask(length, 5)),
        "dilated": (
            (i - j) % 3 == 0,
            tmasks.dilated_mask(length, 3),
            jmasks.dilated_mask(length, 3),
        ),
        "block": (i // 4 == j // 4, tmasks.block_mask(length, 4), jmasks.block_mask(length, 4)),
    }[builder]
    np.testing.assert_array_equal(t_mask.numpy(), expected)
    np.testing.assert_array_equal(np.asarray(j_mask), expected)


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

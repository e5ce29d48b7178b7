"""Decoding with a KV cache, dense family (docs/semantics.md "Decoding with a cache", issue 13).

A prompt and then one token per call give ``layer(x, is_causal=True)``; a batch of prompts
of different lengths gives each sequence what decoding it alone gives; a jitted JAX step
compiles once for every position and runs as a ``lax.scan`` body; a compiled PyTorch step
does not recompile; a cache moves from PyTorch to JAX and decoding goes on; an overflow is
an error eagerly and NaN when traced; bad input raises the same text in both packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

import attentions_jax as aj
import attentions_torch as at
from parity import torch_to_flax
from parity.mechanisms import MECHANISMS, Mechanism, by_name
from tests.helpers import input_width, make_layers

needs_x64 = pytest.mark.skipif(
    not jax.config.jax_enable_x64, reason="float64 references need JAX's 64-bit mode"
)

DENSE = [m for m in MECHANISMS if m.pattern in ("dense", "alibi", "rope")]
NOT_DECODING = [m for m in MECHANISMS if m not in DENSE]

CONFIGS = [
    *[(m.name, m, {}) for m in DENSE],
    ("multi_head_bias", by_name("multi_head"), {"bias": True}),
    ("grouped_rope_interleaved", by_name("grouped"), {"rope": True}),
    ("grouped_rope_half", by_name("grouped"), {"rope": True, "rope_interleaved": False}),
    ("mqa_rope_llama3", by_name("grouped"), {"num_kv_heads": 1, "rope": True, "rope_base": 5e5}),
    ("alibi_rope", by_name("alibi"), {"rope": True}),
]
"""Every dense-family registry row, then RoPE in both layouts on GQA and MQA, biases,
ALiBi with RoPE."""

B, L, PROMPT, MAX_LENGTH = 2, 11, 5, 16


def _layers(mechanism: Mechanism, overrides: dict[str, Any], dtype=torch.float64):
    """``(torch_layer, flax_layer, variables)`` with the same weights in ``dtype``."""
    torch_layer, flax_layer = make_layers(mechanism, {**mechanism.kwargs, **overrides})
    torch_layer = torch_layer.to(dtype).eval()
    return torch_layer, flax_layer, {"params": torch_to_flax(torch_layer)}


def _jax_step(flax_layer):
    """The Flax ``decode`` under ``jax.jit`` (one compilation per shape of x and mask)."""
    return jax.jit(
        lambda variables, cache, x, mask: flax_layer.apply(
            variables, cache, x, mask, method="decode"
        )
    )


def _calls(x: np.ndarray, splits: Sequence[int], masks: Sequence[np.ndarray | None] | None):
    """``(x_chunk, mask)`` per decoding call: x cut at ``splits`` along T."""
    chunks = np.split(x, splits, axis=1)
    return zip(chunks, masks or [None] * len(chunks), strict=True)


def decode_torch(layer, x, splits, masks=None, max_length=MAX_LENGTH, cache=None):
    """``(cache, out)``: x fed to ``layer.decode`` in the chunks ``splits`` makes, the outputs
    concatenated along T, as NumPy."""
    cache = layer.init_cache(x.shape[0], max_length) if cache is None else cache
    outs = []
    with torch.no_grad():
        for chunk, mask in _calls(x, splits, masks):
            mask = None if mask is None else torch.tensor(mask)
            cache, out = layer.decode(
                cache, torch.tensor(chunk, dtype=layer.w_q.weight.dtype), mask
            )
            outs.append(out.numpy())
    return cache, np.concatenate(outs, axis=1)


def decode_jax(layer, variables, x, splits, masks=None, max_length=MAX_LENGTH, cache=None):
    """As ``decode_torch``, with the Flax layer under ``jax.jit``."""
    if cache is None:
        cache = layer.apply(variables, x.shape[0], max_length, method="init_cache")
    step, outs = _jax_step(layer), []
    dtype = variables["params"]["w_q"]["kernel"].dtype
    for chunk, mask in _calls(x, splits, masks):
        cache, out = step(variables, cache, jnp.asarray(chunk, dtype), mask)
        outs.append(np.asarray(out))
    return cache, np.concatenate(outs, axis=1)


def _prompt_then_tokens(length: int, prompt: int) -> list[int]:
    """Splits of a prompt of ``prompt`` tokens, then one token per call up to ``length``."""
    return list(range(prompt, length))


@needs_x64
@pytest.mark.parametrize(("name", "mechanism", "overrides"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_prompt_then_tokens_equal_the_causal_forward(name, mechanism, overrides, rng):
    torch_layer, flax_layer, variables = _layers(mechanism, overrides)
    x = rng.standard_normal((B, L, input_width(mechanism, {**mechanism.kwargs, **overrides})))
    with torch.no_grad():
        want = torch_layer(torch.tensor(x), is_causal=True)[0].numpy()
    splits = _prompt_then_tokens(L, PROMPT)
    for framework, (cache, out) in {
        "torch": decode_torch(torch_layer, x, splits),
        "jax": decode_jax(flax_layer, variables, x, splits),
    }.items():
        np.testing.assert_allclose(out, want, atol=1e-10, rtol=0, err_msg=framework)
        np.testing.assert_array_equal(np.asarray(cache.lengths), [L] * B, err_msg=framework)


PROMPT_MASK = np.array(
    [
        [1, 1, 1, 1, 1],  # a full prompt
        [0, 0, 1, 1, 1],  # left-padded
        [1, 1, 1, 1, 0],  # right-padded
    ],
    dtype=bool,
)
STEP_MASKS = [np.ones((3, 1), bool), np.array([[1], [0], [1]], bool), np.ones((3, 1), bool)]
"""Three steps after the prompt; the second sequence skips the middle one."""


@needs_x64
@pytest.mark.parametrize(
    ("mechanism", "overrides"),
    [(by_name("alibi"), {}), (by_name("grouped"), {"rope": True, "rope_interleaved": False})],
    ids=["alibi", "grouped_rope_half"],
)
def test_prompts_of_different_lengths_decode_as_alone(mechanism, overrides, rng):
    """Each sequence of a padded batch gets what decoding its real tokens alone gives
    (outputs and cache); padded tokens' outputs are exactly zero."""
    torch_layer, flax_layer, variables = _layers(mechanism, overrides)
    masks = [PROMPT_MASK, *STEP_MASKS]
    real = np.concatenate(masks, axis=1)
    x = rng.standard_normal((3, real.shape[1], mechanism.kwargs["d_model"]))
    x[~real] = 1e3  # padded tokens carry values that would show if they were seen
    splits = [PROMPT + i for i in range(len(STEP_MASKS))]
    runs = {
        "torch": decode_torch(torch_layer, x, splits, masks),
        "jax": decode_jax(flax_layer, variables, x, splits, masks),
    }
    for b in range(3):
        alone = x[b : b + 1, real[b]]
        prompt = int(PROMPT_MASK[b].sum())
        want_cache, want = decode_torch(
            torch_layer, alone, _prompt_then_tokens(len(alone[0]), prompt)
        )
        count = int(real[b].sum())
        for framework, (cache, out) in runs.items():
            where = f"{framework}, sequence {b}"
            np.testing.assert_allclose(out[b, real[b]], want[0], atol=1e-10, rtol=0, err_msg=where)
            assert not np.any(out[b, ~real[b]]), where
            assert int(cache.lengths[b]) == count, where
            for field in ("keys", "values"):
                got = np.asarray(getattr(cache, field))[b, :, :count]
                ref = getattr(want_cache, field).numpy()[0, :, :count]
                np.testing.assert_allclose(got, ref, atol=1e-10, rtol=0, err_msg=where)


@needs_x64
def test_jax_decode_compiles_once_and_scans(rng):
    """A jitted step traces once for every position of a (B, T); a ``lax.scan`` over single
    tokens and eager (un-jitted) calls give the same outputs, equal to the causal forward."""
    mechanism = by_name("alibi")
    torch_layer, flax_layer, variables = _layers(mechanism, {"rope": True})
    x = jnp.asarray(rng.standard_normal((B, L, mechanism.kwargs["d_model"])))
    with torch.no_grad():
        want = torch_layer(torch.tensor(np.asarray(x)), is_causal=True)[0].numpy()

    traces = []

    @jax.jit
    def step(cache, token):
        traces.append(token.shape)
        return flax_layer.apply(variables, cache, token, method="decode")

    @jax.jit
    def generate(cache, tokens):
        body = lambda cache, token: step(cache, token[:, None])  # noqa: E731
        cache, outs = lax.scan(body, cache, tokens.swapaxes(0, 1))
        return cache, outs[:, :, 0].swapaxes(0, 1)

    start = flax_layer.apply(variables, B, MAX_LENGTH, method="init_cache")
    start, prompt_out = flax_layer.apply(variables, start, x[:, :PROMPT], method="decode")
    stepped, cache = [], start
    for t in range(PROMPT, L):
        cache, out = step(cache, x[:, t : t + 1])
        stepped.append(out)
    assert len(traces) == 1 and step._cache_size() == 1
    scanned_cache, scanned = generate(start, x[:, PROMPT:])
    eager, cache_e = [], start
    for t in range(PROMPT, PROMPT + 2):  # un-jitted calls are slow: two positions
        cache_e, out = flax_layer.apply(variables, cache_e, x[:, t : t + 1], method="decode")
        eager.append(out)
    stepped = np.concatenate(stepped, axis=1)
    np.testing.assert_allclose(np.asarray(prompt_out), want[:, :PROMPT], atol=1e-10, rtol=0)
    np.testing.assert_allclose(stepped, want[:, PROMPT:], atol=1e-10, rtol=0)
    np.testing.assert_allclose(np.asarray(scanned), stepped, atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.concatenate(eager, axis=1), stepped[:, :2], atol=1e-12, rtol=0)
    for a, b in zip(scanned_cache, cache, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_torch_compile_decode_does_not_recompile(monkeypatch, rng):
    """One compiled step serves every position (dynamo's ``error_on_recompile``), equals
    eager, and past the cache's end gives NaN instead of raising (documented)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    layer = at.GroupedSelfAttention(32, 4, 2, rope=True).eval()
    steps, max_length = 4, PROMPT + 4
    x = torch.tensor(rng.standard_normal((B, PROMPT + steps + 1, 32)), dtype=torch.float32)
    compiled = torch.compile(layer.decode)
    with torch.no_grad():
        eager_cache, _ = layer.decode(layer.init_cache(B, max_length), x[:, :PROMPT])
        cache, _ = layer.decode(layer.init_cache(B, max_length), x[:, :PROMPT])
        for t in range(PROMPT, PROMPT + steps):
            eager_cache, want = layer.decode(eager_cache, x[:, t : t + 1])
            cache, out = compiled(cache, x[:, t : t + 1])
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        cache, out = compiled(cache, x[:, -1:])  # the cache is full
    assert torch.isnan(out).all()
    assert cache.lengths.tolist() == [max_length + 1] * B
    torch.testing.assert_close(cache.keys, eager_cache.keys)
    torch._dynamo.reset()


def test_cache_moves_from_torch_to_jax(rng):
    """float32 (§6): a PyTorch cache as NumPy arrays is a JAX cache; decoding goes on in JAX
    with what PyTorch computes, and both make the same cache from the same prompt."""
    mechanism = by_name("grouped")
    torch_layer, flax_layer, variables = _layers(mechanism, {"rope": True}, torch.float32)
    x = rng.standard_normal((3, PROMPT + 3, mechanism.kwargs["d_model"])).astype(np.float32)
    masks = [PROMPT_MASK, *STEP_MASKS]
    torch_cache, _ = decode_torch(torch_layer, x[:, :PROMPT], [], masks[:1])
    jax_cache, _ = decode_jax(flax_layer, variables, x[:, :PROMPT], [], masks[:1])
    moved = aj.KVCache(*(jnp.asarray(np.asarray(field)) for field in torch_cache))
    for got, want in zip(moved, jax_cache, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    steps = [1, 2]
    _, want = decode_torch(torch_layer, x[:, PROMPT:], steps, masks[1:], cache=torch_cache)
    _, out = decode_jax(flax_layer, variables, x[:, PROMPT:], steps, masks[1:], cache=moved)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_cache_layout_is_the_same_in_both():
    """K kv heads (not H), the parameters' dtype unless given, int32 lengths, zeros."""
    torch_layer = at.GroupedSelfAttention(32, 8, 2)
    flax_layer = aj.GroupedSelfAttention(32, 8, 2)
    variables = {"params": torch_to_flax(torch_layer)}
    for dtype in (None, "bfloat16"):
        t_cache = torch_layer.init_cache(3, 7, dtype=dtype and getattr(torch, dtype))
        j_cache = flax_layer.apply(variables, 3, 7, dtype=dtype, method="init_cache")
        assert t_cache._fields == j_cache._fields == ("keys", "values", "lengths")
        for t_field, j_field in zip(t_cache, j_cache, strict=True):
            assert tuple(t_field.shape) == j_field.shape
            assert str(t_field.dtype).removeprefix("torch.") == str(j_field.dtype)
            assert not t_field.any() and not j_field.any()
        assert t_cache.keys.shape == (3, 2, 7, 4)
        assert t_cache.keys.dtype == (torch.float32 if dtype is None else torch.bfloat16)
        assert t_cache.lengths.dtype == torch.int32


@needs_x64
def test_padded_tokens_are_written_nowhere(rng):
    """Edge rows of the write: one that fills the cache to its last slot with a padded token
    after it (PyTorch's scatter sends that token to the last slot with the value written
    there), one with no real token at all, one that starts mid-cache."""
    torch_layer, flax_layer, variables = _layers(by_name("multi_head"), {})
    x = rng.standard_normal((3, 5, 32))
    first = np.array([[0], [0], [1]], bool)
    mask = np.array([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 0]], bool)
    t_cache = torch_layer.init_cache(3, 4)
    j_cache = flax_layer.apply(variables, 3, 4, method="init_cache")
    with torch.no_grad():
        t_cache, _ = torch_layer.decode(t_cache, torch.tensor(x[:, :1]), torch.tensor(first))
        t_cache, out = torch_layer.decode(t_cache, torch.tensor(x), torch.tensor(mask))
    j_cache, _ = _jax_step(flax_layer)(variables, j_cache, x[:, :1], first)
    j_cache, _ = _jax_step(flax_layer)(variables, j_cache, x, mask)
    for t_field, j_field in zip(t_cache, j_cache, strict=True):
        np.testing.assert_allclose(t_field.numpy(), np.asarray(j_field), atol=1e-12, rtol=0)
    assert t_cache.lengths.tolist() == [4, 0, 3]
    assert not t_cache.keys[1].any() and not t_cache.keys[2, :, 3:].any()
    assert not out[1].any()
    alone, _ = decode_torch(torch_layer, x[:1, :4], [], max_length=4)
    torch.testing.assert_close(t_cache.keys[:1], alone.keys, atol=1e-12, rtol=0)


def test_torch_decode_updates_the_cache_in_place():
    layer = at.MultiHeadSelfAttention(8, 2)
    cache = layer.init_cache(1, 4)
    with torch.no_grad():
        returned, _ = layer.decode(cache, torch.randn(1, 2, 8))
    assert returned is cache and cache.lengths.tolist() == [2]
    assert cache.keys[:, :, :2].abs().sum() > 0 and not cache.keys[:, :, 2:].any()


def _messages(torch_call, flax_call) -> tuple[str, str]:
    with pytest.raises(ValueError) as t_err:
        torch_call()
    with pytest.raises(ValueError) as j_err:
        flax_call()
    return str(t_err.value), str(j_err.value)


def _pair(cls: str = "MultiHeadSelfAttention", *args: Any, **kwargs: Any):
    torch_layer = getattr(at, cls)(*args, **kwargs)
    flax_layer = getattr(aj, cls)(*args, **kwargs)
    return torch_layer, flax_layer, {"params": torch_to_flax(torch_layer)}


def test_overflow_raises_eagerly_before_writing():
    torch_layer, flax_layer, variables = _pair("MultiHeadSelfAttention", 8, 2)
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32)
    t_cache = torch_layer.init_cache(2, 5)
    j_cache = flax_layer.apply(variables, 2, 5, method="init_cache")
    with torch.no_grad():
        t_cache, _ = torch_layer.decode(t_cache, torch.tensor(x[:, :4]))
    j_cache, _ = flax_layer.apply(variables, j_cache, jnp.asarray(x[:, :4]), method="decode")
    keys = t_cache.keys.clone()
    mask = np.array([[1, 1], [1, 0]], bool)  # the first sequence would hold 6 tokens
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.tensor(x[:, 4:]), torch.tensor(mask)),
        lambda: flax_layer.apply(
            variables, j_cache, jnp.asarray(x[:, 4:]), jnp.asarray(mask), method="decode"
        ),
    )
    assert t_msg == j_msg
    assert "sequence 0 would hold 6 tokens, max_length = 5" in t_msg
    assert t_cache.lengths.tolist() == [4, 4] and torch.equal(t_cache.keys, keys)


def test_overflow_under_jit_is_nan_not_garbage(rng):
    """Under ``jax.jit`` a token past the cache's end is not written and its output is NaN,
    and so are its sequence's later tokens (``lengths`` counts on); the others go on."""
    _, flax_layer, variables = _pair("MultiHeadSelfAttention", 8, 2)
    step = _jax_step(flax_layer)
    x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    cache = flax_layer.apply(variables, 2, 4, method="init_cache")
    cache, prompt = step(variables, cache, x[:, :3], None)
    full = jnp.ones((2, 1), bool)
    cache, fits = step(variables, cache, x[:, 3:4], full)  # positions 3: the last slot
    keys = np.asarray(cache.keys)
    cache, first = step(variables, cache, x[:, 4:5], jnp.array([[True], [False]]))
    cache, second = step(variables, cache, x[:, 5:6], full)
    assert np.isfinite(prompt).all() and np.isfinite(fits).all()
    assert np.isnan(first[0]).all() and not np.asarray(first[1]).any()  # padded: zero
    assert np.isnan(second).all()  # both sequences are past the end now
    assert np.asarray(cache.lengths).tolist() == [6, 5]
    np.testing.assert_array_equal(np.asarray(cache.keys), keys)


D = 8
BAD_CALLS = [
    ("wrong width", (2, 1, 7), None, "expected x of shape (B, T, 8), got (2, 1, 7)"),
    ("rank 2", (2, 8), None, "expected x of shape (B, T, 8), got (2, 8)"),
    ("T = 0", (2, 0, 8), None, "expected T >= 1 new tokens, got x of shape (2, 0, 8)"),
    ("batch mismatch", (3, 1, 8), None, "x holds 3 sequences but the cache holds B = 2"),
    ("mask (2, 2)", (2, 1, 8), (2, 2), "expected a mask of shape (B, T) = (2, 1)"),
    ("mask (2, 1, 1)", (2, 1, 8), (2, 1, 1), "marking the real tokens of x, got (2, 1, 1)"),
]


@pytest.mark.parametrize(
    ("what", "x", "mask", "expected"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS]
)
def test_bad_decode_input(what, x, mask, expected):
    torch_layer, flax_layer, variables = _pair("MultiHeadSelfAttention", D, 2)
    t_cache = torch_layer.init_cache(2, 4)
    j_cache = flax_layer.apply(variables, 2, 4, method="init_cache")
    t_mask = None if mask is None else torch.ones(mask, dtype=torch.bool)
    j_mask = None if mask is None else jnp.ones(mask, bool)
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.zeros(x), t_mask),
        lambda: flax_layer.apply(variables, j_cache, jnp.zeros(x), j_mask, method="decode"),
    )
    assert t_msg == j_msg
    assert expected in t_msg


BAD_SIZES = [
    ("batch 0", (0, 4), "batch must be a positive integer, got 0"),
    ("max_length 0", (2, 0), "max_length must be a positive integer, got 0"),
    ("max_length 2.5", (2, 2.5), "max_length must be a positive integer, got 2.5"),
    ("max_length True", (2, True), "max_length must be a positive integer, got True"),
]


@pytest.mark.parametrize(("what", "sizes", "expected"), BAD_SIZES, ids=[c[0] for c in BAD_SIZES])
def test_bad_cache_sizes(what, sizes, expected):
    torch_layer, flax_layer, variables = _pair("MultiHeadSelfAttention", D, 2)
    t_msg, j_msg = _messages(
        lambda: torch_layer.init_cache(*sizes),
        lambda: flax_layer.apply(variables, *sizes, method="init_cache"),
    )
    assert t_msg == j_msg == expected


def test_a_cache_of_another_layer_is_refused():
    torch_layer, flax_layer, variables = _pair("GroupedSelfAttention", D, 2, 1)
    shape = (2, 2, 4, 4)  # two kv heads: a multi-head layer's cache
    t_cache = at.KVCache(torch.zeros(shape), torch.zeros(shape), torch.zeros(2, dtype=torch.int32))
    j_cache = aj.KVCache(jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(2, jnp.int32))
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.zeros(2, 1, D)),
        lambda: flax_layer.apply(variables, j_cache, jnp.zeros((2, 1, D)), method="decode"),
    )
    assert t_msg == j_msg
    assert "(B, 1, S_max, 4)" in t_msg and "got keys (2, 2, 4, 4)" in t_msg


def test_a_cross_attention_layer_cannot_decode():
    torch_layer, flax_layer, variables = _pair("MultiHeadSelfAttention", D, 2, context_dim=6)
    t_cache = torch_layer.init_cache(1, 4)
    j_cache = flax_layer.apply(variables, 1, 4, method="init_cache")
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.zeros(1, 1, D)),
        lambda: flax_layer.apply(variables, j_cache, jnp.zeros((1, 1, D)), method="decode"),
    )
    assert t_msg == j_msg and "built for cross-attention" in t_msg


@pytest.mark.parametrize("mechanism", NOT_DECODING, ids=lambda m: m.name)
def test_other_mechanisms_refuse_to_decode_yet(mechanism):
    """Local, dilated, block and linear attention inherit ``decode`` but compute another
    pattern: they raise rather than decode as dense attention."""
    torch_layer, flax_layer, variables = _layers(mechanism, {}, torch.float32)
    t_msg, j_msg = _messages(
        lambda: torch_layer.init_cache(1, 4),
        lambda: flax_layer.apply(variables, 1, 4, method="init_cache"),
    )
    assert t_msg == j_msg
    assert f"not available for {mechanism.class_name} yet" in t_msg
    shape = (1, mechanism.head_counts()[1], 4, mechanism.kwargs["d_model"] // 4)
    cache = (np.zeros(shape, np.float32),) * 2 + (np.zeros(1, np.int32),)
    x = np.zeros((1, 1, mechanism.kwargs["d_model"]), np.float32)
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(at.KVCache(*map(torch.tensor, cache)), torch.tensor(x)),
        lambda: flax_layer.apply(
            variables, aj.KVCache(*map(jnp.asarray, cache)), jnp.asarray(x), method="decode"
        ),
    )
    assert t_msg == j_msg and "not available" in t_msg

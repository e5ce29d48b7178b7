"""Decoding with a cache, every mechanism (docs/semantics.md "Decoding with a cache", issue 13).

A prompt and then one token per call (or chunks of any size) give ``layer(x,
is_causal=True)``; a batch of prompts of different lengths gives each sequence what
decoding it alone gives; a jitted JAX step compiles once for every position and runs as a
``lax.scan`` body; a compiled PyTorch step does not recompile; caches move between the
frameworks (``parity.cache_to_jax`` / ``cache_to_torch``) and decoding goes on; a local
cache keeps its size over a 10,000-token stream; an overflow is an error eagerly and NaN
when traced; bad input raises the same text in both packages.
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
from parity import cache_to_jax, cache_to_torch, torch_to_flax
from parity.mechanisms import MECHANISMS, Mechanism, by_name
from tests.helpers import input_width, make_layers

needs_x64 = pytest.mark.skipif(
    not jax.config.jax_enable_x64, reason="float64 references need JAX's 64-bit mode"
)

CONFIGS = [
    *[(m.name, m, {}) for m in MECHANISMS],
    ("multi_head_bias", by_name("multi_head"), {"bias": True}),
    ("grouped_rope_interleaved", by_name("grouped"), {"rope": True}),
    ("grouped_rope_half", by_name("grouped"), {"rope": True, "rope_interleaved": False}),
    ("mqa_rope_llama3", by_name("grouped"), {"num_kv_heads": 1, "rope": True, "rope_base": 5e5}),
    ("alibi_rope", by_name("alibi"), {"rope": True}),
    ("local_even_window", by_name("local"), {"window_size": 4}),
    ("local_window_1", by_name("local"), {"window_size": 1}),
    (
        "local_wide_rope_half",
        by_name("local"),
        {"window_size": 9, "rope": True, "rope_interleaved": False},
    ),
    ("block_3_rope", by_name("block"), {"block_size": 3, "rope": True}),
    ("block_wider_than_l", by_name("block"), {"block_size": 16}),
    ("dilated_2_rope", by_name("dilated"), {"dilation_rate": 2, "rope": True}),
    ("dilated_wider_than_l", by_name("dilated"), {"dilation_rate": 13}),
    ("linear_rope", by_name("linear"), {"rope": True}),
    ("linear_relu_bias", by_name("linear"), {"feature_map": "relu", "bias": True}),
]
"""Every registry row (windows, blocks and rates that do not divide L = 11), then RoPE in
both layouts on GQA, MQA, local, block, dilated and linear attention, biases, ALiBi with
RoPE, even and one-key windows, a block and a rate longer than the stream."""

B, L, PROMPT, MAX_LENGTH = 2, 11, 5, 16
SCHEDULES = {"prompt_then_tokens": list(range(PROMPT, L)), "chunks": [3, 4, 8]}
"""Where x is cut into decoding calls: a prompt of 5 then one token per call; chunks of
3, 1, 4 and 3 tokens (longer than local's and block's rings, and shorter)."""


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
def test_decoding_equals_the_causal_forward(name, mechanism, overrides, rng):
    """Both schedules, both frameworks, float64: ``layer(x, is_causal=True)`` to 1e-10."""
    torch_layer, flax_layer, variables = _layers(mechanism, overrides)
    x = rng.standard_normal((B, L, input_width(mechanism, {**mechanism.kwargs, **overrides})))
    with torch.no_grad():
        want = torch_layer(torch.tensor(x), is_causal=True)[0].numpy()
    for schedule, splits in SCHEDULES.items():
        for framework, (cache, out) in {
            "torch": decode_torch(torch_layer, x, splits),
            "jax": decode_jax(flax_layer, variables, x, splits),
        }.items():
            where = f"{framework}, {schedule}"
            np.testing.assert_allclose(out, want, atol=1e-10, rtol=0, err_msg=where)
            np.testing.assert_array_equal(np.asarray(cache.lengths), [L] * B, err_msg=where)


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


RAGGED = [
    ("alibi", by_name("alibi"), {}),
    ("grouped_rope_half", by_name("grouped"), {"rope": True, "rope_interleaved": False}),
    ("local_rope", by_name("local"), {"window_size": 4, "rope": True}),
    ("block", by_name("block"), {"block_size": 3}),
    ("dilated", by_name("dilated"), {"dilation_rate": 2}),
    ("linear_rope", by_name("linear"), {"rope": True}),
]


@needs_x64
@pytest.mark.parametrize(("name", "mechanism", "overrides"), RAGGED, ids=[c[0] for c in RAGGED])
def test_prompts_of_different_lengths_decode_as_alone(name, mechanism, overrides, rng):
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
            for field in cache._fields:  # the whole row: padded tokens were written nowhere
                if field != "max_length":
                    got = np.asarray(getattr(cache, field))[b]
                    ref = getattr(want_cache, field).numpy()[0]
                    np.testing.assert_allclose(got, ref, atol=1e-10, rtol=0, err_msg=where)


COMPILED = [
    ("alibi_rope", by_name("alibi"), {"rope": True}),
    ("local", by_name("local"), {}),
    ("block", by_name("block"), {}),
    ("dilated", by_name("dilated"), {}),
    ("linear", by_name("linear"), {}),
]


@needs_x64
@pytest.mark.parametrize(("name", "mechanism", "overrides"), COMPILED, ids=[c[0] for c in COMPILED])
def test_jax_decode_compiles_once_and_scans(name, mechanism, overrides, rng):
    """A jitted step traces once for every position of a (B, T); a ``lax.scan`` over single
    tokens and eager (un-jitted) calls give the same outputs, equal to the causal forward."""
    torch_layer, flax_layer, variables = _layers(mechanism, overrides)
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
@pytest.mark.parametrize(
    ("name", "mechanism", "overrides"),
    [
        ("grouped_rope", by_name("grouped"), {"rope": True}),
        ("local", by_name("local"), {}),
        ("linear", by_name("linear"), {}),
    ],
    ids=["grouped_rope", "local", "linear"],
)
def test_torch_compile_decode_does_not_recompile(name, mechanism, overrides, rng):
    """One compiled step serves every position (dynamo's ``error_on_recompile``), equals
    eager, and past max_length gives NaN instead of raising (documented). Local attention's
    ring wraps during the steps (window 5: two slots)."""
    torch._dynamo.reset()
    layer = _layers(mechanism, overrides, torch.float32)[0]
    steps, max_length = 4, PROMPT + 4
    width = mechanism.kwargs["d_model"]
    x = torch.tensor(rng.standard_normal((B, PROMPT + steps + 1, width)), dtype=torch.float32)
    compiled = torch.compile(layer.decode)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager_cache, _ = layer.decode(layer.init_cache(B, max_length), x[:, :PROMPT])
        cache, _ = layer.decode(layer.init_cache(B, max_length), x[:, :PROMPT])
        for t in range(PROMPT, PROMPT + steps):
            eager_cache, want = layer.decode(eager_cache, x[:, t : t + 1])
            cache, out = compiled(cache, x[:, t : t + 1])
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        cache, out = compiled(cache, x[:, -1:])  # the cache is full
    assert torch.isnan(out).all()
    assert cache.lengths.tolist() == [max_length + 1] * B
    for field in cache._fields[:2]:  # nothing written past the end
        torch.testing.assert_close(getattr(cache, field), getattr(eager_cache, field))
    torch._dynamo.reset()


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_caches_move_between_the_frameworks(mechanism, rng):
    """float32 (§6): ``parity.cache_to_jax`` turns a PyTorch cache into the JAX one the same
    prompt makes, and decoding goes on in JAX with what PyTorch computes; and back with
    ``cache_to_torch``."""
    torch_layer, flax_layer, variables = _layers(mechanism, {"rope": True}, torch.float32)
    x = rng.standard_normal((3, PROMPT + 3, mechanism.kwargs["d_model"])).astype(np.float32)
    masks = [PROMPT_MASK, *STEP_MASKS]
    torch_cache, _ = decode_torch(torch_layer, x[:, :PROMPT], [], masks[:1])
    jax_cache, _ = decode_jax(flax_layer, variables, x[:, :PROMPT], [], masks[:1])
    moved = cache_to_jax(torch_cache)
    assert type(moved) is type(jax_cache)
    for got, want in zip(moved, jax_cache, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    back = cache_to_torch(moved)
    assert type(back) is type(torch_cache)
    for got, want in zip(back, torch_cache, strict=True):
        assert torch.equal(got, want)  # bit for bit
    steps = [1, 2]
    _, want = decode_torch(torch_layer, x[:, PROMPT:], steps, masks[1:], cache=torch_cache)
    _, out = decode_jax(flax_layer, variables, x[:, PROMPT:], steps, masks[1:], cache=moved)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_a_model_s_caches_convert_and_other_things_do_not():
    layer = at.LocalSelfAttention(8, 4, 2)
    caches = {"blocks": [layer.init_cache(1, None), at.LinearSelfAttention(8).init_cache(2)]}
    moved = cache_to_jax(caches)
    assert [type(c).__name__ for c in moved["blocks"]] == ["WindowCache", "LinearCache"]
    assert int(moved["blocks"][0].max_length) == at.NO_LIMIT
    with pytest.raises(ValueError, match=r"expected a decoding cache .* got ndarray"):
        cache_to_jax([np.zeros(3)])


LAYOUTS = {
    "vanilla": ("KVCache", (3, 1, 7, 32)),
    "multi_head": ("KVCache", (3, 4, 7, 8)),
    "grouped": ("KVCache", (3, 2, 7, 8)),  # K kv heads, not H
    "alibi": ("KVCache", (3, 6, 7, 8)),
    "rotary": ("KVCache", (3, 4, 7, 8)),
    "local": ("WindowCache", (3, 4, 2, 8)),  # window 5: the 2 keys before a query
    "dilated": ("KVCache", (3, 4, 7, 8)),  # every residue class
    "block": ("WindowCache", (3, 4, 4, 8)),  # the current block
    "linear": ("LinearCache", (3, 4, 8, 8)),  # the recurrent state
}


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_cache_layout_is_the_same_in_both(mechanism):
    """§11's layout per mechanism: the same type, fields, shapes and dtypes in both packages
    (the parameters' dtype unless given; linear's state float32 or wider), zeros, int32
    lengths and max_length."""
    torch_layer, flax_layer, variables = _layers(mechanism, {}, torch.float32)
    kind, shape = LAYOUTS[mechanism.name]
    for dtype in (None, "bfloat16"):
        t_cache = torch_layer.init_cache(3, 7, dtype=dtype and getattr(torch, dtype))
        j_cache = flax_layer.apply(variables, 3, 7, dtype=dtype, method="init_cache")
        assert type(t_cache).__name__ == type(j_cache).__name__ == kind
        assert t_cache._fields == j_cache._fields
        for t_field, j_field in zip(t_cache, j_cache, strict=True):
            assert tuple(t_field.shape) == j_field.shape
            assert str(t_field.dtype).removeprefix("torch.") == str(j_field.dtype)
        assert tuple(t_cache[0].shape) == shape
        assert t_cache[0].dtype == (torch.float32 if dtype is None else torch.bfloat16)
        assert t_cache.lengths.dtype == torch.int32 and not t_cache.lengths.any()
        assert not t_cache[0].any() and not t_cache[1].any()
        if kind != "KVCache":
            assert int(t_cache.max_length) == int(j_cache.max_length) == 7


@pytest.mark.parametrize(
    "mechanism", [by_name(n) for n in ("local", "block", "linear")], ids=lambda m: m.name
)
def test_fixed_size_caches_take_no_max_length(mechanism, rng):
    """local, block and linear: ``max_length=None`` is no limit (``NO_LIMIT`` stored)."""
    torch_layer, flax_layer, variables = _layers(mechanism, {}, torch.float32)
    t_cache = torch_layer.init_cache(1, None)
    j_cache = flax_layer.apply(variables, 1, None, method="init_cache")
    assert int(t_cache.max_length) == int(j_cache.max_length) == at.NO_LIMIT == aj.NO_LIMIT
    x = rng.standard_normal((1, 3, 32)).astype(np.float32)
    _, out = decode_torch(torch_layer, x, [1, 2], cache=t_cache)
    _, j_out = decode_jax(flax_layer, variables, x, [1, 2], cache=j_cache)
    np.testing.assert_allclose(j_out, out, atol=1e-5, rtol=1e-5)


def test_a_local_cache_keeps_its_size_over_10000_steps(rng):
    """A 10,000-token stream, one token per step: the ring's shapes and bytes never change,
    and the outputs are the causal forward's (JAX under ``lax.scan``; PyTorch eagerly)."""
    steps = 10_000
    torch_layer, flax_layer, variables = _layers(
        by_name("local"), {"d_model": 8, "num_heads": 2, "window_size": 6}, torch.float32
    )
    x = rng.standard_normal((1, steps, 8)).astype(np.float32)
    with torch.no_grad():
        want = torch_layer(torch.tensor(x), is_causal=True, need_weights=False)[0].numpy()

    start = flax_layer.apply(variables, 1, None, method="init_cache")
    body = lambda cache, token: flax_layer.apply(  # noqa: E731
        variables, cache, token[:, None], method="decode"
    )
    cache, outs = jax.jit(lambda c, xs: lax.scan(body, c, xs))(start, x.swapaxes(0, 1))
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, start)
    assert int(cache.lengths[0]) == steps
    np.testing.assert_allclose(np.asarray(outs)[:, :, 0].swapaxes(0, 1), want, atol=2e-5)

    t_cache = torch_layer.init_cache(1, None)
    shapes, nbytes = [tuple(f.shape) for f in t_cache], sum(f.nbytes for f in t_cache)
    got = np.empty_like(want)
    with torch.no_grad():
        for t in range(steps):
            t_cache, out = torch_layer.decode(t_cache, torch.from_numpy(x[:, t : t + 1]))
            got[:, t] = out[:, 0].numpy()
            if t % 1000 == 999:
                assert [tuple(f.shape) for f in t_cache] == shapes
                assert sum(f.nbytes for f in t_cache) == nbytes == 2 * 2 * 3 * 4 * 4 + 8
    np.testing.assert_allclose(got, want, atol=2e-5)


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


OVERFLOWING = [
    ("MultiHeadSelfAttention", (8, 2)),
    ("LocalSelfAttention", (8, 3, 2)),
    ("DilatedSelfAttention", (8, 2, 2)),
    ("LinearSelfAttention", (8, 2)),
]


@pytest.mark.parametrize(("cls", "args"), OVERFLOWING, ids=[c[0] for c in OVERFLOWING])
def test_overflow_raises_eagerly_before_writing(cls, args):
    torch_layer, flax_layer, variables = _pair(cls, *args)
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32)
    t_cache = torch_layer.init_cache(2, 5)
    j_cache = flax_layer.apply(variables, 2, 5, method="init_cache")
    with torch.no_grad():
        t_cache, _ = torch_layer.decode(t_cache, torch.tensor(x[:, :4]))
    j_cache, _ = flax_layer.apply(variables, j_cache, jnp.asarray(x[:, :4]), method="decode")
    before = [field.clone() for field in t_cache]
    mask = np.array([[1, 1], [1, 0]], bool)  # the first sequence would hold 6 tokens
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.tensor(x[:, 4:]), torch.tensor(mask)),
        lambda: flax_layer.apply(
            variables, j_cache, jnp.asarray(x[:, 4:]), jnp.asarray(mask), method="decode"
        ),
    )
    assert t_msg == j_msg
    assert "sequence 0 would hold 6 tokens, max_length = 5" in t_msg
    assert all(torch.equal(a, b) for a, b in zip(t_cache, before, strict=True))


@pytest.mark.parametrize(("cls", "args"), OVERFLOWING, ids=[c[0] for c in OVERFLOWING])
def test_overflow_under_jit_is_nan_not_garbage(cls, args, rng):
    """Under ``jax.jit`` a token past max_length is not written and its output is NaN,
    and so are its sequence's later tokens (``lengths`` counts on); the others go on."""
    _, flax_layer, variables = _pair(cls, *args)
    step = _jax_step(flax_layer)
    x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    cache = flax_layer.apply(variables, 2, 4, method="init_cache")
    cache, prompt = step(variables, cache, x[:, :3], None)
    full = jnp.ones((2, 1), bool)
    cache, fits = step(variables, cache, x[:, 3:4], full)  # positions 3: the last slot
    state = np.asarray(cache[0])
    cache, first = step(variables, cache, x[:, 4:5], jnp.array([[True], [False]]))
    cache, second = step(variables, cache, x[:, 5:6], full)
    assert np.isfinite(prompt).all() and np.isfinite(fits).all()
    assert np.isnan(first[0]).all() and not np.asarray(first[1]).any()  # padded: zero
    assert np.isnan(second).all()  # both sequences are past the end now
    assert np.asarray(cache.lengths).tolist() == [6, 5]
    np.testing.assert_array_equal(np.asarray(cache[0]), state)


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
    assert "keys (B, 1, S_max, 4)" in t_msg and "got a KVCache (keys (2, 2, 4, 4)" in t_msg


def test_a_cross_attention_layer_cannot_decode():
    torch_layer, flax_layer, variables = _pair("MultiHeadSelfAttention", D, 2, context_dim=6)
    t_cache = torch_layer.init_cache(1, 4)
    j_cache = flax_layer.apply(variables, 1, 4, method="init_cache")
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.zeros(1, 1, D)),
        lambda: flax_layer.apply(variables, j_cache, jnp.zeros((1, 1, D)), method="decode"),
    )
    assert t_msg == j_msg and "built for cross-attention" in t_msg


KINDS = [
    ("LocalSelfAttention", (D, 4, 2), "expected a WindowCache of this layer (keys (B, 2, 2, 4)"),
    ("LinearSelfAttention", (D, 2), "expected a LinearCache of this layer (kv (B, 2, 4, 4)"),
]


@pytest.mark.parametrize(("cls", "args", "expected"), KINDS, ids=[c[0] for c in KINDS])
def test_a_cache_of_another_kind_is_refused(cls, args, expected):
    torch_layer, flax_layer, variables = _pair(cls, *args)
    shape = (2, 2, 4, 4)
    t_cache = at.KVCache(torch.zeros(shape), torch.zeros(shape), torch.zeros(2, dtype=torch.int32))
    j_cache = aj.KVCache(jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(2, jnp.int32))
    t_msg, j_msg = _messages(
        lambda: torch_layer.decode(t_cache, torch.zeros(2, 1, D)),
        lambda: flax_layer.apply(variables, j_cache, jnp.zeros((2, 1, D)), method="decode"),
    )
    assert t_msg == j_msg
    assert expected in t_msg and "got a KVCache (keys (2, 2, 4, 4)" in t_msg


def test_dense_caches_need_a_max_length():
    torch_layer, flax_layer, variables = _pair("MultiHeadSelfAttention", D, 2)
    t_msg, j_msg = _messages(
        lambda: torch_layer.init_cache(1, None),
        lambda: flax_layer.apply(variables, 1, None, method="init_cache"),
    )
    assert t_msg == j_msg and "max_length must be a positive integer, got None" in t_msg

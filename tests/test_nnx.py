"""Flax NNX layers (``attentions_jax.nnx``, SPEC §12): the linen mechanisms, as NNX modules.

What this file proves:

* one implementation: from the same parameters every NNX layer traces to the very program
  its linen twin traces (the same jaxpr) and returns bit-identical outputs and weights in
  float32, float64 and bfloat16 (self- and cross-attention), caches and decoded tokens,
  and (a dense, a tiled and the linear mechanism) gradients; neither shell defines
  mechanism logic, and both reach the same mixin functions;
* NNX's conventions: ``nnx.jit`` (the call's options static, the parameters inputs),
  ``nnx.grad``, dropout from ``rngs`` with ``train()`` / ``eval()`` / ``nnx.view``,
  ``init_cache`` / ``decode`` as methods, ``nnx.bridge.ToLinen`` giving our linen layer;
* the API: the linen constructor arguments plus a required keyword-only ``rngs``, and the
  same ``ValueError`` texts as linen for bad arguments and bad input;
* PyTorch, every mechanism: ``parity.compare_layers`` against an NNX layer (float32,
  bfloat16), ``torch_to_nnx`` / ``nnx_to_torch`` bit for bit, and three
  ``nnx.Optimizer(optax.adamw)`` steps equal to ``torch.optim.AdamW``'s (float64).

Programs are jitted, linen and NNX in one program where they are compared (one compile
instead of two; CPU compile time dominates this file): an NNX layer that computed
anything else would trace other operations and give other bits.
"""

from __future__ import annotations

import inspect
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from flax.nnx import bridge

import attentions_jax as aj
import parity
from attentions_jax import base
from attentions_jax import nnx as ann
from parity import MECHANISMS
from parity.mechanisms import by_name
from tests import helpers

B, L, S = 2, 13, 9
DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
needs_x64 = pytest.mark.skipif(
    not jax.config.jax_enable_x64, reason="float64 needs JAX's 64-bit mode (conftest.py)"
)
CROSS = [m for m in MECHANISMS if m.cross_attention]
SAMPLE = [by_name(n) for n in ("grouped", "local", "linear")]
"""A dense mechanism (GQA), a tiled one, linear attention."""
CACHE_RULES = [*SAMPLE, by_name("dilated"), by_name("block")]
"""A mechanism of each way to keep a cache (dense, window ring, residue classes, block,
linear state)."""
DTYPE_CASES = [
    *(pytest.param(m, "float64", marks=needs_x64, id=f"{m.name}-float64") for m in MECHANISMS),
    *(pytest.param(m, d, id=f"{m.name}-{d}") for m in SAMPLE for d in ("float32", "bfloat16")),
]
"""Every mechanism in float64, a sample in the narrower dtypes: NNX traces linen's very
program (``test_nnx_traces_the_linen_program``), so the dtypes add little but time."""
PADDING = helpers.user_mask("padding", np.random.default_rng(0), B, L)
"""Key padding ``(B, 1, 1, L)``: the second sequence is 7 tokens long."""


def _x(mechanism, dtype: str = "float64", *, length: int = L, width: int | None = None, seed=1):
    width = width or helpers.input_width(mechanism)
    x = np.random.default_rng(seed).standard_normal((B, length, width))
    return jnp.asarray(x, DTYPES[dtype])


def _random_layer(mechanism, dtype: str = "float64", *, seed: int = 0, **overrides):
    """``(layer, params)``: the row's NNX layer (``overrides`` on top) with every parameter
    redrawn at random in ``dtype`` (the biases too: the zero biases of the initialization
    would hide a bias that one side drops), and the same values as linen ``params``."""
    layer = mechanism.nnx_layer(**overrides)
    state = nnx.state(layer, nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), DTYPES[dtype]),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, params)
    nnx.update(layer, state)
    return layer, params


def _pure(tree):
    """``nnx.State`` leaves of a tree as plain dicts (what linen's trees hold)."""
    return jax.tree.map(
        lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s,
        tree,
        is_leaf=lambda s: isinstance(s, nnx.State),
    )


def _assert_identical(ours, theirs, where: str = "") -> None:
    """The same tree (``None`` where the other has ``None``), every leaf bit for bit in the
    same dtype."""
    ours, theirs = _pure(ours), _pure(theirs)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs), where
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(
            np.asarray(a, np.float64), np.asarray(b, np.float64), err_msg=where
        )


def _assert_close(ours, theirs, atol: float, where: str = "") -> None:
    assert jax.tree.structure(ours) == jax.tree.structure(theirs), where
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0, err_msg=where)


# --- one implementation: NNX == linen ----------------------------------------------------


def _options(mechanism, dtype: str) -> dict:
    """The configuration each dtype is checked in (combined, not a cross product):
    biases everywhere; float64 adds half-layout RoPE with another base, a narrower input
    and (softmax mechanisms) a temperature; bfloat16 adds interleaved RoPE."""
    if dtype == "float32":
        return {"bias": True}
    if dtype == "bfloat16":
        return {"bias": True, "rope": True}
    options = {"bias": True, "rope": True, "rope_interleaved": False, "rope_base": 500.0}
    options["input_dim"] = 24
    if mechanism.softmax:
        options["temperature"] = 0.7
    return options


def _loss(out: jax.Array, weights: jax.Array | None) -> jax.Array:
    """A scalar that reads every entry of the outputs and of the weights differently."""
    value = jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
    if weights is None:
        return value
    return value + jnp.sum(weights * jnp.sin(jnp.arange(weights.size).reshape(weights.shape)))


@pytest.mark.parametrize(("mechanism", "dtype"), DTYPE_CASES)
def test_nnx_equals_linen_bit_for_bit(mechanism, dtype):
    """Outputs and weights, on the causal weights path under a padding mask and on the
    unmasked fast path, in the parameters' and input's dtype."""
    options = _options(mechanism, dtype)
    layer, params = _random_layer(mechanism, dtype, **options)
    linen = mechanism.flax_layer(**options)
    x = _x(mechanism, dtype, width=options.get("input_dim"))
    calls = [(PADDING, True, True), (None, False, False)]

    @nnx.jit
    def both(layer, params, x):
        results = []
        for mask, is_causal, need_weights in calls:
            call = {"is_causal": is_causal, "need_weights": need_weights}
            ours = layer(x, mask, **call)
            results.append((ours, linen.apply({"params": params}, x, mask, **call)))
        return results

    for call, (ours, theirs) in zip(calls, both(layer, params, x), strict=True):
        where = f"{mechanism.name}, {dtype}, causal and padded: {call[1]}"
        _assert_identical(ours, theirs, where)
        out, weights = ours
        assert out.dtype == DTYPES[dtype], where
        assert np.all(np.isfinite(np.asarray(out, np.float64))) and np.any(np.asarray(out) != 0)
        if call[2]:
            assert weights.shape == (B, mechanism.head_counts()[0], L, L), where
        else:
            assert weights is None, where


@needs_x64
@pytest.mark.parametrize("mechanism", SAMPLE, ids=lambda m: m.name)
def test_nnx_grad_equals_linen_grad(mechanism):
    """``nnx.value_and_grad`` over the layer and x equals ``jax.value_and_grad`` over the
    linen params and x, bit for bit (float64, biases, a loss on the outputs and the
    weights), on the causal weights path under a padding mask and on the fast path. (The
    optimizer test below differentiates every mechanism's fast path against PyTorch.)"""
    layer, params = _random_layer(mechanism, bias=True)
    linen = mechanism.flax_layer(bias=True)

    def pair(need_weights):
        """``(nnx_fn(layer, x), linen_fn(params, x))``: loss and gradients of one call."""
        call = {"is_causal": True, "need_weights": need_weights}

        def ours(layer, x):
            return _loss(*layer(x, PADDING, **call))

        def theirs(params, x):
            return _loss(*linen.apply({"params": params}, x, PADDING, **call))

        return (
            nnx.value_and_grad(ours, argnums=(0, 1)),
            jax.value_and_grad(theirs, argnums=(0, 1)),
        )

    paths = {need_weights: pair(need_weights) for need_weights in (True, False)}

    @nnx.jit
    def grads(layer, params, x):
        return {w: (ours(layer, x), theirs(params, x)) for w, (ours, theirs) in paths.items()}

    for need_weights, (ours, theirs) in grads(layer, params, _x(mechanism)).items():
        _assert_identical(ours, theirs, f"{mechanism.name}, need_weights={need_weights}")
        (_, (grad_params, grad_x)) = ours
        assert np.any(np.asarray(grad_x) != 0)
        for name in base.PROJECTIONS:
            assert np.any(np.asarray(_pure(grad_params)[name]["kernel"]) != 0), name


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_nnx_traces_the_linen_program(mechanism):
    """The jaxpr of the NNX call (parameters as the state's leaves) is the linen apply's,
    for every combination of mask, ``is_causal`` and ``need_weights``: the same operations
    on the same values, so the same bits under any compilation."""
    options = _options(mechanism, "float64")
    layer, params = _random_layer(mechanism, "float32", **options)
    linen = mechanism.flax_layer(**options)
    graph, state = nnx.split(layer)
    x = _x(mechanism, "float32", width=options["input_dim"])
    calls = [(m, c, w) for m in (None, PADDING) for c in (False, True) for w in (True, False)]

    def run(call):
        return [call(x, mask, is_causal=c, need_weights=w) for mask, c, w in calls]

    ours = jax.make_jaxpr(lambda s, x: run(nnx.merge(graph, s)))(state, x)
    theirs = jax.make_jaxpr(lambda p, x: run(partial(linen.apply, {"params": p})))(params, x)
    assert str(ours) == str(theirs)
    assert len(ours.jaxpr.invars) == len(jax.tree.leaves(params)) + 1


@needs_x64
@pytest.mark.parametrize("mechanism", CROSS, ids=lambda m: m.name)
def test_nnx_cross_attention_equals_linen(mechanism):
    """A context of S = 9 tokens, 20 wide (``context_dim=20``), under a random ``(B, L, S)``
    keep-mask with a blind row; weights path and fast path."""
    options = {"bias": True, "context_dim": 20}
    layer, params = _random_layer(mechanism, **options)
    linen = mechanism.flax_layer(**options)
    rng = np.random.default_rng(2)
    context = jnp.asarray(rng.standard_normal((B, S, 20)))
    keep = rng.random((B, L, S)) > 0.4
    keep[0, 3] = False

    @nnx.jit
    def both(layer, params, x, context):
        calls = ((keep, True), (None, False))
        ours = [layer(x, m, context=context, need_weights=w) for m, w in calls]
        theirs = [
            linen.apply({"params": params}, x, m, context=context, need_weights=w) for m, w in calls
        ]
        return ours, theirs

    ours, theirs = both(layer, params, _x(mechanism), context)
    _assert_identical(ours, theirs, mechanism.name)
    assert ours[0][1].shape == (B, mechanism.head_counts()[0], L, S)
    assert not np.any(np.asarray(ours[0][1])[0, :, 3])  # the blind row attends nowhere


@needs_x64
def test_nnx_jit_equals_eager():
    """``nnx.jit`` with the options static (``static_argnames``, or fixed in a closure)
    equals the eager call (float64, 1e-12); new parameters of the same shapes reach the
    compiled program as inputs: no new trace, and the result follows them."""
    mechanism = by_name("multi_head")
    layer, _ = _random_layer(mechanism, bias=True)
    x, mask = _x(mechanism), jnp.asarray(PADDING)
    traces = []

    @partial(nnx.jit, static_argnames=("is_causal", "need_weights"))
    def call(layer, x, mask, *, is_causal, need_weights):
        traces.append((is_causal, need_weights))
        return layer(x, mask, is_causal=is_causal, need_weights=need_weights)

    closed = nnx.jit(lambda layer, x: layer(x, is_causal=True, need_weights=False))
    eager = layer(x, mask, is_causal=True)
    _assert_close(call(layer, x, mask, is_causal=True, need_weights=True), eager, 1e-12)
    _assert_close(closed(layer, x), layer(x, is_causal=True, need_weights=False), 1e-12)
    assert call(layer, x, mask, is_causal=True, need_weights=False)[1] is None

    _, params = _random_layer(mechanism, bias=True, seed=5)
    state = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(layer, state)
    x = _x(mechanism, seed=6)
    moved = call(layer, x, mask, is_causal=True, need_weights=True)
    _assert_close(moved, layer(x, mask, is_causal=True), 1e-12)
    assert not np.allclose(moved[0], eager[0])
    assert traces == [(True, True), (True, False)]


# --- decoding ------------------------------------------------------------------------------


def _decode_both(layer, params, x, *, linen, splits, max_length=8):
    """``(caches, outs)``: NNX's and linen's (pairs) after ``init_cache`` and each chunk of
    ``x`` cut at ``splits``."""
    ours = layer.init_cache(B, max_length)
    theirs = linen.apply({"params": params}, B, max_length, method="init_cache")
    caches, outs = [(ours, theirs)], []
    for chunk in jnp.split(x, splits, axis=1):
        ours, a = layer.decode(ours, chunk)
        theirs, b = linen.apply({"params": params}, theirs, chunk, method="decode")
        caches.append((ours, theirs))
        outs.append((a, b))
    return caches, outs


@needs_x64
@pytest.mark.parametrize("mechanism", CACHE_RULES, ids=lambda m: m.name)
def test_nnx_decode_equals_linen_under_nnx_jit(mechanism):
    """A prompt of 5 then 2 single tokens through ``layer.init_cache`` / ``layer.decode``
    under ``nnx.jit``: every cache (its type and leaves) and every output equal linen's
    ``apply(..., method=...)`` bit for bit."""
    layer, params = _random_layer(mechanism, bias=True)
    linen = mechanism.flax_layer(bias=True)
    x = _x(mechanism, length=7)

    caches, outs = nnx.jit(partial(_decode_both, linen=linen, splits=(5, 6)))(layer, params, x)
    for i, (ours, theirs) in enumerate(caches):
        assert type(ours) is type(theirs)
        _assert_identical(ours, theirs, f"cache {i}")
    _assert_identical([a for a, _ in outs], [b for _, b in outs], "decoded tokens")
    assert np.any(np.asarray(outs[-1][0]) != 0)


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_nnx_init_cache_equals_linen(mechanism):
    """Eagerly, ``layer.init_cache`` is linen's: the same cache type, shapes, dtypes and
    values, with the parameters' dtype (bfloat16 here) or the one given, and without a
    length limit where the mechanism needs none."""
    layer, params = _random_layer(mechanism, "bfloat16")
    linen = partial(mechanism.flax_layer().apply, {"params": params}, method="init_cache")
    cases = [((B, 8), {}), ((B, 8), {"dtype": jnp.float32})]
    if mechanism.pattern in ("local", "block", "linear"):
        cases.append(((B, None), {}))
    for args, kwargs in cases:
        ours, theirs = layer.init_cache(*args, **kwargs), linen(*args, **kwargs)
        assert type(ours) is type(theirs), (args, kwargs)
        _assert_identical(ours, theirs, f"{args}, {kwargs}")
    # keys and values in the parameters' dtype; linear attention's state is float32 or wider
    expected = jnp.float32 if mechanism.pattern == "linear" else jnp.bfloat16
    floats = [a for a in jax.tree.leaves(layer.init_cache(B, 8)) if a.dtype.kind not in "iu"]
    assert floats and all(a.dtype == expected for a in floats)


# --- nnx.bridge ----------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", SAMPLE, ids=lambda m: m.name)
def test_bridge_to_linen_round_trip(mechanism):
    """``nnx.bridge.ToLinen(<NNX class>, args=, kwargs=)`` initializes the params tree of
    our linen layer's ``init``; with ToLinen's params in our linen layer (and ours in
    ToLinen) both give the same outputs and weights."""
    cls = getattr(ann, mechanism.class_name)
    config = {**mechanism.kwargs, "bias": True}
    d_model = config.pop("d_model")
    wrapped = bridge.ToLinen(cls, args=(d_model,), kwargs=config)
    linen = mechanism.flax_layer(bias=True)
    x = _x(mechanism, "float32")
    variables = wrapped.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    shapes = partial(jax.tree.map, lambda a: (a.shape, a.dtype))
    assert shapes(variables) == shapes(linen.init(jax.random.key(0), x))
    _, params = _random_layer(mechanism, "float32", bias=True)

    @jax.jit
    def both(wrapped_params, linen_params, x):
        results = []
        for module, params in ((wrapped, wrapped_params), (linen, linen_params)):
            apply = partial(module.apply, {"params": params})
            results.append((apply(x, PADDING, is_causal=True), apply(x, need_weights=False)))
        return results

    runs = [both(p, p, x) for p in (variables["params"], params)]
    for ours, theirs in runs:
        _assert_identical(ours, theirs, mechanism.name)
    assert not np.array_equal(runs[0][0][0][0], runs[1][0][0][0])


# --- the API ---------------------------------------------------------------------------------

LINEN_CLASSES = sorted(
    name
    for name in aj.__all__
    if inspect.isclass(getattr(aj, name))
    and issubclass(getattr(aj, name), aj.SelfAttention)
    and getattr(aj, name) is not aj.SelfAttention
)


class _Probe(nn.Module):
    """A bare linen dataclass: what linen and ``dataclasses`` put in any module's class dict."""

    field: int = 0


class _NNXProbe(nnx.Module):
    """A bare NNX module: what NNX puts in any module's class dict."""


LINEN_MACHINERY = set(vars(_Probe)) - {"field"}
NNX_MACHINERY = set(vars(_NNXProbe)) | {"twin", "__signature__", "__annotations__"}
"""``twin`` and ``__signature__`` (``ann.SelfAttention.__init_subclass__``'s) are ours; the
annotations must be empty."""
PACKAGE = inspect.getfile(aj).rsplit("/", 1)[0]


def _row(linen_cls):
    return next(m for m in MECHANISMS if getattr(aj, m.class_name) is linen_cls)


def _own_code(cls) -> dict[str, object]:
    """The functions, properties and class/static methods written in ``cls``'s own body."""
    kinds = (classmethod, staticmethod, property)
    return {k: v for k, v in vars(cls).items() if inspect.isfunction(v) or isinstance(v, kinds)}


def _mixins(cls) -> list[type]:
    """The module-system-free mechanism classes in ``cls``'s MRO (``base.Mechanism`` and
    the per-mechanism mixins), in MRO order."""
    return [
        c
        for c in cls.__mro__
        if issubclass(c, base.Mechanism) and not issubclass(c, (nn.Module, nnx.Module))
    ]


def test_nnx_module_lists_every_linen_class():
    assert len(LINEN_CLASSES) == 10
    assert set(ann.__all__) == {*LINEN_CLASSES, "SelfAttention"}
    assert ann.AlibiSelfAttention is ann.ALiBiSelfAttention
    for name in ann.__all__:
        cls = getattr(ann, name)
        assert issubclass(cls, ann.SelfAttention) and issubclass(cls, nnx.Module), name
        assert cls.twin is getattr(aj, name), name


@pytest.mark.parametrize("name", LINEN_CLASSES)
def test_nnx_signature_is_linen_plus_rngs(name):
    """Names, order, kinds and defaults of the linen constructor (without ``parent`` and
    ``name``), then a keyword-only ``rngs`` without default; and the constructor does what
    the signature says: every argument, given or defaulted, lands as on linen."""
    linen_cls, nnx_cls = getattr(aj, name), getattr(ann, name)
    expected = [
        p
        for p in inspect.signature(linen_cls).parameters.values()
        if p.name not in ("parent", "name")
    ]
    *arguments, rngs = inspect.signature(nnx_cls).parameters.values()
    describe = lambda ps: [(p.name, p.kind, p.default) for p in ps]  # noqa: E731
    assert describe(arguments) == describe(expected)
    assert (rngs.name, rngs.kind, rngs.default) == ("rngs", rngs.KEYWORD_ONLY, rngs.empty)
    assert nnx_cls.twin is linen_cls

    config = dict(_row(linen_cls).kwargs)
    positional = [config.pop(p.name) for p in arguments if p.default is p.empty]
    config["bias"] = True
    layer = nnx_cls(*positional, **config, rngs=nnx.Rngs(0))
    twin = linen_cls(*positional, **config)
    for p in arguments:
        assert getattr(layer, p.name) == getattr(twin, p.name), p.name
    with pytest.raises(TypeError):
        nnx_cls(*positional, 7, **config, rngs=nnx.Rngs(0))  # one positional too many
    with pytest.raises(TypeError):
        nnx_cls(*positional, **config, window=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", LINEN_CLASSES)
def test_linen_and_nnx_classes_are_shells(name):
    """The linen class body holds only fields, annotations and its docstring (everything
    else in its dict is what linen adds to any dataclass, none of it our code); the NNX
    class body only ``twin`` and its docstring; both reach the same mixin classes and the
    very same function for every mechanism method."""
    linen_cls, nnx_cls = getattr(aj, name), getattr(ann, name)
    fields = set(vars(linen_cls).get("__annotations__", {}))
    assert set(vars(linen_cls)) - fields - LINEN_MACHINERY == set()
    ours = [k for k, v in _own_code(linen_cls).items() if inspect.getfile(v).startswith(PACKAGE)]
    assert ours == [], f"linen {name} defines {ours}"
    assert _own_code(nnx_cls) == {}, f"NNX {name} defines {list(_own_code(nnx_cls))}"
    assert set(vars(nnx_cls)) - NNX_MACHINERY == set()
    assert not vars(nnx_cls).get("__annotations__"), "fields declared on the NNX shell"

    assert _mixins(linen_cls) == _mixins(nnx_cls) and _mixins(linen_cls)[-1] is base.Mechanism
    methods = {k for c in _mixins(linen_cls) for k in _own_code(c)} - {"project", "param_dtype"}
    assert {"forward", "attend", "validate", "init_cache", "decode", "cache_rule"} <= methods
    for method in methods:
        mine = inspect.getattr_static(nnx_cls, method)
        assert mine is inspect.getattr_static(linen_cls, method), method


def test_base_shells_implement_only_the_hooks():
    """Of the mechanism's methods, the two base shells write only the hooks that reach
    their parameters (``project``, ``param_dtype``); the pipeline is ``base.Mechanism``'s."""
    mechanism = set(_own_code(base.Mechanism))
    for shell in (base.SelfAttention, ann.SelfAttention):
        assert set(_own_code(shell)) & mechanism == {"project", "param_dtype"}, shell


# --- validation ---------------------------------------------------------------------------

BAD_CONFIGS = [
    ("multi_head", {"d_model": 30}),
    ("multi_head", {"dropout": 1.5}),
    ("vanilla", {"temperature": 0.0}),
    ("vanilla", {"input_dim": -1}),
    ("grouped", {"num_kv_heads": 3}),
    ("rotary", {"d_model": 12, "num_heads": 4}),
    ("local", {"window_size": 0}),
    ("dilated", {"dilation_rate": 0}),
    ("block", {"block_size": -2}),
    ("linear", {"feature_map": "tanh"}),
    ("linear", {"temperature": 2.0}),
]


@pytest.mark.parametrize(("name", "overrides"), BAD_CONFIGS, ids=[str(c) for c in BAD_CONFIGS])
def test_bad_arguments_raise_linen_text(name, overrides):
    mechanism = by_name(name)
    with pytest.raises(ValueError) as linen_error:
        mechanism.flax_layer(**overrides)
    with pytest.raises(ValueError) as nnx_error:
        mechanism.nnx_layer(**overrides)
    assert str(nnx_error.value) == str(linen_error.value)


BAD_CALLS = [
    ("multi_head", "x of rank 2", (L, 32), {}),
    ("multi_head", "x too wide", (B, L, 33), {}),
    ("multi_head", "mask (3, L)", (B, L, 32), {"mask": np.ones((3, L), bool)}),
    ("multi_head", "causal cross", (B, L, 32), {"context": np.ones((B, S, 32)), "is_causal": True}),
    ("local", "positional cross", (B, L, 32), {"context": np.ones((B, S, 32))}),
    ("linear", "context too wide", (B, L, 32), {"context": np.ones((B, S, 31))}),
]


@pytest.mark.parametrize(
    ("name", "what", "shape", "call"), BAD_CALLS, ids=[c[1] for c in BAD_CALLS]
)
def test_bad_input_raises_linen_text(name, what, shape, call):
    mechanism = by_name(name)
    layer, params = _random_layer(mechanism, "float32")
    x = jnp.ones(shape, jnp.float32)
    call = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in call.items()}
    with pytest.raises(ValueError) as linen_error:
        mechanism.flax_layer().apply({"params": params}, x, **call)
    with pytest.raises(ValueError) as nnx_error:
        layer(x, **call)
    assert str(nnx_error.value) == str(linen_error.value)


def test_rngs_is_required():
    with pytest.raises(TypeError, match="rngs"):
        ann.MultiHeadSelfAttention(32, 4)
    with pytest.raises(TypeError):
        ann.MultiHeadSelfAttention(32, 4, nnx.Rngs(0))  # keyword-only


# --- dropout --------------------------------------------------------------------------------


def _dropout_pair():
    """``(layer, plain, x)``: a ``dropout=0.5`` NNX layer and a ``dropout=0`` one with the
    same parameters."""
    mechanism = by_name("multi_head")
    layer, params = _random_layer(mechanism, bias=True, dropout=0.5)
    plain, _ = _random_layer(mechanism, bias=True)
    state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(plain, state)
    return layer, plain, _x(mechanism)


@needs_x64
def test_dropout_follows_the_layer_mode():
    """A new layer trains (dropout on, a new mask per call); ``eval()`` gives the
    dropout-free layer bit for bit; a call's ``deterministic=`` overrides the mode either
    way; ``train()`` turns dropout back on. The weights are those before dropout in either
    mode (docs/semantics.md)."""
    layer, plain, x = _dropout_pair()
    reference = plain(x)
    assert layer.deterministic is False
    first, second = layer(x), layer(x)
    assert not np.array_equal(first[0], second[0])
    assert not np.array_equal(first[0], reference[0])
    _assert_identical(first[1], reference[1])  # the weights before dropout (semantics.md)
    _assert_identical(layer(x, deterministic=True), reference)

    layer.eval()
    assert layer.deterministic is True
    _assert_identical(layer(x), reference)
    assert not np.array_equal(layer(x, deterministic=False)[0], reference[0])
    layer.train()
    assert not np.array_equal(layer(x)[0], reference[0])


@needs_x64
def test_nnx_view_sets_the_mode():
    """``nnx.view(layer, deterministic=True)`` (docs/semantics.md, "Flax NNX") is an
    evaluation view of the layer, alone and inside a model next to an ``nnx.Dropout``,
    and leaves the layer itself in training mode."""
    layer, plain, x = _dropout_pair()
    _assert_identical(nnx.view(layer, deterministic=True)(x), plain(x))
    assert layer.deterministic is False

    class Block(nnx.Module):
        def __init__(self, attention):
            self.attention = attention
            self.dropout = nnx.Dropout(0.1, rngs=nnx.Rngs(1))

    view = nnx.view(Block(layer), deterministic=True)
    assert view.dropout.deterministic is True
    _assert_identical(view.attention(x), plain(x))


@needs_x64
def test_dropout_key_from_the_call():
    """``rngs=`` at the call: a key is used as is (the same key, the same output: the
    linen forward with that ``dropout_rng``; another key, another output), as are an
    ``nnx.Rngs`` and an ``RngStream`` in the same state; the layer's own stream is not
    drawn from."""
    layer, _, x = _dropout_pair()
    key = jax.random.key(7)
    once, twice = layer(x, rngs=key), layer(x, rngs=key)
    _assert_identical(once, twice)
    assert not np.array_equal(once[0], layer(x, rngs=jax.random.key(8))[0])

    linen = by_name("multi_head").flax_layer(bias=True, dropout=0.5)
    core = linen.apply(
        {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))},
        x,
        method=lambda m, x: m.forward(
            x, None, context=None, is_causal=False, need_weights=True, dropout_rng=key
        ),
    )
    _assert_identical(once, core)

    _assert_identical(layer(x, rngs=nnx.Rngs(dropout=3)), layer(x, rngs=nnx.Rngs(dropout=3)))
    stream = nnx.Rngs(dropout=3)["dropout"]
    _assert_identical(layer(x, rngs=stream), layer(x, rngs=nnx.Rngs(dropout=3)))
    before = nnx.clone(layer)
    layer(x, rngs=key)
    _assert_identical(layer(x), before(x))  # the stored stream is where it was


@needs_x64
def test_dropout_under_nnx_jit_draws_from_the_layer_stream():
    """Under ``nnx.jit`` the layer's stream advances between calls (two calls differ), and
    a compiled call draws what the eager call draws from the same stream state."""
    layer, _, x = _dropout_pair()
    twin = nnx.clone(layer)
    call = nnx.jit(lambda layer, x: layer(x, need_weights=False)[0])
    first, second = call(layer, x), call(layer, x)
    assert not np.array_equal(first, second)
    np.testing.assert_allclose(first, twin(x, need_weights=False)[0], atol=1e-12, rtol=0)
    np.testing.assert_allclose(second, twin(x, need_weights=False)[0], atol=1e-12, rtol=0)


@needs_x64
def test_dropout_without_a_key_raises():
    """A training layer with no stream to draw from raises instead of silently skipping
    dropout; evaluation mode or a call key needs none."""
    layer, plain, x = _dropout_pair()
    layer.rngs = None
    with pytest.raises(ValueError, match="needs a key"):
        layer(x)
    _assert_identical(layer(x, deterministic=True), plain(x))
    assert layer(x, rngs=jax.random.key(0))[0].shape == x.shape


# --- PyTorch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "dtype", "need_weights"),
    [
        *(pytest.param(m, "float32", True, id=f"{m.name}-float32") for m in MECHANISMS),
        *(pytest.param(m, "bfloat16", False, id=f"{m.name}-bfloat16") for m in SAMPLE),
    ],
)
def test_compare_layers_with_nnx(mechanism, dtype, need_weights):
    """``parity.compare_layers`` against an NNX layer passes (outputs, weights and every
    gradient within SPEC §6), causal under a padding mask, and leaves the layer's own
    parameters alone."""
    torch.manual_seed(0)
    layer = mechanism.nnx_layer()
    before = parity.nnx_params(layer)
    x = np.asarray(_x(mechanism))
    report = parity.compare_layers(
        mechanism.torch_layer(),
        layer,
        x,
        PADDING,
        is_causal=True,
        need_weights=need_weights,
        dtype=dtype,
        jit=True,
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]
    assert (report.get("weights") is not None) == need_weights
    assert {f"grad {k}.weight" for k in base.PROJECTIONS} <= {c.name for c in report.comparisons}
    _assert_identical(parity.nnx_params(layer), before)


@needs_x64
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_torch_to_nnx_and_back(mechanism):
    """``torch_to_nnx`` loads the PyTorch weights into the NNX layer in place, bit for bit
    and in their dtype (the params ``torch_to_flax`` gives linen); ``nnx_to_torch`` gives
    the ``state_dict`` back bit for bit."""
    torch_layer, _ = helpers.make_layers(mechanism, {**mechanism.kwargs, "bias": True})
    layer = mechanism.nnx_layer(bias=True)
    assert parity.torch_to_nnx(torch_layer, layer) is layer
    _assert_identical(parity.nnx_params(layer), parity.torch_to_flax(torch_layer))
    state = parity.nnx_to_torch(layer, like=torch_layer)
    assert state.keys() == torch_layer.state_dict().keys()
    for key, value in torch_layer.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@needs_x64
@pytest.mark.parametrize("mechanism", SAMPLE, ids=lambda m: m.name)
def test_torch_to_nnx_computes_the_torch_layer(mechanism):
    """With ``torch_to_nnx``'s weights (random biases) the NNX layer gives the PyTorch
    layer's outputs and weights, causal under a padding mask (float64, 1e-12)."""
    torch_layer, _ = helpers.make_layers(mechanism, {**mechanism.kwargs, "bias": True})
    layer = parity.torch_to_nnx(torch_layer, mechanism.nnx_layer(bias=True))
    x = np.asarray(_x(mechanism))
    with torch.no_grad():
        expected = torch_layer(torch.tensor(x), torch.tensor(PADDING), is_causal=True)
    got = nnx.jit(lambda layer, x: layer(x, PADDING, is_causal=True))(layer, jnp.asarray(x))
    _assert_close(got, tuple(t.numpy() for t in expected), 1e-12, mechanism.name)


def test_torch_to_nnx_rejects_another_configuration():
    """A PyTorch layer of another width, or with biases the NNX layer lacks, raises a
    ``ConversionError`` naming the entries, and leaves the NNX layer as it was."""
    mechanism = by_name("local")
    layer = mechanism.nnx_layer()
    before = parity.nnx_params(layer)
    with pytest.raises(parity.ConversionError, match="w_q"):
        parity.torch_to_nnx(mechanism.torch_layer(d_model=64), layer)
    with pytest.raises(parity.ConversionError, match="bias"):
        parity.torch_to_nnx(mechanism.torch_layer(bias=True), layer)
    state = mechanism.torch_layer().state_dict()
    del state["w_o.weight"]
    with pytest.raises(parity.ConversionError, match="w_o"):
        parity.torch_to_nnx(state, layer)
    _assert_identical(parity.nnx_params(layer), before)


STEPS = 3
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}
"""As ``tests/test_optimizer_parity.py``."""


@needs_x64
@pytest.mark.parametrize("mechanism", SAMPLE, ids=lambda m: m.name)
def test_nnx_optimizer_adamw_equals_torch(mechanism):
    """Three ``nnx.Optimizer(layer, optax.adamw(...), wrt=nnx.Param)`` steps in one
    ``nnx.jit`` step function (causal, fast path, float64, biases, as
    ``tests/test_optimizer_parity.py`` does for linen): every step's loss is PyTorch's
    (1e-12) and the parameters end where ``torch.optim.AdamW`` leaves them (1e-10)."""
    torch.manual_seed(0)
    torch_layer = mechanism.torch_layer(bias=True).double()
    layer = parity.torch_to_nnx(torch_layer, mechanism.nnx_layer(bias=True))
    rng = np.random.default_rng(0)
    width = helpers.input_width(mechanism)
    xs = [rng.standard_normal((B, 9, width)) for _ in range(STEPS)]
    target = rng.standard_normal((B, 9, mechanism.kwargs["d_model"]))

    opt = torch.optim.AdamW(torch_layer.parameters(), **HYPER)
    torch_losses = []
    for x in xs:
        opt.zero_grad()
        out, _ = torch_layer(torch.tensor(x), is_causal=True, need_weights=False)
        loss = ((out - torch.tensor(target)) ** 2).mean()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())

    tx = optax.adamw(
        HYPER["lr"],
        b1=HYPER["betas"][0],
        b2=HYPER["betas"][1],
        eps=HYPER["eps"],
        weight_decay=HYPER["weight_decay"],
    )
    optimizer = nnx.Optimizer(layer, tx, wrt=nnx.Param)

    def loss_fn(layer, x):
        out, _ = layer(x, is_causal=True, need_weights=False)
        return ((out - jnp.asarray(target)) ** 2).mean()

    @nnx.jit
    def step(layer, optimizer, x):
        loss, grads = nnx.value_and_grad(loss_fn)(layer, x)
        optimizer.update(layer, grads)
        return loss

    start = parity.nnx_params(layer)
    losses = [float(step(layer, optimizer, jnp.asarray(x))) for x in xs]
    np.testing.assert_allclose(losses, torch_losses, atol=1e-12, rtol=0)
    ours = parity.nnx_to_torch(layer, like=torch_layer)
    for name, value in torch_layer.state_dict().items():
        np.testing.assert_allclose(
            ours[name].numpy(), value.numpy(), atol=1e-10, rtol=0, err_msg=name
        )
    for name in base.PROJECTIONS:  # the kernels took real steps (lr 1e-2, three of them)
        moved = np.max(np.abs(parity.nnx_params(layer)[name]["kernel"] - start[name]["kernel"]))
        assert moved > 1e-3, name

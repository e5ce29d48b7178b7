"""Sharded parameters in JAX (``attentions_jax.sharding``, SPEC §13).

The sharded tests need 8 devices: ``test_eight_host_devices`` starts pytest over this
module in a second process with ``--xla_force_host_platform_device_count=8`` (the rest of
the suite keeps one device). There the parameters are split by heads along the
``"heads"`` axis of a 2 x 4 ``("data", "heads")`` mesh (GQA: of a 1 x 8 one), the input
by its batch along ``"data"``, and the layer's jitted call is compared with the same call
on one device, float64: the fast path's output, the input's and every parameter's
gradient, and (some cases) the weights path's output and weights. The plan, its checks
and the refusals run here, on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attentions_jax as aj
import attentions_torch as at
from attentions_jax import sharding
from attentions_jax.sharding import tensor_parallel, tensor_parallel_plan
from attentions_torch import sharding as torch_sharding
from tests.multiprocess import run_on_host_devices

DEVICES = 8
SHARDED = jax.device_count() == DEVICES
needs_devices = pytest.mark.skipif(
    not SHARDED, reason=f"runs in the {DEVICES}-device process (test_eight_host_devices)"
)
B, L = 4, 7
TOLERANCE = 1e-10

LAYERS = {
    "multi_head": lambda: aj.MultiHeadSelfAttention(16, 4, input_dim=12, bias=True),
    "local": lambda: aj.LocalSelfAttention(16, 3, 4),
    "grouped": lambda: aj.GroupedSelfAttention(
        32, 16, 8, temperature=0.7, rope=True, rope_interleaved=False
    ),
    "dilated": lambda: aj.DilatedSelfAttention(16, 2, 4),
    "linear": lambda: aj.LinearSelfAttention(16, 4, bias=True),
    "block": lambda: aj.BlockSelfAttention(16, 3, 4),
    "alibi": lambda: aj.ALiBiSelfAttention(24, 12),
    "rotary": lambda: aj.RotarySelfAttention(16, 4),
}
"""Every mechanism that has heads to split (a vanilla layer's one head and MQA's one kv
head are refused, below), GQA over 8 devices, ALiBi with 12 heads (no power of two,
so no device's slopes are a rescaled copy of another's)."""

CASES = [
    ("multi_head", False, "heads", 4, True),
    ("local", True, "padding", 4, False),
    ("grouped", True, None, 8, False),
    ("dilated", False, "heads", 4, False),
    ("linear", True, None, 4, False),
    ("block", False, "padding", 4, False),
    ("alibi", True, "heads", 4, True),
    ("rotary", False, None, 4, False),
]
"""(layer, is_causal, mask, devices along "heads", weights path too): a compile per case
and path, so not the whole product."""


@pytest.mark.slow
@pytest.mark.skipif(SHARDED, reason="this is the 8-device process")
def test_eight_host_devices():
    run_on_host_devices(__file__, DEVICES)


def _mesh(heads: int) -> jax.sharding.Mesh:
    return jax.make_mesh(
        (DEVICES // heads, heads),
        ("data", "heads"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def _mask(kind: str | None, heads: int) -> jax.Array | None:
    if kind == "heads":
        return jnp.asarray(np.random.default_rng(2).random((B, heads, L, L)) < 0.7)
    if kind == "padding":
        return aj.padding_mask(jnp.array([7, 3, 5, 1]), L)
    return None


def _largest(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.abs(a - b).max())


def _held(tree) -> dict[str, float]:
    """The largest share of each leaf that one device holds (its bytes)."""
    return {
        jax.tree_util.keystr(path): max(s.data.nbytes for s in leaf.addressable_shards)
        / leaf.nbytes
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@needs_devices
@pytest.mark.parametrize(
    ("name", "is_causal", "mask", "heads", "weights"),
    CASES,
    ids=[f"{c[0]}-{'causal' if c[1] else 'full'}-{c[3]}" for c in CASES],
)
def test_sharded_layer_equals_one_device(name, is_causal, mask, heads, weights):
    layer = LAYERS[name]()
    width = layer.d_model if layer.input_dim is None else layer.input_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, L, width)))
    cotangent = jnp.asarray(rng.standard_normal((B, L, layer.d_model)))
    mask = _mask(mask, layer.head_counts()[0])
    variables = layer.init(jax.random.key(1), x)

    def loss(variables, x):
        out, _ = layer.apply(variables, x, mask, is_causal=is_causal, need_weights=False)
        return (out * cotangent).sum(), out

    fast = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (expected_grads, expected_x), expected = fast(variables, x)

    mesh = _mesh(heads)
    sharded = tensor_parallel(layer, variables, mesh, "heads")
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    (grads, grad_x), out = fast(sharded, x_sharded)
    errors = {"out": _largest(out, expected), "x": _largest(grad_x, expected_x)}
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        errors[jax.tree_util.keystr(path)] = _largest(a, b)
    if weights:
        slow = jax.jit(lambda v, x: layer.apply(v, x, mask, is_causal=is_causal))
        for path, a, b in zip(
            ("slow", "weights"), slow(sharded, x_sharded), slow(variables, x), strict=True
        ):
            errors[path] = _largest(a, b)
    assert max(errors.values()) <= TOLERANCE, errors

    # each device holds 1/N of w_q, w_k, w_v and of w_o's kernel, all of w_o's bias
    for path, held in _held(sharded).items():
        assert held == (1.0 if "w_o']['bias" in path else 1 / heads), (path, held)


@needs_devices
def test_dense_heads_stay_on_their_device():
    """The compiled forward and backward of a head-split layer exchange no parameters or
    heads: no all-gather, only the all-reduces of w_o's partial sums (and x's gradient)."""
    layer = aj.MultiHeadSelfAttention(16, 4)
    x = jnp.ones((B, L, 16))
    mesh = _mesh(4)
    variables = tensor_parallel(layer, layer.init(jax.random.key(0), x), mesh, "heads")

    def loss(variables, x):
        return layer.apply(variables, x, is_causal=True, need_weights=False)[0].sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo


@needs_devices
def test_nnx_state_shards_too():
    from flax import nnx

    from attentions_jax.nnx import ALiBiSelfAttention

    layer = ALiBiSelfAttention(24, 12, dropout=0.1, rngs=nnx.Rngs(0))
    layer.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, 24)))
    graph, state = nnx.split(layer)
    sharded = tensor_parallel(layer, state, _mesh(4), "heads")

    @jax.jit
    def call(state, x):
        return nnx.merge(graph, state)(x, is_causal=True, need_weights=False)[0]

    assert _largest(call(sharded, x), call(state, x)) <= TOLERANCE
    held = _held(sharded)
    assert held["['w_q']['kernel'].value"] == 1 / 4
    assert held["['rngs']['key'].value"] == 1.0  # not a projection: replicated


def test_plan_splits_the_heads():
    layer = aj.MultiHeadSelfAttention(16, 4, bias=True)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 2, 16))))
    mesh = jax.make_mesh((1,), ("heads",), axis_types=(jax.sharding.AxisType.Auto,))
    plan = tensor_parallel_plan(layer, variables, mesh)
    specs = {k: {p: s.spec for p, s in v.items()} for k, v in plan["params"].items()}
    split = {"kernel": P(None, "heads"), "bias": P("heads")}
    assert specs == {
        "w_q": split,
        "w_k": split,
        "w_v": split,
        "w_o": {"kernel": P("heads", None), "bias": P()},
    }


def test_plan_needs_the_axis_and_the_projections():
    layer = aj.MultiHeadSelfAttention(16, 4)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 2, 16))))
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="the mesh has no axis 'heads'; its axes are"):
        tensor_parallel_plan(layer, variables, mesh)
    with pytest.raises(ValueError, match="found no projection"):
        tensor_parallel_plan(layer, {"params": {"dense": {"kernel": jnp.zeros(2)}}}, mesh, "model")


@pytest.mark.parametrize(
    ("make", "shards", "given"),
    [
        (lambda m: m.VanillaSelfAttention(8), 2, "num_heads=1, num_kv_heads=1"),
        (lambda m: m.MultiHeadSelfAttention(24, 6), 4, "num_heads=6, num_kv_heads=6"),
        (lambda m: m.GroupedSelfAttention(16, 4, 2), 4, "num_heads=4, num_kv_heads=2"),
        (lambda m: m.GroupedSelfAttention(16, 4, 1), 2, "num_heads=4, num_kv_heads=1"),
    ],
    ids=["vanilla", "heads", "kv_heads", "mqa"],
)
def test_what_cannot_split_is_refused_in_both_frameworks(make, shards, given):
    """The same text from both packages."""
    messages = []
    for package, validate in (
        (aj, sharding.validate_tensor_parallel),
        (at, torch_sharding.validate_tensor_parallel),
    ):
        with pytest.raises(ValueError, match=f"splits the heads.*got {given}") as error:
            validate(make(package), shards)
        messages.append(str(error.value))
        validate(make(package), 1)
    assert messages[0] == messages[1]

"""Sequence parallelism in JAX (``attentions_jax.parallel``, SPEC §13).

The sharded tests need 8 devices: ``test_eight_host_devices`` starts pytest over this
module in a second process with ``--xla_force_host_platform_device_count=8`` (the rest of
the suite keeps one device), where the layers run under ``jax.shard_map`` on a mesh of
8 (and of 4) host devices and are compared with the same layer on the whole sequence,
float64: outputs, the input's and every parameter's gradient, for the dense family and
for local, block, dilated and linear attention; the bytes the patterns exchange are
counted in the jaxpr. The layouts, positions and the checks made before any
communication run here, on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import attentions_jax as aj
from attentions_jax import parallel
from attentions_jax.parallel import SequenceParallel, from_layout, shard_positions, to_layout
from tests.multiprocess import run_on_host_devices

DEVICES = 8
SHARDED = jax.device_count() == DEVICES
needs_devices = pytest.mark.skipif(
    not SHARDED, reason=f"runs in the {DEVICES}-device process (test_eight_host_devices)"
)
B, L = 2, 32
TOLERANCE = 1e-10

DENSE = {
    "vanilla": lambda: aj.VanillaSelfAttention(16, bias=True),
    "multi_head": lambda: aj.MultiHeadSelfAttention(16, 4, input_dim=12),
    "grouped": lambda: aj.GroupedSelfAttention(16, 4, 2, temperature=0.7),
    "mqa": lambda: aj.GroupedSelfAttention(16, 4, 1, bias=True),
    "grouped_rope": lambda: aj.GroupedSelfAttention(16, 4, 2, rope=True, rope_base=500000.0),
    "alibi_6_heads": lambda: aj.ALiBiSelfAttention(24, 6),
    "rotary": lambda: aj.RotarySelfAttention(16, 4),
    "rotary_halves": lambda: aj.RotarySelfAttention(16, 4, rope_interleaved=False),
}
"""The dense family, with GQA, MQA, ALiBi for a head count that is no power of two, and
both RoPE layouts."""

PATTERNS = {
    # h = 4 against chunks of 4 (L/N over 8, L/2N over 4): the window's widest reach
    "local": lambda: aj.LocalSelfAttention(16, window_size=9, num_heads=4, rope=True),
    # 4 divides the chunks: no exchange
    "block_aligned": lambda: aj.BlockSelfAttention(16, block_size=4, num_heads=4),
    # blocks of 3 straddle shards of 4 and 8: shards start at every residue
    "block_straddling": lambda: aj.BlockSelfAttention(16, block_size=3, num_heads=2, bias=True),
    "dilated_2": lambda: aj.DilatedSelfAttention(16, dilation_rate=2, num_heads=4),
    "dilated_4": lambda: aj.DilatedSelfAttention(16, dilation_rate=4, num_heads=2),
    "linear_elu": lambda: aj.LinearSelfAttention(16, num_heads=4),
    "linear_relu": lambda: aj.LinearSelfAttention(16, num_heads=2, feature_map="relu"),
}
"""Local, block, dilated and linear attention, each with the reach its sharded form has to
exchange."""

LAYERS = {**DENSE, **PATTERNS}


@pytest.mark.slow
@pytest.mark.skipif(SHARDED, reason="this is the 8-device process")
def test_eight_host_devices():
    run_on_host_devices(__file__, DEVICES)


def _mesh(shards: int) -> jax.sharding.Mesh:
    return jax.make_mesh(
        (shards,),
        ("seq",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:shards],
    )


def _sharded_call(layer, shards: int, layout: str, **call):
    """``(variables, x) -> out``: the layer under ``shard_map`` over ``shards`` devices,
    the whole sequence in and out (reordered into the layout and back)."""
    spec = SequenceParallel("seq", layout)

    def local(variables, x):
        return layer.apply(variables, x, need_weights=False, sequence_parallel=spec, **call)[0]

    sharded = jax.shard_map(
        local,
        mesh=_mesh(shards),
        in_specs=(P(), P(None, "seq", None)),
        out_specs=P(None, "seq", None),
    )
    return lambda variables, x: from_layout(
        sharded(variables, to_layout(x, shards, layout)), shards, layout
    )


CASES = [
    *((name, False, "contiguous", DEVICES) for name in DENSE),
    *((name, True, "zigzag", DEVICES) for name in DENSE),
    ("multi_head", True, "contiguous", 4),
    ("grouped_rope", True, "contiguous", 4),
    ("alibi_6_heads", False, "zigzag", 4),
    ("rotary", True, "zigzag", 4),
    ("local", False, "contiguous", DEVICES),
    ("local", False, "zigzag", 4),
    ("local", True, "zigzag", 4),
    ("block_aligned", False, "contiguous", DEVICES),
    ("block_aligned", True, "zigzag", 4),
    ("block_straddling", False, "contiguous", DEVICES),
    ("block_straddling", True, "contiguous", 4),
    ("dilated_2", False, "contiguous", DEVICES),
    ("dilated_4", True, "zigzag", 4),
    ("linear_elu", False, "contiguous", DEVICES),
    ("linear_elu", True, "zigzag", DEVICES),
    ("linear_relu", True, "contiguous", 4),
]
"""Every dense layer over 8 devices non-causal in shard order and causal load-balanced,
and the other pairings over 4 (a compile per case, so not the whole product); each
pattern causal and not, in both layouts where it takes them (local both ways in zigzag,
whose neighbours are the intricate part)."""


@needs_devices
@pytest.mark.parametrize(
    ("name", "is_causal", "layout", "shards"),
    CASES,
    ids=[f"{n}-{'causal' if c else 'full'}-{lay}-{s}" for n, c, lay, s in CASES],
)
def test_sharded_layer_equals_one_device(name, is_causal, layout, shards):
    layer = LAYERS[name]()
    width = layer.d_model if layer.input_dim is None else layer.input_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, L, width)))
    variables = layer.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), variables)
    cotangent = jnp.asarray(rng.standard_normal((B, L, layer.d_model)))

    def whole(variables, x):
        return layer.apply(variables, x, is_causal=is_causal, need_weights=False)[0]

    sharded = _sharded_call(layer, shards, layout, is_causal=is_causal)

    def loss(call):
        return lambda variables, x: (call(variables, x) * cotangent).sum()

    # compiled, as the sharded call is: op by op the tiled kernels take longer
    expected = jax.jit(whole)(variables, x)
    found = jax.jit(sharded)(variables, x)
    assert float(jnp.abs(found - expected).max()) <= TOLERANCE
    grads = jax.jit(jax.grad(loss(whole), argnums=(0, 1)))(variables, x)
    sharded_grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(variables, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded_grads), strict=True):
        assert float(jnp.abs(a - b).max()) <= TOLERANCE


@needs_devices
def test_nnx_layer_shards_too():
    from flax import nnx

    from attentions_jax.nnx import GroupedSelfAttention

    layer = GroupedSelfAttention(16, 4, 2, rope=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, 16)), jnp.float32)
    graph, state = nnx.split(layer)

    def local(state, x):
        model = nnx.merge(graph, state)
        return model(x, is_causal=True, need_weights=False, sequence_parallel="seq")[0]

    sharded = jax.shard_map(
        local, mesh=_mesh(DEVICES), in_specs=(P(), P(None, "seq", None)), out_specs=P(None, "seq")
    )
    expected, _ = layer(x, is_causal=True, need_weights=False)
    np.testing.assert_allclose(jax.jit(sharded)(state, x), expected, atol=2e-6)


@needs_devices
@pytest.mark.parametrize("name", ["multi_head", "grouped"])
def test_memory_per_device_at_32k(name):
    """Compiled, never run: the XLA temporaries of fwd+bwd (and the forward) per device
    over 8 devices are at most 1/4 of one device's at L = 32768 (``memory_analysis``,
    temporaries + arguments + outputs)."""
    make = {
        "multi_head": lambda: aj.MultiHeadSelfAttention(512, 8),
        "grouped": lambda: aj.GroupedSelfAttention(512, 8, 2),
    }[name]
    layer = make()
    x = jax.ShapeDtypeStruct((1, 32768, 512), jnp.float32)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 8, 512))))

    def whole(variables, x):
        return layer.apply(variables, x, is_causal=True, need_weights=False)[0]

    sharded = jax.shard_map(
        lambda v, x: layer.apply(v, x, is_causal=True, need_weights=False, sequence_parallel="seq")[
            0
        ],
        mesh=_mesh(DEVICES),
        in_specs=(P(), P(None, "seq", None)),
        out_specs=P(None, "seq", None),
    )

    def footprint(call, backward: bool) -> int:
        if backward:
            call = jax.grad(lambda v, x, f=call: f(v, x).sum(), argnums=(0, 1))
        memory = jax.jit(call).lower(variables, x).compile().memory_analysis()
        return (
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        )

    for backward in (False, True):
        assert footprint(sharded, backward) <= footprint(whole, backward) / 4


def test_shard_positions():
    assert shard_positions(1, 4, 4).tolist() == [4, 5, 6, 7]
    # zigzag over 4 shards: 8 chunks of 2; shard 1 holds chunks 1 and 6
    assert shard_positions(1, 4, 4, "zigzag").tolist() == [2, 3, 12, 13]
    every = np.concatenate([np.asarray(shard_positions(r, 4, 4, "zigzag")) for r in range(4)])
    assert sorted(every.tolist()) == list(range(16))


@pytest.mark.parametrize("layout", parallel.LAYOUTS)
def test_layout_round_trip(layout):
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    moved = to_layout(x, 4, layout)
    assert jnp.array_equal(from_layout(moved, 4, layout), x)
    # piece r holds shard r's positions
    pieces = jnp.split(moved[0, :, 0] // 3, 4)
    for rank, piece in enumerate(pieces):
        assert piece.tolist() == shard_positions(rank, 4, 6, layout).tolist()


@pytest.mark.parametrize(("length", "layout"), [(30, "contiguous"), (12, "zigzag")])
def test_uneven_split_is_refused(length, layout):
    with pytest.raises(ValueError, match="unevenly split shards are refused"):
        to_layout(jnp.zeros((1, length, 2)), 8 if layout == "contiguous" else 4, layout)
    with pytest.raises(ValueError, match="layout must be one of"):
        to_layout(jnp.zeros((1, 8, 2)), 2, "striped")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"need_weights": True}, "need_weights=True"),
        ({"mask": jnp.ones((8, 8), bool)}, "a mask"),
        ({"context": jnp.ones((1, 8, 16))}, "context"),
        ({"deterministic": False}, "dropout in training"),
        ({"sequence_parallel": 3}, "a mesh axis name or SequenceParallel"),
        ({"sequence_parallel": SequenceParallel("seq", "striped")}, "layout must be one of"),
    ],
)
def test_what_a_sharded_call_refuses(call, message):
    """Checked before any communication, so outside ``shard_map`` too."""
    layer = aj.MultiHeadSelfAttention(16, 4, dropout=0.1)
    x = jnp.ones((1, 8, 16))
    variables = layer.init(jax.random.key(0), x)
    call = {"sequence_parallel": "seq", "need_weights": False, **call}
    with pytest.raises(ValueError, match=message):
        layer.apply(variables, x, rngs={"dropout": jax.random.key(1)}, **call)


COLLECTIVES = ("ppermute", "all_gather", "psum", "psum_invariant", "all_to_all", "reduce_scatter")


def _exchanged_bytes(call, *args) -> int:
    """Bytes the collectives of ``call`` send per device: the sizes of their operands in
    its jaxpr, sub-jaxprs included (a loop's body counted once)."""

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in COLLECTIVES:
                total += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        total += walk(sub)
        return total

    return walk(jax.make_jaxpr(call)(*args).jaxpr)


EXCHANGES = [
    ("local", False, "contiguous", DEVICES),
    ("local", False, "zigzag", 4),
    ("local", True, "zigzag", 4),
    ("block_aligned", False, "contiguous", DEVICES),
    ("block_straddling", False, "contiguous", DEVICES),
    ("linear_elu", True, "zigzag", DEVICES),
]


@needs_devices
@pytest.mark.parametrize(
    ("name", "is_causal", "layout", "shards"),
    EXCHANGES,
    ids=[f"{n}-{'causal' if c else 'full'}-{lay}-{s}" for n, c, lay, s in EXCHANGES],
)
def test_bytes_exchanged_do_not_grow_with_length(name, is_causal, layout, shards):
    """Traced, never run: the same bytes per device at L and 2L. Local sends the
    ``h = window_size // 2`` rows of k and v on each side of each chunk (before only
    when causal), aligned blocks nothing."""
    layer = LAYERS[name]()
    x = jax.ShapeDtypeStruct((B, L, layer.d_model), jnp.float64)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    call = _sharded_call(layer, shards, layout, is_causal=is_causal)
    sent = [
        _exchanged_bytes(call, variables, x.update(shape=(B, n, x.shape[2]))) for n in (L, 2 * L)
    ]
    assert sent[0] == sent[1]
    if name == "local":
        rows = layer.window_size // 2 * (1 if is_causal else 2) * (2 if layout == "zigzag" else 1)
        assert sent[0] == 2 * B * layer.num_heads * rows * layer.d_head * 8  # k and v, float64
    elif name == "block_aligned":
        assert sent[0] == 0
    else:
        assert sent[0] > 0


REFUSALS = [
    (
        lambda: aj.LocalSelfAttention(16, window_size=9, num_heads=4),
        "zigzag",
        r"window_size // 2 = 4 <= the chunk length L/2N = 3 .*fewer shards",
    ),
    (
        lambda: aj.DilatedSelfAttention(16, dilation_rate=4, num_heads=4),
        "contiguous",
        r"dilation_rate = 4 to divide the chunk length L/N = 6",
    ),
    (
        lambda: aj.BlockSelfAttention(16, block_size=4, num_heads=4),
        "zigzag",
        r"layout='zigzag' needs block_size = 4 to divide the chunk length L/2N = 3",
    ),
    (
        lambda: aj.BlockSelfAttention(16, block_size=8, num_heads=4),
        "contiguous",
        r"block_size - 1 = 7 <= the shard length L/N = 6",
    ),
]


@pytest.mark.parametrize(
    ("make", "layout", "message"),
    REFUSALS,
    ids=["local-window", "dilated-rate", "block-zigzag", "block-reach"],
)
def test_what_a_pattern_refuses(make, layout, message):
    """A chunk too short for the pattern's reach is refused while tracing, before any
    communication (here on a mesh of one device, L = 6)."""
    layer = make()
    x = jax.ShapeDtypeStruct((1, 6, 16), jnp.float32)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    call = _sharded_call(layer, 1, layout)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(call, variables, x)

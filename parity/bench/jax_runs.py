"""JAX workloads: the Flax layer, and ``jax.nn.dot_product_attention`` by hand, jitted.

Each builder compiles ahead of time (``jax.jit(f).lower(...).compile()``), so the compile
time is measured on its own and the timed calls run the compiled executable; the
executable's ``memory_analysis()`` gives the bytes it allocates (temporaries + outputs;
the temporaries alone too). A ``memory_only`` cell stops there: compiled, never run.
Forward+backward is ``jax.grad`` of ``<out, cotangent>`` into the inputs and every
parameter; a decoding step is the layer's ``decode`` jitted with its cache donated. The
references reuse the layer's own parameters, and masks or biases are arguments (not
constants folded into the program). Everything is made under ``jax.default_device(device)``
and the arguments are committed there with ``jax.device_put``, so the program compiles
for, and runs on, the run's device (CPU, GPU or TPU); ``run()`` blocks until the result is
ready.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attentions_jax

from ..mechanisms import Mechanism
from .cases import alibi_slopes
from .plan import (
    Cell,
    Workload,
    bench_heads,
    bench_size,
    layer_kwargs,
    reference_pattern,
    refusing_not_available,
)

__all__ = ["build", "reference_mask"]

_F32 = jnp.float32


def reference_mask(
    mechanism: Mechanism, pattern: str, length: int, is_causal: bool
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(mask, bias)`` for ``jax.nn.dot_product_attention``; causality is its own flag."""
    if pattern == "alibi":
        positions = np.arange(length, dtype=np.float32)
        distance = np.abs(positions[:, None] - positions[None, :])
        slopes = alibi_slopes(bench_heads(mechanism)[0]).astype(np.float32)
        return None, jnp.asarray(-slopes[None, :, None, None] * distance)
    builders = {
        "local": attentions_jax.local_mask,
        "dilated": attentions_jax.dilated_mask,
        "block": attentions_jax.block_mask,
    }
    if pattern in builders:
        return builders[pattern](length, bench_size(mechanism))[None, None], None
    return None, None


def _fused(mechanism: Mechanism, cell: Cell) -> Callable:
    """``(q, k, v, mask, bias) -> out`` in ``(B, L, H, D)`` layout, the kernel's own."""
    heads = bench_heads(mechanism)[0]
    scale = 1.0 / math.sqrt(cell.d_model // heads)

    def attention(q, k, v, mask, bias):
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, is_causal=cell.is_causal
        )

    return attention


def _by_hand(mechanism: Mechanism, cell: Cell, layer, pattern: str) -> Callable:
    """Projections, (RoPE), the fused kernel and the output projection, written out."""
    heads, kv_heads = bench_heads(mechanism)
    batch, length, width = cell.batch, cell.length, cell.d_model
    d_head = width // heads
    attention = _fused(mechanism, cell)

    def project(params, x, name: str, count: int) -> jax.Array:
        out = x @ params[name]["kernel"]
        if "bias" in params[name]:
            out = out + params[name]["bias"]
        return out.reshape(batch, length, count, d_head)

    def rotate(x: jax.Array) -> jax.Array:
        # apply_rope takes (B, H, L, D); the kernel takes (B, L, H, D)
        heads_first = x.transpose(0, 2, 1, 3)
        rotated = attentions_jax.apply_rope(
            heads_first, base=layer.rope_base, interleaved=layer.rope_interleaved
        )
        return rotated.transpose(0, 2, 1, 3)

    def forward(params, x, mask, bias):
        q = project(params, x, "w_q", heads)
        k = project(params, x, "w_k", kv_heads)
        v = project(params, x, "w_v", kv_heads)
        if pattern == "rope":
            q, k = rotate(q), rotate(k)
        out = attention(q, k, v, mask, bias).reshape(batch, length, width)
        out = out @ params["w_o"]["kernel"]
        return out + params["w_o"]["bias"] if "bias" in params["w_o"] else out

    return forward


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, _F32)


def _init(mechanism: Mechanism, cell: Cell):
    """The Flax layer and its variables (initialized on a short input: same parameters)."""
    layer = mechanism.layer_class("jax")(**layer_kwargs(mechanism, cell.d_model))
    sample = jnp.zeros((1, min(cell.length, 16), cell.d_model), _F32)
    return layer, layer.init(jax.random.key(0), sample)


def _layer_program(mechanism: Mechanism, cell: Cell, pattern: str | None):
    """The whole layer from ``x``, or the same done by hand around the fused kernel."""
    layer, variables = _init(mechanism, cell)
    x = _normal(jax.random.key(1), (cell.batch, cell.length, cell.d_model))
    if pattern is not None:
        mask = reference_mask(mechanism, pattern, cell.length, cell.is_causal)
        return _by_hand(mechanism, cell, layer, pattern), (variables["params"], x), mask
    need_weights = cell.subject == "weights"

    def apply_layer(params, x):
        out = layer.apply(
            {**variables, "params": params},
            x,
            is_causal=cell.is_causal,
            need_weights=need_weights,
        )
        return out if need_weights else out[0]

    return apply_layer, (variables["params"], x), ()


def _core_program(mechanism: Mechanism, cell: Cell, pattern: str | None):
    """``layer.attend`` on ``(B, H, L, D)`` q, k, v, or the fused kernel on ``(B, L, H, D)``.

    The kernel needs no layer, so a reference runs before the mechanism exists.
    """
    heads, kv_heads = bench_heads(mechanism)
    d_head = cell.d_model // heads
    keys = jax.random.split(jax.random.key(1), 3)
    if pattern is not None:
        shapes = [(cell.batch, cell.length, count, d_head) for count in (heads, kv_heads, kv_heads)]
        qkv = tuple(_normal(key, shape) for key, shape in zip(keys, shapes, strict=True))
        mask = reference_mask(mechanism, pattern, cell.length, cell.is_causal)
        return _fused(mechanism, cell), qkv, mask
    layer, variables = _init(mechanism, cell)
    shapes = [(cell.batch, count, cell.length, d_head) for count in (heads, kv_heads, kv_heads)]
    qkv = tuple(_normal(key, shape) for key, shape in zip(keys, shapes, strict=True))

    def attend(q, k, v):
        return layer.apply(
            variables,
            q,
            k,
            v,
            None,
            is_causal=cell.is_causal,
            need_weights=False,
            method="attend",
        )[0]

    return attend, qkv, ()


def _program(mechanism: Mechanism, cell: Cell) -> tuple[Callable, tuple, tuple]:
    """``(f, differentiable inputs, constant inputs)`` with ``f(*diff, *const) -> out``."""
    if cell.subject == "matmul":
        keys = jax.random.split(jax.random.key(1))
        return jnp.matmul, tuple(_normal(key, (cell.length, cell.length)) for key in keys), ()
    pattern = None
    if cell.subject not in ("layer", "weights"):
        pattern = reference_pattern(mechanism, cell.subject, cell.scope)
    if cell.scope == "layer":
        return _layer_program(mechanism, cell, pattern)
    return _core_program(mechanism, cell, pattern)


def _arguments(mechanism: Mechanism, cell: Cell) -> tuple[Callable, tuple, tuple]:
    """``(program, args, inputs)``: the cell's forward, or its gradient into every input."""
    function, diff, const = _program(mechanism, cell)
    if cell.mode == "fwd":
        return function, (*diff, *const), (*diff, *const)
    out_shape = jax.eval_shape(function, *diff, *const).shape
    cotangent = _normal(jax.random.key(1), out_shape)

    def loss(diff, const, cotangent):
        return jnp.vdot(function(*diff, *const), cotangent)

    return jax.grad(loss), (diff, const, cotangent), (*diff, *const)


def _filled_cache(cache: tuple, length: int, key: jax.Array) -> tuple:
    """``cache`` as if it held ``length`` tokens: every floating field random and positive
    (linear attention's state divides by its ``k_sum``), ``lengths`` = ``length``."""
    keys = jax.random.split(key, len(cache))
    fields = {
        name: jnp.abs(jax.random.normal(subkey, value.shape, value.dtype))
        for name, value, subkey in zip(cache._fields, cache, keys, strict=True)
        if jnp.issubdtype(value.dtype, jnp.floating)
    }
    return cache._replace(**fields, lengths=jnp.full_like(cache.lengths, length))


def _decode_step(mechanism: Mechanism, cell: Cell, device: jax.Device) -> Workload:
    """One jitted ``decode`` of T = 1 token against a cache holding ``cell.length`` tokens.

    The cache is donated and the returned one fed to the next call, as in a generation
    loop (without donation XLA would copy the whole cache every step). ``max_length`` is
    L + 1; the program first sets ``lengths`` back to L, so every call decodes position L
    and ``run()`` may be called any number of times.
    """
    with jax.default_device(device):
        layer, variables = _init(mechanism, cell)
        cache = refusing_not_available(
            lambda: layer.apply(variables, cell.batch, cell.length + 1, method="init_cache")
        )
        cache = _filled_cache(cache, cell.length, jax.random.key(1))
        x = _normal(jax.random.key(2), (cell.batch, 1, cell.d_model))
        variables, cache, x = jax.device_put((variables, cache, x), device)

        def step(variables, cache, x):
            cache = cache._replace(lengths=jnp.full_like(cache.lengths, cell.length))
            return layer.apply(variables, cache, x, method="decode")

        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=1).lower(variables, cache, x).compile()
        compile_s = time.perf_counter() - start
    state = [cache]

    def run() -> object:
        state[0], out = compiled(variables, state[0], x)
        return jax.block_until_ready((state[0], out))[1]

    cache_bytes = sum(field.nbytes for field in cache)
    return Workload(run, (x,), compile_s=compile_s, cache_bytes=cache_bytes)


def build(mechanism: Mechanism, cell: Cell, device: jax.Device | None = None) -> Workload:
    """Compile the cell's program for ``device`` (default: the first CPU) ahead of time and
    return its timed call; a ``memory_only`` cell's call raises (its figures are the
    compile time and the ``memory_analysis()`` bytes)."""
    device = device or jax.devices("cpu")[0]
    if cell.subject == "step":
        return _decode_step(mechanism, cell, device)
    with jax.default_device(device):
        program, args, inputs = _arguments(mechanism, cell)
        args = jax.device_put(args, device)
        start = time.perf_counter()
        compiled = jax.jit(program).lower(*args).compile()
        compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    xla_bytes = xla_temp_bytes = None
    if analysis is not None:
        xla_temp_bytes = int(analysis.temp_size_in_bytes)
        xla_bytes = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)

    def run() -> object:
        return jax.block_until_ready(compiled(*args))

    if cell.memory_only:
        run = _never_run(cell)
    return Workload(
        run, inputs, compile_s=compile_s, xla_bytes=xla_bytes, xla_temp_bytes=xla_temp_bytes
    )


def _never_run(cell: Cell) -> Callable[[], object]:
    """The ``run`` of a memory-only cell: it was compiled for its figures, not to be called."""

    def run() -> object:
        raise RuntimeError(f"{cell.describe()}: a memory-only cell is compiled, never run")

    return run

"""The sparse fast paths never build an (L, L) tensor on their fast path, checked at L = 32768.

An ``(L, L)`` float32 tensor would take 4 GiB there (a bool one 1 GiB). PyTorch: a fresh
interpreter runs each mechanism's fast path and reports how far its peak resident memory
rose. JAX: no value in the traced program has L·L elements (or a tenth of that), and
XLA's memory analysis of the compiled program stays far below L·L·4 bytes and grows
linearly in L for local and block attention.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

import attentions_jax as aj

LENGTH = 32768
SQUARE_BYTES = LENGTH * LENGTH * 4
CONFIGS = {
    "LocalSelfAttention": {"window_size": 64},
    "DilatedSelfAttention": {"dilation_rate": 8},
    "BlockSelfAttention": {"block_size": 64},
}

_TORCH_PEAK = """
import json, resource, sys
import torch
import attentions_torch as at

length, configs = int(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(0)
x = torch.randn(1, length, 16)
padding = at.padding_mask(torch.tensor([length - 5]), length)
rises = {}
with torch.no_grad():
    for name, kwargs in configs.items():
        layer = getattr(at, name)(16, num_heads=1, **kwargs)
        layer(x[:, :100], need_weights=False)  # warm up at a small length
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for mask, is_causal in ((None, False), (padding, True)):
            out, weights = layer(x, mask, is_causal=is_causal, need_weights=False)
            assert weights is None and bool(torch.isfinite(out).all())
        rises[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps(rises))
"""


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_fast_path_peak_memory(name):
    """Peak RSS rises by far less than one (L, L) float32 tensor (4 GiB) would need."""
    result = subprocess.run(
        [sys.executable, "-c", _TORCH_PEAK, str(LENGTH), json.dumps({name: CONFIGS[name]})],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rise = json.loads(result.stdout.splitlines()[-1])[name]
    assert rise < SQUARE_BYTES / 32, f"{name}: peak RSS rose {rise / 2**20:.0f} MiB"


def _fast_path(name: str, length: int, mask: bool, is_causal: bool):
    """The Flax layer's jitted fast path on ``(1, length, 16)`` with one head."""
    layer = getattr(aj, name)(16, num_heads=1, **CONFIGS[name])
    x = jax.ShapeDtypeStruct((1, length, 16), jnp.float32)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    keep = jax.ShapeDtypeStruct((1, 1, 1, length), jnp.bool_) if mask else None

    def run(params, x, keep):
        return layer.apply(params, x, keep, is_causal=is_causal, need_weights=False)[0]

    return jax.jit(run), (params, x, keep)


def _largest_value(jaxpr) -> int:
    """Elements of the largest value any equation of ``jaxpr`` (or its sub-jaxprs) makes."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(var.aval.shape, dtype=np.int64)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    largest = max(largest, _largest_value(sub.jaxpr))
                elif isinstance(sub, jax_core.Jaxpr):
                    largest = max(largest, _largest_value(sub))
    return largest


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("mask", "is_causal"), [(False, False), (True, True)])
def test_jax_fast_path_has_no_square_value(name, mask, is_causal):
    fn, args = _fast_path(name, LENGTH, mask, is_causal)
    largest = _largest_value(jax.make_jaxpr(fn)(*args).jaxpr)
    assert largest < LENGTH * LENGTH // 10, f"{name}: a value of {largest} elements"


def _temp_bytes(name: str, length: int) -> int:
    fn, args = _fast_path(name, length, mask=True, is_causal=True)
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jax_compiled_memory(name):
    """XLA's scratch memory: far below L·L·4 bytes; linear in L for local and block."""
    temp = _temp_bytes(name, LENGTH)
    assert temp < SQUARE_BYTES / 32, f"{name}: {temp / 2**20:.0f} MiB of scratch"
    if name != "DilatedSelfAttention":
        assert temp <= 2.2 * _temp_bytes(name, LENGTH // 2)

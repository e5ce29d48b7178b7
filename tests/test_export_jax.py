"""``jax.export`` with a symbolic sequence length (SPEC §8), every softmax mechanism.

Each layer is exported once with ``x`` of shape ``(B, L, E)``, L symbolic, and the
exported program is called at lengths it was not traced at (smaller than a chunk, not a
multiple of the window, block or rate, and over several symbolic-plan steps): it gives the
jitted layer's numbers. ``SYMBOLIC_CHUNK`` is made small so that the dense fast path
takes several steps at these lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attentions_jax as aj
from attentions_jax import functional as jf

B, E = 2, 8
LENGTHS = (7, 40)
"""Below and above one local tile (32 queries) and several symbolic steps of 8 queries."""

MECHANISMS = {
    "vanilla": (aj.VanillaSelfAttention, {}),
    "multi_head": (aj.MultiHeadSelfAttention, {"num_heads": 2}),
    "grouped": (aj.GroupedSelfAttention, {"num_query_heads": 4, "num_kv_heads": 2}),
    "local": (aj.LocalSelfAttention, {"window_size": 5, "num_heads": 2}),
    "dilated": (aj.DilatedSelfAttention, {"dilation_rate": 3, "num_heads": 2}),
    "block": (aj.BlockSelfAttention, {"block_size": 4, "num_heads": 2}),
    "alibi": (aj.ALiBiSelfAttention, {"num_heads": 2}),
    "rotary": (aj.RotarySelfAttention, {"num_heads": 2}),
    "linear": (aj.LinearSelfAttention, {"num_heads": 2}),
}


@pytest.fixture(autouse=True)
def _small_symbolic_chunk(monkeypatch):
    monkeypatch.setattr(jf, "SYMBOLIC_CHUNK", 8)


def _export_and_compare(
    name: str, is_causal: bool, need_weights: bool, dtype, lengths, tolerance: float
) -> None:
    cls, kwargs = MECHANISMS[name]
    layer = cls(E, **kwargs)
    variables = layer.init(jax.random.key(0), jnp.ones((B, 3, E), dtype))

    def forward(x):
        out, weights = layer.apply(variables, x, is_causal=is_causal, need_weights=need_weights)
        return (out, weights) if need_weights else out

    (length,) = jax.export.symbolic_shape("L")
    exported = jax.export.export(jax.jit(forward))(jax.ShapeDtypeStruct((B, length, E), dtype))
    assert not isinstance(exported.in_avals[0].shape[1], int)
    rng = np.random.default_rng(0)
    for size in lengths:
        x = jnp.asarray(rng.standard_normal((B, size, E)), dtype)
        got, want = exported.call(x), jax.jit(forward)(x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tolerance, rtol=0)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("name", list(MECHANISMS))
def test_fast_path_exports_with_a_symbolic_length(name, is_causal):
    _export_and_compare(name, is_causal, False, jnp.float64, LENGTHS, 1e-10)


@pytest.mark.parametrize(
    ("name", "is_causal"),
    [("multi_head", True), ("local", False), ("dilated", True), ("block", True)],
)
def test_weights_path_exports_with_a_symbolic_length(name, is_causal):
    """The ``(B, H, L, L)`` weights come out of the exported program as well."""
    _export_and_compare(name, is_causal, True, jnp.float64, LENGTHS[:1], 1e-10)


def test_rotary_exports_in_float32():
    """64-bit mode off: the exported RoPE composes its angles in float32 (``rope.py``)."""
    with jax.enable_x64(False):
        _export_and_compare("rotary", True, False, jnp.float32, (300,), 1e-5)

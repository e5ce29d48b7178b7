"""Property tests: random configurations and inputs, parity and fast path == weights path.

Every example draws a configuration of one mechanism (heads, kv heads, window, block,
rate, feature map, RoPE layout, bias, temperature), a batch, a length (1, primes, and
lengths that are not multiples of the window/block/rate), and a mask, then checks in
float64 that PyTorch and Flax agree (outputs, weights, all gradients) and that the fast
path equals the weights path in both frameworks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attentions_jax as aj
import attentions_torch as at
from parity import compare_layers, torch_to_flax

EXAMPLES_PER_MECHANISM = 25
LENGTHS = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13, 16, 17])


@st.composite
def _heads(draw, rope: bool) -> tuple[int, int]:
    heads = draw(st.integers(1, 3))
    d_head = draw(st.sampled_from([2, 4] if rope else [1, 2, 3, 4]))
    return heads, heads * d_head


@st.composite
def _config(draw, name: str) -> dict:
    rope = draw(st.booleans())
    options = {
        "rope": rope,
        "rope_interleaved": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "temperature": draw(st.sampled_from([1.0, 0.5, 2.0])),
    }
    heads, d_model = draw(_heads(rope))
    if name == "VanillaSelfAttention":
        return {"d_model": d_model, **options}
    if name == "MultiHeadSelfAttention":
        return {"d_model": d_model, "num_heads": heads, **options}
    if name == "GroupedSelfAttention":
        kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        d_head = draw(st.sampled_from([2, 4]))
        return {
            "d_model": kv_heads * group * d_head,
            "num_query_heads": kv_heads * group,
            "num_kv_heads": kv_heads,
            **options,
        }
    if name == "ALiBiSelfAttention":
        heads = draw(st.integers(1, 6))
        return {"d_model": heads * 2, "num_heads": heads, **options}
    if name == "RotarySelfAttention":
        options.pop("rope")
        return {
            "d_model": heads * 2 * draw(st.integers(1, 2)),
            "num_heads": heads,
            "rope_base": draw(st.sampled_from([10000.0, 500.0])),
            **options,
        }
    if name == "LocalSelfAttention":
        return {
            "d_model": d_model,
            "window_size": draw(st.integers(1, 9)),
            "num_heads": heads,
            **options,
        }
    if name == "DilatedSelfAttention":
        return {
            "d_model": d_model,
            "dilation_rate": draw(st.integers(1, 5)),
            "num_heads": heads,
            **options,
        }
    if name == "BlockSelfAttention":
        return {
            "d_model": d_model,
            "block_size": draw(st.integers(1, 7)),
            "num_heads": heads,
            **options,
        }
    if name == "LinearSelfAttention":
        options.pop("temperature")
        return {
            "d_model": d_model,
            "num_heads": heads,
            "feature_map": draw(st.sampled_from(["elu", "relu"])),
            **options,
        }
    raise AssertionError(name)


NAMES = [
    "VanillaSelfAttention",
    "MultiHeadSelfAttention",
    "GroupedSelfAttention",
    "ALiBiSelfAttention",
    "RotarySelfAttention",
    "LocalSelfAttention",
    "DilatedSelfAttention",
    "BlockSelfAttention",
    "LinearSelfAttention",
]
PRESENT = [n for n in NAMES if hasattr(at, n) and hasattr(aj, n)]


def _mask(draw, batch: int, length: int):
    kind = draw(st.sampled_from(["none", "causal", "padding", "random"]))
    if kind == "padding":
        lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
        return (np.arange(length)[None] < np.array(lengths)[:, None])[:, None, None, :], False
    if kind == "random":
        seed = draw(st.integers(0, 2**16))
        return np.random.default_rng(seed).random((batch, length, length)) > 0.5, False
    return None, kind == "causal"


@pytest.mark.parametrize("name", PRESENT)
@settings(
    max_examples=EXAMPLES_PER_MECHANISM,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_configurations(name, data):
    config = data.draw(_config(name), label="config")
    batch, length = data.draw(st.integers(1, 2), label="B"), data.draw(LENGTHS, label="L")
    mask, is_causal = _mask(data.draw, batch, length)
    x = np.random.default_rng(length).standard_normal((batch, length, config["d_model"]))
    torch.manual_seed(0)
    torch_layer = getattr(at, name)(**config).double()
    flax_layer = getattr(aj, name)(**config)

    # jit: one compilation per example beats eager dispatch compiling each op for new shapes
    report = compare_layers(
        torch_layer, flax_layer, x, mask, is_causal=is_causal, dtype="float64", jit=True
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]

    t_mask = None if mask is None else torch.tensor(mask)
    with torch.no_grad():
        slow, _ = torch_layer(torch.tensor(x), t_mask, is_causal=is_causal)
        fast, _ = torch_layer(torch.tensor(x), t_mask, is_causal=is_causal, need_weights=False)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-10, rtol=0)
    variables = {"params": torch_to_flax(torch_layer)}
    j_mask = None if mask is None else jnp.asarray(mask)
    apply = jax.jit(flax_layer.apply, static_argnames=("is_causal", "need_weights"))
    slow, _ = apply(variables, jnp.asarray(x), j_mask, is_causal=is_causal)
    fast, _ = apply(variables, jnp.asarray(x), j_mask, is_causal=is_causal, need_weights=False)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=1e-10, rtol=0)

"""JAX's default mode (64-bit off), as JAX users run it.

The usual run turns on JAX's 64-bit mode for the float64 references (``conftest.py``).
``test_default_precision_run`` starts a second pytest process with
``ATTENTIONS_TEST_X64=0`` over this module and ``test_parity.py``: there, 64-bit mode is
never turned on, ``test_parity.py`` runs its float32 and bfloat16 matrix (eager and under
``jax.jit``), and the tests below check what only that mode can show: the dtypes that
come out, integer masks, RoPE angles at long lengths, the recurrent step's position
counter, and ``python -m parity`` leaving the mode as it found it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at
from parity import MECHANISMS, torch_to_flax
from parity.__main__ import run as parity_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRECISION = not jax.config.jax_enable_x64
only_default = pytest.mark.skipif(
    not DEFAULT_PRECISION, reason="runs in the default-precision run (ATTENTIONS_TEST_X64=0)"
)
B, L = 2, 13


@pytest.mark.slow
@pytest.mark.skipif(DEFAULT_PRECISION, reason="this is the default-precision run")
def test_default_precision_run():
    env = {**os.environ, "ATTENTIONS_TEST_X64": "0"}
    env.pop("JAX_ENABLE_X64", None)
    files = ["tests/test_default_precision.py", "tests/test_parity.py"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@only_default
def test_jax_runs_in_its_default_mode():
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float32
    assert jnp.arange(3).dtype == jnp.int32


def _flax(mechanism, x: np.ndarray, **options):
    torch.manual_seed(0)
    torch_layer = mechanism.torch_layer(**options)
    return torch_layer, mechanism.flax_layer(**options), {"params": torch_to_flax(torch_layer)}


@only_default
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_outputs_keep_the_input_dtype_under_jit(mechanism, dtype):
    """Nothing widens to float64 or narrows: out and weights come back in the input dtype."""
    x = np.random.default_rng(0).standard_normal((B, L, mechanism.kwargs["d_model"]))
    _, layer, variables = _flax(mechanism, x)
    variables = jax.tree.map(lambda p: p.astype(dtype), variables)
    apply = jax.jit(layer.apply, static_argnames=("is_causal", "need_weights"))
    for is_causal in (False, True):
        for need_weights in (True, False):
            out, weights = apply(
                variables, jnp.asarray(x, dtype), is_causal=is_causal, need_weights=need_weights
            )
            assert out.dtype == dtype
            assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
            assert (weights is None) != need_weights
            if weights is not None:
                assert weights.dtype == dtype


@only_default
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_integer_masks_mean_what_boolean_masks_mean(mechanism):
    """0/1 masks of every integer width (int64 is narrowed to int32 in this mode)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, L, mechanism.kwargs["d_model"])), jnp.float32)
    keep = rng.random((B, L, L)) > 0.4
    keep[1, 3] = False
    _, layer, variables = _flax(mechanism, np.asarray(x))
    apply = jax.jit(layer.apply, static_argnames=("is_causal", "need_weights"))
    for need_weights in (True, False):
        want, want_w = apply(variables, x, jnp.asarray(keep), need_weights=need_weights)
        for dtype in (np.int8, np.uint8, np.int32, np.int64, np.float32):
            got, got_w = apply(variables, x, keep.astype(dtype), need_weights=need_weights)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            if need_weights:
                np.testing.assert_array_equal(np.asarray(got_w), np.asarray(want_w))
    lengths = jnp.asarray([L, 6], jnp.int32)
    padded, _ = apply(variables, x, aj.padding_mask(lengths, L), need_weights=False)
    by_hand = (np.arange(L)[None] < np.array([L, 6])[:, None])[:, None, None, :]
    want, _ = apply(variables, x, jnp.asarray(by_hand), need_weights=False)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(want))


@only_default
@pytest.mark.parametrize(
    ("class_name", "kwargs"),
    [
        ("RotarySelfAttention", {"d_model": 32, "num_heads": 4}),
        (
            "GroupedSelfAttention",
            {"d_model": 32, "num_query_heads": 4, "num_kv_heads": 2, "rope": True},
        ),
    ],
    ids=["rotary", "grouped"],
)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_angles_at_long_lengths(class_name, kwargs, interleaved):
    """Positions up to 2047, where an angle computed in float32 arithmetic is ~1e-4 rad off
    (past the float32 allowance): PyTorch and jitted JAX still agree, both paths.

    Forward only: at this length the weight gradients are sums of 2048 float32 terms, a
    test of accumulation order rather than of the angles (``test_parity.py`` has them)."""
    kwargs = {**kwargs, "rope_interleaved": interleaved}
    x = np.random.default_rng(2).standard_normal((1, 2048, 32)).astype(np.float32)
    torch.manual_seed(0)
    torch_layer = getattr(at, class_name)(**kwargs)
    layer = getattr(aj, class_name)(**kwargs)
    variables = {"params": torch_to_flax(torch_layer)}
    apply = jax.jit(layer.apply, static_argnames=("is_causal", "need_weights"))
    for need_weights in (True, False):
        with torch.no_grad():
            want, want_w = torch_layer(torch.from_numpy(x), need_weights=need_weights)
        got, got_w = apply(variables, jnp.asarray(x), need_weights=need_weights)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=1e-5)
        if need_weights:
            np.testing.assert_allclose(np.asarray(got_w), want_w.numpy(), atol=1e-5, rtol=1e-5)


@only_default
def test_recurrent_decode_counts_positions_in_this_mode():
    """The decoding call's int32 lengths and its float32 RoPE angle, against PyTorch's."""
    torch.manual_seed(0)
    torch_layer = at.LinearSelfAttention(32, 4, rope=True)
    layer = aj.LinearSelfAttention(32, 4, rope=True)
    variables = {"params": torch_to_flax(torch_layer)}
    x = np.random.default_rng(3).standard_normal((2, 40, 32)).astype(np.float32)
    cache = layer.apply(variables, 2, method="init_cache")
    assert cache.lengths.dtype == jnp.int32
    step = jax.jit(lambda cache, x_t: layer.apply(variables, cache, x_t, method="decode"))
    t_cache = torch_layer.init_cache(2)
    with torch.no_grad():
        for t in range(x.shape[1]):
            cache, y = step(cache, jnp.asarray(x[:, t : t + 1]))
            t_cache, t_y = torch_layer.decode(t_cache, torch.from_numpy(x[:, t : t + 1]))
            np.testing.assert_allclose(np.asarray(y), t_y.numpy(), atol=1e-5, rtol=1e-5)
    assert np.asarray(cache.lengths).tolist() == [x.shape[1]] * 2


@only_default
def test_parity_report_rows_leave_the_mode_alone():
    """``python -m parity``: float32 rows in this mode, float64 rows in a scoped 64-bit mode."""
    rows = parity_report(["multi_head"], ["float32", "float64"], progress=False)
    # none, causal, padding, and the two cross-attention rows
    assert [row["dtype"] for row in rows] == ["float32"] * 5 + ["float64"] * 5
    assert all(row["passed"] for row in rows), rows
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float32

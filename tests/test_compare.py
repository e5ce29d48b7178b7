"""``parity.compare_layers``: one-sided parameters fail the report, x64 stays scoped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as fnn
import jax.numpy as jnp
import numpy as np
import pytest
from torch import nn

from parity import Comparison, ConversionError, compare_layers

ROOT = Path(__file__).resolve().parents[1]


class TorchProj(nn.Module):
    """``out = w_q(x)``; with ``extra``, a Linear the forward never uses."""

    def __init__(self, extra: bool = False, width: int = 4):
        super().__init__()
        self.w_q = nn.Linear(4, width)
        if extra:
            self.extra = nn.Linear(4, 4)

    def forward(self, x, mask=None, is_causal=False, need_weights=True):
        return self.w_q(x), None


class FlaxProj(fnn.Module):
    """The twin of ``TorchProj``; with ``extra``, a Dense whose output is unused."""

    extra: bool = False
    width: int = 4

    @fnn.compact
    def __call__(self, x, mask=None, is_causal=False, need_weights=True):
        if self.extra:
            fnn.Dense(4, name="extra")(x)
        return fnn.Dense(self.width, name="w_q")(x), None


X = np.random.default_rng(0).standard_normal((2, 3, 4))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_matching_pair_passes(dtype):
    report = compare_layers(TorchProj(), FlaxProj(), X, dtype=dtype)
    assert report.passed, report.comparisons
    assert report.missing == []
    assert {c.name for c in report.comparisons} == {
        "output",
        "grad x",
        "grad w_q.weight",
        "grad w_q.bias",
    }


def test_parameter_of_the_torch_layer_only_fails_and_is_named():
    report = compare_layers(TorchProj(extra=True), FlaxProj(), X)
    assert not report.passed
    assert [(c.name, c.missing) for c in report.missing] == [
        ("grad extra.weight (PyTorch only)", "PyTorch only"),
        ("grad extra.bias (PyTorch only)", "PyTorch only"),
    ]
    assert all(c.ratio == float("inf") and not c.passed for c in report.missing)
    assert report.get("output").passed  # the rest is still compared
    assert report.get("grad w_q.weight").passed


def test_parameter_of_the_flax_layer_only_fails_and_is_named():
    report = compare_layers(TorchProj(), FlaxProj(extra=True), X)
    assert not report.passed
    assert {(c.name, c.missing) for c in report.missing} == {
        ("grad extra.weight (Flax only)", "Flax only"),
        ("grad extra.bias (Flax only)", "Flax only"),
    }
    assert report.get("output").passed
    assert report.worst("grad").ratio == float("inf")


def test_outputs_of_one_side_only_fail():
    class WithWeights(FlaxProj):
        @fnn.compact
        def __call__(self, x, mask=None, is_causal=False, need_weights=True):
            out = fnn.Dense(4, name="w_q")(x)
            return out, jnp.ones((x.shape[0], x.shape[1], x.shape[1]))

    report = compare_layers(TorchProj(), WithWeights(), X)
    assert [c.name for c in report.missing] == ["weights (Flax only)"]
    assert not report.passed


def test_misshaped_parameters_raise_naming_them():
    with pytest.raises(ConversionError, match=r"w_q/kernel: Flax layer \(4, 3\), PyTorch layer"):
        compare_layers(TorchProj(width=4), FlaxProj(width=3), X)


def test_comparison_missing_field_defaults_to_none():
    assert Comparison("output", 0.0, 0.5).passed
    assert not Comparison("grad w.weight (Flax only)", 0.0, 0.0, "Flax only").passed


_X64_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, torch
    import attentions_jax as aj, attentions_torch as at
    from parity import compare_layers

    def layers():
        torch.manual_seed(0)
        kwargs = {"d_model": 8, "num_heads": 2, "bias": True}
        return at.MultiHeadSelfAttention(**kwargs), aj.MultiHeadSelfAttention(**kwargs)

    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    mask = np.tril(np.ones((5, 5), bool))
    assert jax.config.jax_enable_x64 is False
    for dtype in ("float64", "float32", "bfloat16", "float64"):
        for jit in (False, True):
            report = compare_layers(*layers(), x, mask, dtype=dtype, jit=jit)
            assert report.passed, (dtype, jit, [c for c in report.comparisons if not c.passed])
            assert report.get("output").max_abs < (1e-12 if dtype == "float64" else 1.0)
            assert jax.config.jax_enable_x64 is False, dtype
            assert jnp.zeros(1).dtype == jnp.float32, dtype

    jax.config.update("jax_enable_x64", True)  # the user's own choice survives too
    for dtype in ("float64", "float32"):
        assert compare_layers(*layers(), x, dtype=dtype).passed
        assert jax.config.jax_enable_x64 is True
        assert jnp.zeros(1).dtype == jnp.float64
    print("ok")
    """
)


def test_x64_is_scoped_to_a_float64_comparison():
    """In a fresh process (this suite's conftest turns x64 on): off stays off, on stays on,
    and float32 / bfloat16 comparisons pass with x64 off."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _X64_SCRIPT],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")

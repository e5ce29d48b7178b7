"""Compare a PyTorch layer and a Flax layer number by number (SPEC §6).

``compare_layers`` moves the PyTorch layer's weights into the Flax layer, runs both on
the same input in the requested dtype, backpropagates the same scalar loss through both
and reports, for the output, the attention weights, the input gradient and the gradient
of every parameter, the maximum absolute error and its ratio to the SPEC §6 allowance
(PASS iff every ratio is <= 1):

==========  ============================================================
dtype       allowance per element
==========  ============================================================
float64     ``1e-10`` absolute
float32     ``1e-5 + 1e-5 * |reference|``
bfloat16    ``2e-2 * max |float32 reference|`` (the float32 result's scale)
==========  ============================================================

In bfloat16 the parameter gradients share one scale, the largest over all of them: the
gradient an optimizer sees is one vector, and some entries are zero in exact arithmetic
(softmax ignores ``w_k.bias``, which adds ``q·b`` to a whole row of scores), so their own
float32 scale is rounding noise.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from .convert import flax_to_numpy_state, torch_to_flax

__all__ = ["DTYPES", "Comparison", "Report", "compare_layers", "enable_x64"]

DTYPES = ("float64", "float32", "bfloat16")
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
_JAX_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def enable_x64() -> None:
    """Turn on JAX's 64-bit mode (float64 parity needs it; a process-wide setting)."""
    jax.config.update("jax_enable_x64", True)


@dataclass(frozen=True)
class Comparison:
    """One compared quantity: ``name`` ("output", "weights", "grad x", "grad w_q.weight")."""

    name: str
    max_abs: float
    ratio: float

    @property
    def passed(self) -> bool:
        return bool(self.ratio <= 1.0)


@dataclass
class Report:
    """All comparisons of one run; ``passed`` iff every ratio is <= 1."""

    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def get(self, name: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.name == name), None)

    def worst(self, prefix: str) -> Comparison | None:
        """The comparison with the largest ratio among names starting with ``prefix``."""
        found = [c for c in self.comparisons if c.name.startswith(prefix)]
        return max(found, key=lambda c: c.ratio) if found else None


def _compare(name: str, a: np.ndarray, b: np.ndarray, dtype: str, scale: float) -> Comparison:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, PyTorch {a.shape} vs Flax {b.shape}")
    err = np.abs(a - b)
    max_abs = float(err.max(initial=0.0))
    if dtype == "float64":
        ratio = max_abs / 1e-10
    elif dtype == "float32":
        ratio = float((err / (1e-5 + 1e-5 * np.abs(a))).max(initial=0.0))
    else:
        ratio = max_abs / (2e-2 * max(scale, np.finfo(np.float32).tiny))
    return Comparison(name, max_abs, ratio)


def _cotangent(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _run_torch(
    layer: nn.Module,
    x: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    call: Mapping,
    compile: bool = False,
) -> dict[str, np.ndarray]:
    """Forward + backward of ``sum(out * g) + sum(weights * g')`` in ``dtype``."""
    tdtype = _TORCH_DTYPES[dtype]
    layer = copy.deepcopy(layer).to(tdtype).eval()
    xt = torch.tensor(x, dtype=tdtype, requires_grad=True)
    mt = None if mask is None else torch.tensor(mask)
    out, weights = (torch.compile(layer) if compile else layer)(xt, mt, **call)
    acc = torch.promote_types(tdtype, torch.float32)
    loss = (out.to(acc) * torch.tensor(_cotangent(out.shape, 1), dtype=acc)).sum()
    if weights is not None:
        loss = (
            loss + (weights.to(acc) * torch.tensor(_cotangent(weights.shape, 2), dtype=acc)).sum()
        )
    loss.backward()
    result = {"output": out, "grad x": xt.grad}
    if weights is not None:
        result["weights"] = weights
    result.update({f"grad {n}": p.grad for n, p in layer.named_parameters()})
    return {k: v.detach().to(torch.float64).numpy() for k, v in result.items()}


def _run_flax(
    layer: fnn.Module,
    params: Mapping[str, Any],
    x: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    call: Mapping,
    jit: bool,
) -> dict[str, np.ndarray]:
    jdtype = _JAX_DTYPES[dtype]
    acc = jnp.promote_types(jdtype, jnp.float32)
    xj = jnp.asarray(x, dtype=jdtype)
    mj = None if mask is None else jnp.asarray(mask)

    def loss_fn(params, xj):
        out, weights = layer.apply({"params": params}, xj, mj, **call)
        loss = (out.astype(acc) * jnp.asarray(_cotangent(out.shape, 1), acc)).sum()
        if weights is not None:
            loss = (
                loss + (weights.astype(acc) * jnp.asarray(_cotangent(weights.shape, 2), acc)).sum()
            )
        return loss, (out, weights)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    if jit:
        grad_fn = jax.jit(grad_fn)
    (_, (out, weights)), (grad_params, grad_x) = grad_fn(params, xj)
    result = {"output": out, "grad x": grad_x}
    if weights is not None:
        result["weights"] = weights
    result.update({f"grad {n}": g for n, g in flax_to_numpy_state(grad_params).items()})
    return {
        k: np.asarray(
            jnp.asarray(v, jnp.float64 if dtype == "float64" else jnp.float32), np.float64
        )
        for k, v in result.items()
    }


def compare_layers(
    torch_layer: nn.Module,
    flax_layer: fnn.Module,
    x: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    is_causal: bool = False,
    need_weights: bool = True,
    dtype: str = "float32",
    jit: bool = False,
    compile: bool = False,
) -> Report:
    """Run both layers with the PyTorch layer's weights and compare everything.

    Args:
      torch_layer: the reference; its weights are copied into the Flax layer.
      flax_layer: the Flax twin (an unbound module with the same configuration).
      x: ``(B, L, input_dim)`` input, any float dtype (cast to ``dtype`` on both sides).
      mask: optional keep-mask (NumPy), passed to both layers.
      is_causal, need_weights: forwarded to both layers.
      dtype: ``"float64"``, ``"float32"`` or ``"bfloat16"``; float64 turns on JAX's
        64-bit mode.
      jit: run the Flax side under ``jax.jit``.
      compile: run the PyTorch side under ``torch.compile``.

    Returns:
      A ``Report`` of output, weights, input-gradient and parameter-gradient errors.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "float64":
        enable_x64()
    x = np.asarray(x, np.float64)
    call = {"is_causal": is_causal, "need_weights": need_weights}
    ours = copy.deepcopy(torch_layer).to(_TORCH_DTYPES[dtype])
    params = torch_to_flax(ours)
    reference = _run_torch(torch_layer, x, mask, dtype, call, compile)
    theirs = _run_flax(flax_layer, params, x, mask, dtype, call, jit)
    scales = {}
    if dtype == "bfloat16":
        scales = {
            k: float(np.abs(v).max(initial=0.0))
            for k, v in _run_torch(torch_layer, x, mask, "float32", call).items()
        }
        grad_scale = max((v for k, v in scales.items() if k.startswith("grad w")), default=0.0)
        scales.update({k: grad_scale for k in scales if k.startswith("grad w")})
    report = Report(dtype)
    for name, ref in reference.items():
        report.comparisons.append(_compare(name, ref, theirs[name], dtype, scales.get(name, 0.0)))
    return report

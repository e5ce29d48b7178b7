"""Compare a PyTorch layer and a Flax layer number by number (docs/semantics.md, "Tolerances").

``compare_layers`` moves the PyTorch layer's weights into the Flax layer, runs both on
the same input in the requested dtype, backpropagates the same scalar loss through both
and reports, for the output, the attention weights, the input gradient and the gradient
of every parameter, the maximum absolute error and its ratio to its allowance
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

Both sides must have the same quantities. The converted weights are checked against the
Flax layer's own parameters (the shapes its ``init`` would give, read with
``jax.eval_shape``): a parameter of one layer only does not stop the run (one the Flax
layer lacks is left out of its params; one the PyTorch layer lacks is taken from the Flax
layer's ``init`` so it still runs), but it fails the report with a ``Comparison`` named
e.g. ``"grad w_x.weight (Flax only)"``, with ``ratio = inf`` and ``missing = "Flax only"``;
so does an output, attention weights or gradient that one side returns and the other does
not. Mis-shaped parameters (different configurations) raise a ``ConversionError``.

``dtype="float64"`` runs under ``jax.enable_x64(True)`` for the duration of the call
only: JAX's 64-bit flag is the caller's again afterwards, on or off. float32 and
bfloat16 leave it alone and work either way.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

from . import devices
from .convert import (
    ConversionError,
    _flatten,
    _linen_path,
    _unflatten,
    flax_to_numpy_state,
    nnx_params,
    torch_to_flax,
)

__all__ = ["DTYPES", "Comparison", "Report", "compare_layers", "enable_x64"]

DTYPES = ("float64", "float32", "bfloat16")
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
_JAX_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def enable_x64() -> None:
    """Turn on JAX's 64-bit mode for the rest of the process (all threads, all code).

    ``compare_layers`` does not need it (it scopes 64-bit mode to a float64 comparison);
    call it to convert float64 weights with ``torch_to_flax`` or to run float64 Flax code
    yourself, or use ``with jax.enable_x64(True):`` to keep the change local.
    """
    jax.config.update("jax_enable_x64", True)


@contextlib.contextmanager
def _x64_scope() -> Iterator[None]:
    """JAX's 64-bit mode on inside the block, the caller's setting restored after it."""
    scoped = getattr(jax, "enable_x64", None)  # a thread-local context manager (newer JAX)
    if scoped is not None:
        with scoped(True):
            yield
        return
    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


@dataclass(frozen=True)
class Comparison:
    """One compared quantity: ``name`` ("output", "weights", "grad x", "grad w_q.weight").

    ``missing`` is ``None`` when both sides have the quantity, else ``"PyTorch only"`` or
    ``"Flax only"``: then the name ends in ``" (PyTorch only)"`` / ``" (Flax only)"``,
    ``max_abs`` and ``ratio`` are ``inf`` and the comparison fails.
    """

    name: str
    max_abs: float
    ratio: float
    missing: str | None = None

    @property
    def passed(self) -> bool:
        return self.missing is None and bool(self.ratio <= 1.0)


@dataclass
class Report:
    """All comparisons of one run; ``passed`` iff every ratio is <= 1."""

    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def missing(self) -> list[Comparison]:
        """The quantities that only one side has (each fails the report)."""
        return [c for c in self.comparisons if c.missing is not None]

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
    device: str = "cpu",
    context: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Forward + backward of ``sum(out * g) + sum(weights * g')`` in ``dtype`` on ``device``."""
    tdtype, where = _TORCH_DTYPES[dtype], devices.torch_device(device)
    layer = copy.deepcopy(layer).to(device=where, dtype=tdtype).eval()
    xt = torch.tensor(x, dtype=tdtype, device=where, requires_grad=True)
    mt = None if mask is None else torch.tensor(mask, device=where)
    ct = None
    if context is not None:
        ct = torch.tensor(context, dtype=tdtype, device=where, requires_grad=True)
        call = {**call, "context": ct}
    out, weights = (torch.compile(layer) if compile else layer)(xt, mt, **call)
    acc = torch.promote_types(tdtype, torch.float32)

    def cotangent(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return torch.tensor(_cotangent(shape, seed), dtype=acc, device=where)

    loss = (out.to(acc) * cotangent(out.shape, 1)).sum()
    if weights is not None:
        loss = loss + (weights.to(acc) * cotangent(weights.shape, 2)).sum()
    loss.backward()
    result = {"output": out, "grad x": xt.grad}
    if ct is not None:
        result["grad context"] = ct.grad
    if weights is not None:
        result["weights"] = weights
    result.update(  # a parameter the loss does not reach has a zero gradient
        {
            f"grad {n}": torch.zeros_like(p) if p.grad is None else p.grad
            for n, p in layer.named_parameters()
        }
    )
    return {k: v.detach().to(torch.float64).cpu().numpy() for k, v in result.items()}


def _run_flax(
    layer: fnn.Module | nnx.Module,
    params: Mapping[str, Any],
    x: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    call: Mapping,
    jit: bool,
    context: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    jdtype = _JAX_DTYPES[dtype]
    acc = jnp.promote_types(jdtype, jnp.float32)
    xj = jnp.asarray(x, dtype=jdtype)
    mj = None if mask is None else jnp.asarray(mask)
    cj = None if context is None else jnp.asarray(context, dtype=jdtype)

    apply, params = _applier(layer, params)

    def loss_fn(params, xj, cj):
        extra = {} if cj is None else {"context": cj}
        out, weights = apply(params, xj, mj, **call, **extra)
        loss = (out.astype(acc) * jnp.asarray(_cotangent(out.shape, 1), acc)).sum()
        if weights is not None:
            loss = (
                loss + (weights.astype(acc) * jnp.asarray(_cotangent(weights.shape, 2), acc)).sum()
            )
        return loss, (out, weights)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
    if jit:
        grad_fn = jax.jit(grad_fn)
    (_, (out, weights)), (grad_params, grad_x, grad_context) = grad_fn(params, xj, cj)
    result = {"output": out, "grad x": grad_x}
    if cj is not None:
        result["grad context"] = grad_context
    if weights is not None:
        result["weights"] = weights
    if isinstance(layer, nnx.Module):
        grad_params = _linen_params(grad_params)
    result.update({f"grad {n}": g for n, g in flax_to_numpy_state(grad_params).items()})
    return {
        k: np.asarray(
            jnp.asarray(v, jnp.float64 if dtype == "float64" else jnp.float32), np.float64
        )
        for k, v in result.items()
    }


def _linen_params(state: nnx.State) -> dict[str, Any]:
    """An ``nnx.Param`` state (or its gradient) as linen-style params."""
    flat = _flatten(nnx.to_pure_dict(state))
    return _unflatten({_linen_path(path): value for path, value in flat.items()})


def _applier(layer: fnn.Module | nnx.Module, params: Mapping[str, Any]):
    """``(apply(params, x, mask, **call), params)`` for a linen or an NNX layer.

    NNX: ``params`` (linen-style) are loaded into a copy of the layer, whose ``nnx.Param``
    state becomes the differentiated argument (``nnx.split`` / ``nnx.merge``); the layer
    runs in evaluation mode, as the PyTorch one does.
    """
    if not isinstance(layer, nnx.Module):
        return (lambda p, *args, **kw: layer.apply({"params": p}, *args, **kw)), params
    model = nnx.clone(layer)
    model.eval()
    graph, state, rest = nnx.split(model, nnx.Param, ...)
    paths = {_linen_path(path): path for path in _flatten(nnx.to_pure_dict(state))}
    nnx.replace_by_pure_dict(state, _unflatten({paths[p]: v for p, v in _flatten(params).items()}))

    def apply(state, *args, **kwargs):
        return nnx.merge(graph, state, rest)(*args, **kwargs)

    return apply, state


def _flax_params(
    torch_layer: nn.Module,
    flax_layer: fnn.Module | nnx.Module,
    x: np.ndarray,
    mask: np.ndarray | None,
    dtype: str,
    call: Mapping,
    context: np.ndarray | None = None,
) -> dict[str, Any]:
    """The PyTorch layer's weights as the Flax layer's params, in ``dtype``.

    Checked against the Flax layer's own parameters (``init``'s shapes, traced, not run):
    an entry the Flax layer does not have is dropped, one it has and the PyTorch layer
    lacks comes from ``init`` (those are reported as one-sided by the comparison of the
    gradients); a mis-shaped entry raises a ``ConversionError``.
    """
    jdtype = _JAX_DTYPES[dtype]
    xj = jnp.asarray(x, dtype=jdtype)
    mj = None if mask is None else jnp.asarray(mask)
    if context is not None:
        call = {**call, "context": jnp.asarray(context, dtype=jdtype)}

    def init():
        if isinstance(flax_layer, nnx.Module):  # built with its parameters
            return jax.tree.map(lambda v: v.astype(jdtype), nnx_params(flax_layer))
        return flax_layer.init(jax.random.key(0), xj, mj, **call)["params"]

    converted = _flatten(torch_to_flax(copy.deepcopy(torch_layer).to(_TORCH_DTYPES[dtype])))
    expected = _flatten(jax.eval_shape(init))
    misshaped = sorted(
        f"{'/'.join(k)}: Flax layer {tuple(expected[k].shape)}, PyTorch layer "
        f"{tuple(converted[k].shape)}"
        for k in set(converted) & set(expected)
        if tuple(converted[k].shape) != tuple(expected[k].shape)
    )
    if misshaped:
        raise ConversionError(
            "the layers' parameters have different shapes: " + "; ".join(misshaped)
        )
    params = {k: v for k, v in converted.items() if k in expected}
    if set(expected) - set(converted):
        initial = _flatten(init())
        params.update({k: initial[k].astype(jdtype) for k in expected if k not in converted})
    return _unflatten(params)


def compare_layers(
    torch_layer: nn.Module,
    flax_layer: fnn.Module | nnx.Module,
    x: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    context: np.ndarray | None = None,
    is_causal: bool = False,
    need_weights: bool = True,
    dtype: str = "float32",
    jit: bool = False,
    compile: bool = False,
    device: str = "cpu",
) -> Report:
    """Run both layers with the PyTorch layer's weights and compare everything.

    Args:
      torch_layer: the reference; its weights are copied into the Flax layer.
      flax_layer: the Flax twin with the same configuration: an unbound linen module, or
        an NNX module (``attentions_jax.nnx``; its own parameters are left unchanged).
      x: ``(B, L, input_dim)`` input, any float dtype (cast to ``dtype`` on both sides).
      mask: optional keep-mask (NumPy), passed to both layers.
      context: optional ``(B, S, context_dim)`` keys-and-values input (cross-attention),
        passed to both layers; its gradient is compared as ``"grad context"``.
      is_causal, need_weights: forwarded to both layers.
      dtype: ``"float64"``, ``"float32"`` or ``"bfloat16"``; float64 runs under
        ``jax.enable_x64(True)`` for this call only (JAX's 64-bit flag is restored after
        it); the others work with 64-bit mode on or off.
      jit: run the Flax side under ``jax.jit``.
      compile: run the PyTorch side under ``torch.compile``.
      device: ``"cpu"``, ``"cuda"``/``"gpu"`` (PyTorch on CUDA, JAX on its GPU backend)
        or ``"tpu"`` (JAX on the TPU against PyTorch on the CPU); see ``parity.devices``.
        The results come back to the host to be compared.

    Returns:
      A ``Report`` of output, weights, input-gradient and parameter-gradient errors. A
      quantity (a parameter's gradient, the attention weights) that only one side has
      is a failing ``Comparison`` named ``"<name> (PyTorch only)"`` or
      ``"<name> (Flax only)"`` (see ``Comparison.missing``).

    Raises:
      ConversionError: a parameter both layers have differs in shape, or the PyTorch
        layer has an entry without a conversion rule.
      DeviceUnavailableError: ``device`` is not on this machine for both frameworks.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    placed = devices.require(device, devices.frameworks_on(device))
    torch_device = device if "torch" in placed else "cpu"  # a TPU: PyTorch on the CPU
    x64 = _x64_scope() if dtype == "float64" else contextlib.nullcontext()
    with x64, jax.default_device(placed["jax"]):
        x = np.asarray(x, np.float64)
        call = {"is_causal": is_causal, "need_weights": need_weights}
        context = None if context is None else np.asarray(context, np.float64)
        params = _flax_params(torch_layer, flax_layer, x, mask, dtype, call, context)
        reference = _run_torch(torch_layer, x, mask, dtype, call, compile, torch_device, context)
        theirs = _run_flax(flax_layer, params, x, mask, dtype, call, jit, context)
        scales = {}
        if dtype == "bfloat16":
            scales = {
                k: float(np.abs(v).max(initial=0.0))
                for k, v in _run_torch(
                    torch_layer, x, mask, "float32", call, device=torch_device, context=context
                ).items()
            }
            grad_scale = max((v for k, v in scales.items() if k.startswith("grad w")), default=0.0)
            scales.update({k: grad_scale for k in scales if k.startswith("grad w")})
    report = Report(dtype)
    inf = float("inf")
    for name, ref in reference.items():
        if name in theirs:
            comparison = _compare(name, ref, theirs[name], dtype, scales.get(name, 0.0))
        else:
            comparison = Comparison(f"{name} (PyTorch only)", inf, inf, "PyTorch only")
        report.comparisons.append(comparison)
    for name in theirs:
        if name not in reference:
            report.comparisons.append(Comparison(f"{name} (Flax only)", inf, inf, "Flax only"))
    return report

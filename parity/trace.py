"""Trace a whole model against its Flax port, module by module (docs/semantics.md, "Tolerances").

``trace(torch_model, flax_model, variables, *inputs, dtype=...)`` runs a PyTorch model and
its Flax twin (linen or NNX) on the same inputs with the same weights, captures the output
of every submodule on both sides, and compares them in the order PyTorch ran them: per
module the maximum absolute error, the relative error, the error in ULPs of the dtype
and PASS/FAIL against the tolerances of ``compare_layers``. The first failing module is
where the port diverges. With ``grads=True`` it also backpropagates a fixed random
cotangent of the final output through both models and compares every parameter's
gradient the same way.

Weights move by the rules of ``parity.convert`` (``Linear.weight`` -> ``kernel`` transposed,
``LayerNorm.weight`` -> ``scale``, ``Embedding.weight`` -> ``embedding``, every ``bias``;
our attention layers are made of ``Linear`` projections, so they follow them too), chosen
by the type of the submodule that owns each entry; ``rules=`` adds rules for other types
(``{"LlamaRMSNorm": {"weight": "scale"}}``; ``parity.convert``), and a tied parameter
converts once. Module paths map by the convert rule
(``blocks.0.attn`` <-> linen ``blocks_0/attn`` <-> NNX ``blocks/0/attn``), after an optional
``mapping`` renames modules whose names differ: ``{"layers": "blocks", "norm": "ln_f"}``
(a PyTorch path prefix, dotted, to a Flax path, ``/``-separated; the longest matching
prefix wins and the rest of the path follows, so ``layers.3.mlp`` becomes
``blocks_3/mlp``). The same mapping aligns the module outputs and the parameters. A
parameter that has no counterpart, or the wrong shape, is a ``ConversionError`` (a
``ValueError``) that lists every such parameter on both sides.

How the outputs are captured:

* PyTorch: a forward hook on every module of ``named_modules()`` (removed afterwards); a
  hook fires when its module returns, so a module comes after its submodules.
* linen: ``apply(..., capture_intermediates=True, mutable=["intermediates"])``, which sows
  every module's ``__call__`` output into the ``intermediates`` collection at its path.
* NNX: ``nnx.capture(..., method_outputs=...)`` instruments only the methods a class
  defines itself (an ``attentions_jax.nnx`` layer inherits its ``__call__``, so it would be
  missed) and every public method besides, so ``trace`` wraps ``__call__`` of the model's
  module classes instead, for the duration of the run only (restored afterwards, even on
  error): do not call other instances of those classes from another thread meanwhile.

The Flax side runs as one ``jax.jit`` program (``jit=False``: op by op). Only calls of
``forward`` / ``__call__`` are captured, not other methods, and layers run under
``nn.scan`` / ``nnx.scan`` are not traced one by one. A module called
several times gives one row per call (``#0``, ``#1``, ...), a tuple, list or dict output one
row per element (``[0]``, ``[1]``; our layers return ``(out, weights)``), aligned by
position; ``None`` elements are skipped. A module on one side only (an ``nn.GELU`` module
that the port writes as a function) is listed as unmatched and does not fail the trace:
its effect is in the next module both sides have. Likewise a difference in a module's own
code between its submodules (a residual add, an activation written as a function) first
shows in the next submodule that runs after it, or in the module itself when it returns.

Columns, per output element (PyTorch is the reference ``a``, Flax ``b``):

==========  ============================================================================
max abs     ``max |a - b|``
max rel     ``max |a - b| / max |a|``: the error relative to the tensor's scale (an
            element-wise ratio explodes wherever the reference crosses zero)
ULPs        ``max |a - b|`` in units in the last place of the dtype at ``max |a|``
err/tol     the error over its allowance, worst element (``compare_layers``' ratio):
            ``1e-10`` (float64), ``1e-5 + 1e-5 * |a|`` (float32), ``2e-2 * max |a|`` of
            the float32 run (bfloat16; the gradients share the largest such scale)
result      PASS iff ``err/tol <= 1``
==========  ============================================================================

``dtype="float64"`` runs under ``jax.enable_x64(True)`` for the call only, as
``compare_layers`` does. Dropout is off: the PyTorch model runs in ``eval()`` mode and the
NNX model in ``eval()`` mode (a copy: neither model is changed); a linen model's own
switch (``deterministic=True``) goes in ``flax_kwargs``.

Differences a trace typically finds in a port: Flax's ``LayerNorm`` epsilon is ``1e-6``,
PyTorch's ``1e-5``; ``flax.linen.gelu`` / ``nnx.gelu`` default to the tanh approximation,
``torch.nn.GELU`` to the exact form; ``nnx.Embed`` computes in ``dtype or param_dtype`` fixed
when it is built (float32 by default), so a float64 trace shows float32-sized errors in
the embedding's gradient unless it is built with ``dtype=jnp.float64``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx
from torch import nn

from .check import (
    _JAX_DTYPES,
    _TORCH_DTYPES,
    DTYPES,
    _applier,
    _compare,
    _cotangent,
    _linen_params,
    _x64_scope,
)
from .convert import (
    ConversionError,
    Rules,
    _check_against,
    _flatten,
    _flax_key,
    _linen_path,
    _module_state,
    _renamed,
    _state_kinds,
    _torch_to_numpy,
    _unflatten,
    flax_to_numpy_state,
    nnx_params,
    numpy_state_to_flax,
)

__all__ = ["TraceReport", "TraceRow", "trace"]

TOLERANCES = {
    "float64": "|err| <= 1e-10",
    "float32": "|err| <= 1e-5 + 1e-5 * |ref|",
    "bfloat16": "|err| <= 2e-2 * max |float32 ref|",
}
"""The allowance per element, as ``compare_layers`` applies it (SPEC §6)."""

_ROOT = "(model)"
"""How the whole model's own output (path ``""``) is shown."""

Key = tuple[str, ...]
"""A module's path in linen's spelling (``("blocks_0", "attn")``): what both sides align on."""


# -- paths and weights -------------------------------------------------------------------


def _show(key: Key) -> str:
    return "/".join(key) or _ROOT


def _params_of(
    torch_model: nn.Module,
    mapping: Mapping[str, str],
    expected: Mapping[Key, tuple],
    rules: Rules | None = None,
) -> tuple[dict[str, Key], dict[Key, np.ndarray]]:
    """``({torch key: Flax param path}, {Flax param path: value})``: the PyTorch model's
    weights as the Flax model's params, checked against ``expected`` (path -> shape).

    Every ``state_dict`` entry converts by the rule of its owner's type
    (``convert._state_kinds``, after ``rules``: an entry without one is a
    ``ConversionError``), one entry at a time, at the path ``mapping`` gives its owner; a
    tied parameter once, under its first name.
    """
    state = _module_state(torch_model)
    kinds = _state_kinds(torch_model, state, rules)
    links: dict[str, Key] = {}
    params: dict[Key, np.ndarray] = {}
    for key, value in state.items():
        renamed = _renamed(key, mapping)
        ((path, converted),) = _flatten(
            numpy_state_to_flax({renamed: _torch_to_numpy(value)}, {renamed: kinds[key]})
        ).items()
        if path in params:
            other = next(k for k, p in links.items() if p == path)
            raise ConversionError(
                f"{other!r} and {key!r} both map to the Flax parameter {_show(path)!r}; "
                f"check mapping={dict(mapping)!r}"
            )
        links[key], params[path] = path, converted
    _check_params({p: np.shape(v) for p, v in params.items()}, expected, links, mapping)
    return links, params


def _check_params(
    given: Mapping[Key, tuple],
    expected: Mapping[Key, tuple],
    links: Mapping[str, Key],
    mapping: Mapping[str, str],
) -> None:
    """``ConversionError`` listing the parameters of one side only and the mis-shaped ones."""
    source = {path: key for key, path in links.items()}
    torch_only = [f"{source[p]} (as {_show(p)})" for p in given if p not in expected]
    flax_only = [_show(p) for p in expected if p not in given]
    misshaped = [
        f"{source[p]} -> {_show(p)}: {tuple(given[p])} vs Flax {tuple(expected[p])}"
        for p in given
        if p in expected and tuple(given[p]) != tuple(expected[p])
    ]
    problems = [
        f"{what}: {', '.join(names)}"
        for what, names in (
            ("PyTorch only", torch_only),
            ("Flax only", flax_only),
            ("mis-shaped", misshaped),
        )
        if names
    ]
    if problems:
        raise ConversionError(
            "the models' parameters do not match. "
            + "; ".join(problems)
            + f". Modules map by path (blocks.0.attn <-> blocks_0/attn) after mapping="
            f"{dict(mapping)!r}: map renamed modules as {{'torch.path': 'flax/path'}}"
        )


def _cast(value: Any, dtype: jnp.dtype) -> jax.Array:
    """``value`` as a JAX array, in ``dtype`` if it is floating (cast on the host first, so
    float64 values keep their bits in 64-bit mode and round once otherwise)."""
    array = np.asarray(value)
    return jnp.asarray(array.astype(dtype) if jnp.issubdtype(array.dtype, jnp.floating) else array)


# -- capturing ---------------------------------------------------------------------------


def _elements(value: Any, suffix: str = "") -> Iterator[tuple[str, Any]]:
    """The elements of an output by suffix: tuples, lists and dicts by position or key
    (``"[0]"``, ``"[logits]"``, nested ``"[0][1]"``), a lone value as ``""``; ``None``
    skipped."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _elements(v, f"{suffix}[{k}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _elements(v, f"{suffix}[{i}]")
    elif value is not None:
        yield suffix, value


def _leaves(value: Any) -> list[tuple[str, np.ndarray]]:
    """``[(suffix, float64 array)]``: the numeric elements of an output, copied."""
    leaves = []
    for suffix, element in _elements(value):
        if isinstance(element, torch.Tensor):
            array = _torch_to_numpy(element)
        elif isinstance(element, jax.Array | np.ndarray | np.generic | float | int):
            array = np.asarray(element)
        else:
            continue
        if np.issubdtype(array.dtype, np.number) or array.dtype == ml_dtypes.bfloat16:
            leaves.append((suffix, array.astype(np.float64)))
    return leaves


Calls = dict[Any, list[Any]]
"""``{module path: [output of each call]}`` in the order the modules returned."""


def _record(calls: Calls, path: Any, output: Any) -> None:
    calls.setdefault(path, []).append(_leaves(output))


def _for_torch(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """An input for the PyTorch model: floating arrays in ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor | np.ndarray | jax.Array):
        array = _torch_to_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.dtype == ml_dtypes.bfloat16:
            array = array.astype(np.float32)
        tensor = torch.from_numpy(np.array(array))
        return tensor.to(device, dtype if tensor.is_floating_point() else None)
    return value


def _for_jax(value: Any, dtype: jnp.dtype) -> Any:
    """An input for the Flax model: floating arrays in ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = _torch_to_numpy(value)
    return _cast(value, dtype) if isinstance(value, np.ndarray | jax.Array) else value


def _loss_terms(output: Any) -> dict[str, np.ndarray]:
    """A fixed standard-normal cotangent for each floating element of the final output."""
    return {
        suffix: _cotangent(np.shape(element), seed)
        for seed, (suffix, element) in enumerate(_elements(output), start=1)
        if isinstance(element, torch.Tensor) and element.is_floating_point()
    }


def _torch_copy(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of ``model`` in ``dtype``, in evaluation mode (the user's stays as it is)."""
    return copy.deepcopy(model).to(_TORCH_DTYPES[dtype]).eval()


def _run_torch(
    model: nn.Module, inputs: Sequence, kwargs: Mapping, dtype: str, grads: bool
) -> tuple[Calls, dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
    """Every module's outputs (forward hooks) and, with ``grads``, the loss's cotangents
    and every parameter's gradient of ``sum(output * cotangent)`` (else ``None``, ``{}``);
    ``model`` is a ``_torch_copy`` in ``dtype``."""
    tdtype = _TORCH_DTYPES[dtype]
    device = next(model.parameters(), torch.empty(0)).device
    args = [_for_torch(v, tdtype, device) for v in inputs]
    kwargs = {k: _for_torch(v, tdtype, device) for k, v in kwargs.items()}
    calls: Calls = {}
    handles = [
        module.register_forward_hook(
            lambda _module, _args, output, path=path: _record(calls, path, output)
        )
        for path, module in model.named_modules()
    ]
    try:
        with torch.set_grad_enabled(grads):
            output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not grads:
        return calls, None, {}
    terms = _loss_terms(output)
    acc = torch.promote_types(tdtype, torch.float32)
    elements = dict(_elements(output))
    loss = sum(
        (elements[s].to(acc) * torch.tensor(g, dtype=acc, device=device)).sum()
        for s, g in terms.items()
    )
    loss.backward()
    gradients = {  # a parameter the loss does not reach has a zero gradient
        name: _torch_to_numpy(torch.zeros_like(p) if p.grad is None else p.grad).astype(np.float64)
        for name, p in model.named_parameters()
    }
    return calls, terms, gradients


def _jax_loss(output: Any, terms: Mapping[str, np.ndarray]) -> jax.Array:
    """``sum(element * cotangent)`` over the elements of PyTorch's loss that Flax returns
    too (one that it lacks already fails the final output's row)."""
    elements = dict(_elements(output))
    total = jnp.zeros((), jnp.float32)
    for suffix, cotangent in terms.items():
        if suffix in elements:
            element = jnp.asarray(elements[suffix])
            acc = jnp.promote_types(element.dtype, jnp.float32)
            total = total + (element.astype(acc) * jnp.asarray(cotangent, acc)).sum()
    return total


def _run_linen(
    model: fnn.Module,
    params: Mapping[Key, Any],
    rest: Mapping[str, Any],
    inputs: Sequence,
    kwargs: Mapping,
    terms: Mapping[str, np.ndarray] | None,
    jit: bool,
) -> tuple[Calls, dict[Key, Any]]:
    """Every module's ``__call__`` outputs (the ``intermediates`` collection, by linen
    path) and, with ``terms``, the gradient of the loss with respect to ``params``
    (``rest``: the other collections)."""
    variables = {"params": _unflatten(params), **rest}

    def forward(variables):
        return model.apply(
            variables, *inputs, **kwargs, capture_intermediates=True, mutable=["intermediates"]
        )[1]

    def loss(params):
        return _jax_loss(model.apply({"params": params, **rest}, *inputs, **kwargs), terms)

    state = _compiled(forward, jit)(variables)
    calls: Calls = {}
    for path, outputs in _flatten(state.get("intermediates", {})).items():
        if path[-1] == "__call__":
            for output in outputs:
                _record(calls, path[:-1], output)
    if terms is None:
        return calls, {}
    return calls, _flatten(_compiled(jax.grad(loss), jit)(variables["params"]))


def _compiled(fn: Callable, jit: bool) -> Callable:
    return jax.jit(fn) if jit else fn


def _nnx_loaded(model: nnx.Module, params: Mapping[Key, Any]) -> nnx.Module:
    """A copy of ``model`` in evaluation mode holding ``params`` (linen-style paths)."""
    model = nnx.clone(model)
    model.eval()
    state = nnx.state(model, nnx.Param)
    paths = {_linen_path(path): path for path in _flatten(nnx.to_pure_dict(state))}
    nnx.replace_by_pure_dict(state, _unflatten({paths[p]: v for p, v in params.items()}))
    nnx.update(model, state)
    return model


@contextlib.contextmanager
def _recording_calls(model: nnx.Module, record: Callable[[tuple, Any], None]) -> Iterator[None]:
    """``record(path, output)`` of every submodule's ``__call__``, by its NNX path, in the
    order the calls return, while inside.

    Python finds ``__call__`` on the class, not the instance, so the classes of the
    model's modules get a recording ``__call__`` for the duration (resolved before any is
    replaced, so a subclass wraps its own method, and a ``super().__call__`` inside a
    recorded call is not recorded twice); the classes are restored on the way out.
    """
    paths = {id(module): path for path, module in nnx.iter_modules(model)}
    classes = {
        type(module)
        for _, module in nnx.iter_modules(model)
        if any("__call__" in vars(c) for c in type(module).__mro__[:-1])
    }
    inner = {cls: cls.__call__ for cls in classes}
    own = {cls: vars(cls).get("__call__") for cls in classes}
    running: set[int] = set()

    def recording(call: Callable) -> Callable:
        @functools.wraps(call)
        def recorded(self, *args, **kwargs):
            if id(self) not in paths or id(self) in running:
                return call(self, *args, **kwargs)
            running.add(id(self))
            try:
                output = call(self, *args, **kwargs)
            finally:
                running.discard(id(self))
            record(paths[id(self)], output)
            return output

        return recorded

    try:
        for cls in classes:
            cls.__call__ = recording(inner[cls])
        yield
    finally:
        for cls in classes:
            if own[cls] is None:
                del cls.__call__
            else:
                cls.__call__ = own[cls]


def _run_nnx(
    model: nnx.Module,
    params: Mapping[Key, Any],
    inputs: Sequence,
    kwargs: Mapping,
    terms: Mapping[str, np.ndarray] | None,
    jit: bool,
) -> tuple[Calls, dict[Key, Any]]:
    """As ``_run_linen`` for an NNX model (``params`` loaded into a copy of it). Under
    ``jax.jit`` the outputs leave the compiled function as its results; their paths are
    recorded while it is traced."""
    graph, state = nnx.split(_nnx_loaded(model, params))
    paths: list[tuple] = []

    def forward(state):
        module, outputs = nnx.merge(graph, state), []

        def record(path: tuple, output: Any) -> None:
            paths.append(path)
            outputs.append(output)

        with _recording_calls(module, record):
            module(*inputs, **kwargs)
        return outputs

    outputs = _compiled(forward, jit)(state)
    calls: Calls = {}
    for path, output in zip(paths, outputs, strict=True):
        _record(calls, _linen_path(path), output)
    if terms is None:
        return calls, {}
    apply, state = _applier(model, _unflatten(params))
    gradient = _compiled(jax.grad(lambda s: _jax_loss(apply(s, *inputs, **kwargs), terms)), jit)
    return calls, _flatten(_linen_params(gradient(state)))


# -- comparing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRow:
    """One compared tensor: a module's output (element), or a parameter's gradient.

    ``torch`` / ``flax``: the module path on each side (``"blocks.0.attn"``,
    ``"blocks_0/attn"``; ``"(model)"`` for the whole model) or, for a gradient, the
    parameter (``"blocks.0.ln1.weight"``, ``"blocks_0/ln1/scale"``); ``output``: which
    call and element of the module's output (``""``, ``"[0]"``, ``"#1[0]"``). ``note``
    says why a row could not be compared (different shapes, an element of one side only);
    such a row has infinite errors and fails.
    """

    torch: str
    flax: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ulps: float
    ratio: float
    note: str | None = None

    @property
    def passed(self) -> bool:
        return self.note is None and bool(self.ratio <= 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "torch": self.torch,
            "flax": self.flax,
            "output": self.output,
            "shape": list(self.shape),
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "ulps": _json_float(self.ulps),
            "ratio": _json_float(self.ratio),
            "passed": self.passed,
            "note": self.note,
        }


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _ulp(scale: float, dtype: str) -> float:
    """The spacing of ``dtype``'s numbers at ``scale`` (at its smallest normal below that)."""
    info = ml_dtypes.finfo(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.finfo(dtype)
    _, exponent = np.frexp(max(scale, float(info.tiny)))
    return float(info.eps) * 2.0 ** (int(exponent) - 1)


def _row(
    names: tuple[str, str, str], a: np.ndarray, b: np.ndarray, dtype: str, scale: float
) -> TraceRow:
    if a.shape != b.shape:
        note = f"shapes differ: PyTorch {a.shape}, Flax {b.shape}"
        return TraceRow(*names, a.shape, *(4 * (math.inf,)), note=note)
    comparison = _compare(names[0], a, b, dtype, scale)
    magnitude = float(np.abs(a).max(initial=0.0))
    if magnitude:
        rel = comparison.max_abs / magnitude
    else:
        rel = 0.0 if comparison.max_abs == 0.0 else math.inf
    ulps = comparison.max_abs / _ulp(magnitude, dtype)
    return TraceRow(*names, a.shape, comparison.max_abs, rel, ulps, comparison.ratio)


def _one_sided(names: tuple[str, str, str], shape: tuple, side: str) -> TraceRow:
    other = "Flax" if side == "PyTorch" else "PyTorch"
    note = f"{side} only: the {other} output has no {names[2] or 'value'}"
    return TraceRow(*names, shape, *(4 * (math.inf,)), note=note)


def _module_rows(
    torch_calls: Calls,
    flax_calls: Calls,
    keys: Mapping[str, Key],
    show_flax: Callable[[Key], str],
    dtype: str,
    scales: Calls,
) -> tuple[list[TraceRow], list[str], list[str]]:
    """Rows in PyTorch's order, and the module calls of each side only."""
    rows, torch_only = [], []
    matched: set[tuple[Key, int]] = set()
    for path, outputs in torch_calls.items():
        key = keys[path]
        theirs = flax_calls.get(key, [])
        for call, leaves in enumerate(outputs):
            mark = f"#{call}" if len(outputs) > 1 else ""
            if call >= len(theirs):
                torch_only.append(f"{path or _ROOT}{mark}")
                continue
            matched.add((key, call))
            flax_leaves = dict(theirs[call])
            reference = dict(scales.get(path, [[]] * len(outputs))[call])
            for suffix, a in leaves:
                names = (path or _ROOT, show_flax(key), f"{mark}{suffix}")
                if suffix in flax_leaves:
                    scale = float(np.abs(reference.get(suffix, a)).max(initial=0.0))
                    rows.append(_row(names, a, flax_leaves[suffix], dtype, scale))
                else:
                    rows.append(_one_sided(names, a.shape, "PyTorch"))
            for suffix, b in theirs[call]:
                if suffix not in dict(leaves):
                    names = (path or _ROOT, show_flax(key), f"{mark}{suffix}")
                    rows.append(_one_sided(names, b.shape, "Flax"))
    flax_only = [
        f"{show_flax(key)}{f'#{call}' if len(outputs) > 1 else ''}"
        for key, outputs in flax_calls.items()
        for call in range(len(outputs))
        if (key, call) not in matched
    ]
    return rows, torch_only, flax_only


def _gradient_rows(
    torch_grads: Mapping[str, np.ndarray],
    flax_grads: Mapping[Key, Any],
    links: Mapping[str, Key],
    dtype: str,
    scale: float,
) -> list[TraceRow]:
    """A row per parameter, in ``named_parameters()`` order, compared in PyTorch's layout."""
    rows = []
    for name, a in torch_grads.items():
        path = links[name]
        ((_, b),) = flax_to_numpy_state(_unflatten({path: flax_grads[path]})).items()
        b = np.asarray(b).astype(np.float64)
        rows.append(_row((name, _show(path), ""), a, b, dtype, scale))
    return rows


@dataclass
class TraceReport:
    """What ``trace`` found: ``modules`` (output rows, in PyTorch's execution order),
    ``gradients`` (parameter rows, with ``grads=True``), and the module calls seen on one
    side only (``torch_only``, ``flax_only``: listed, not compared, not failing).

    ``passed`` iff every row passes; ``first_failure`` is the first failing module row
    in execution order (else the first failing gradient row), ``None`` when all pass.
    """

    dtype: str
    framework: str
    modules: list[TraceRow] = field(default_factory=list)
    gradients: list[TraceRow] = field(default_factory=list)
    torch_only: list[str] = field(default_factory=list)
    flax_only: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in (*self.modules, *self.gradients))

    @property
    def first_failure(self) -> TraceRow | None:
        return next((row for row in (*self.modules, *self.gradients) if not row.passed), None)

    def summary(self) -> str:
        counts = f"{len(self.modules)} module outputs" + (
            f", {len(self.gradients)} parameter gradients" if self.gradients else ""
        )
        unmatched = len(self.torch_only) + len(self.flax_only)
        counts += f", {unmatched} unmatched module calls" if unmatched else ""
        first = self.first_failure
        if first is None:
            return f"PASS ({self.dtype}, {counts})"
        failed = sum(not row.passed for row in (*self.modules, *self.gradients))
        kind = "module" if any(first is row for row in self.modules) else "gradient of"
        why = first.note or f"max abs {first.max_abs:.1e}, {first.ratio:.3g} x tolerance"
        return (
            f"FAIL ({self.dtype}, {counts}; {failed} fail): first failure {kind} "
            f"{first.torch}{first.output} (Flax {first.flax}{first.output}): {why}"
        )

    def table(self) -> str:
        """The rows as aligned text: modules, then gradients, unmatched calls, summary."""
        flavour = "NNX" if self.framework == "nnx" else "linen"
        lines = [
            f"parity.trace: PyTorch vs Flax {flavour}, {self.dtype}, "
            f"tolerance {TOLERANCES[self.dtype]}"
        ]
        lines += _format(self.modules, "PyTorch module", "Flax module")
        if self.gradients:
            lines += ["", "gradients of sum(final output * fixed random cotangent):"]
            lines += _format(self.gradients, "PyTorch parameter", "Flax parameter")
        for side, calls in (("PyTorch", self.torch_only), ("Flax", self.flax_only)):
            if calls:
                lines += ["", f"{side} only (not compared): {', '.join(calls)}"]
        return "\n".join([*lines, "", self.summary()])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite numbers as the strings ``"inf"`` / ``"nan"``)."""
        first = self.first_failure
        return {
            "dtype": self.dtype,
            "framework": self.framework,
            "tolerance": TOLERANCES[self.dtype],
            "passed": self.passed,
            "first_failure": None if first is None else first.to_dict(),
            "summary": self.summary(),
            "modules": [row.to_dict() for row in self.modules],
            "gradients": [row.to_dict() for row in self.gradients],
            "unmatched": {"torch": list(self.torch_only), "flax": list(self.flax_only)},
        }


def _format(rows: Sequence[TraceRow], torch_title: str, flax_title: str) -> list[str]:
    cells = [
        (
            str(i),
            f"{row.torch}{row.output}",
            f"{row.flax}{row.output}",
            str(tuple(row.shape)),
            f"{row.max_abs:.1e}",
            f"{row.max_rel:.1e}",
            f"{row.ulps:.3g}",
            f"{row.ratio:.3g}",
            "PASS" if row.passed else f"FAIL{f' ({row.note})' if row.note else ''}",
        )
        for i, row in enumerate(rows, start=1)
    ]
    header = ("#", torch_title, flax_title, "shape", "max abs", "max rel", "ULPs", "err/tol", "")
    widths = [max(len(c[i]) for c in (header, *cells)) for i in range(len(header) - 1)]
    left = (1, 2, 3)

    def line(cell: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cell[:-1], widths, strict=True))
        ]
        return "  ".join([*padded, cell[-1]]).rstrip()

    return [line(header), *(line(c) for c in cells)]


# -- the entry point ---------------------------------------------------------------------


def trace(
    torch_model: nn.Module,
    flax_model: fnn.Module | nnx.Module,
    variables: Mapping[str, Any] | nnx.State | None,
    *inputs: Any,
    dtype: str = "float32",
    mapping: Mapping[str, str] | None = None,
    rules: Rules | None = None,
    grads: bool = False,
    kwargs: Mapping[str, Any] | None = None,
    torch_kwargs: Mapping[str, Any] | None = None,
    flax_kwargs: Mapping[str, Any] | None = None,
    jit: bool = True,
) -> TraceReport:
    """Run a PyTorch model and its Flax port side by side and compare every module.

    Args:
      torch_model: the reference; left unchanged (a copy runs, in ``dtype``, in ``eval()``).
      flax_model: the port: an unbound linen module, or an NNX module (left unchanged).
      variables: the Flax weights to use (linen ``{"params": ...}`` or params; for NNX
        linen-style params such as ``parity.nnx_params(model)`` or an ``nnx.Param``
        state), or ``None`` to convert ``torch_model``'s weights by the generic rules.
        Either way the parameters are aligned by those rules (gradients are compared
        through them) and cast to ``dtype``.
      *inputs: the positional inputs of both models (NumPy, PyTorch or JAX arrays;
        floating ones are cast to ``dtype``, integer ones such as token ids kept).
      dtype: ``"float64"``, ``"float32"`` or ``"bfloat16"``; bfloat16 also runs the
        PyTorch model in float32 for the tolerance's scale.
      mapping: ``{PyTorch path prefix: Flax path}`` for modules named differently, e.g.
        ``{"tok_emb": "embed", "layers": "blocks"}`` (see the module docstring).
      rules: ``{module type or type name: {leaf: kind}}``, conversion rules for module
        types without a built-in one (``parity.convert``), e.g. ``parity.hf.LLAMA_RULES``.
      grads: also compare every parameter's gradient of ``sum(out * g)``, ``g`` a fixed
        standard-normal cotangent per floating element of the final output.
      kwargs: keyword arguments of both calls (arrays converted as ``inputs``);
        ``torch_kwargs`` / ``flax_kwargs``: of one side only (``deterministic=True``).
      jit: run the Flax side as one ``jax.jit`` program (inputs and keyword arguments
        are its constants); ``False`` runs it op by op, as ``compare_layers`` does by
        default: slower for a model, and what a model that cannot be traced needs.

    Returns:
      A ``TraceReport``: ``.table()``, ``.to_dict()``, ``.passed``, ``.first_failure``.

    Raises:
      ConversionError: (a ``ValueError``) a parameter of one model has no counterpart in
        the other, or a different shape, or no conversion rule; all of them are named.
      ValueError: an unknown ``dtype``.

    Example::

        report = parity.trace(torch_lm, flax_lm, None, tokens, dtype="float64", grads=True)
        print(report.table())
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    mapping = dict(mapping or {})
    modules = dict(torch_model.named_modules())
    unknown = [prefix for prefix in mapping if prefix not in modules]
    if unknown:
        raise ValueError(
            f"mapping names no module of the PyTorch model: {unknown}; its keys are module "
            f"paths such as {[path for path, _ in torch_model.named_children()]}"
        )
    is_nnx = isinstance(flax_model, nnx.Module)
    reference = _torch_copy(torch_model, dtype)
    torch_call = {**(kwargs or {}), **(torch_kwargs or {})}
    flax_call = {**(kwargs or {}), **(flax_kwargs or {})}
    x64 = _x64_scope() if dtype == "float64" else contextlib.nullcontext()
    with x64:
        # the values PyTorch gets, bit for bit: one rounding to ``dtype``, on its side
        jdtype, on_cpu = _JAX_DTYPES[dtype], torch.device("cpu")
        tdtype = _TORCH_DTYPES[dtype]
        jax_inputs = [_for_jax(_for_torch(v, tdtype, on_cpu), jdtype) for v in inputs]
        flax_call = {
            k: _for_jax(_for_torch(v, tdtype, on_cpu), jdtype) for k, v in flax_call.items()
        }
        links, params, rest = _flax_weights(
            reference, flax_model, variables, mapping, jax_inputs, flax_call, jdtype, rules
        )
        torch_calls, terms, torch_grads = _run_torch(reference, inputs, torch_call, dtype, grads)
        if is_nnx:
            flax_calls, flax_grads = _run_nnx(flax_model, params, jax_inputs, flax_call, terms, jit)
        else:
            flax_calls, flax_grads = _run_linen(
                flax_model, params, rest, jax_inputs, flax_call, terms, jit
            )
    scales: Calls = {}
    grad_scale = 0.0
    if dtype == "bfloat16":  # the tolerance's scale: the float32 result's
        scales, _, reference_grads = _run_torch(
            _torch_copy(torch_model, "float32"), inputs, torch_call, "float32", grads
        )
        grad_scale = max(
            (float(np.abs(g).max(initial=0.0)) for g in reference_grads.values()), default=0.0
        )

    keys = {path: _flax_key(path, mapping) for path in torch_calls}
    nnx_names = _nnx_names(flax_model) if is_nnx else {}
    rows, torch_only, flax_only = _module_rows(
        torch_calls, flax_calls, keys, lambda k: nnx_names.get(k, _show(k)), dtype, scales
    )
    report = TraceReport(dtype, "nnx" if is_nnx else "linen", rows, [], torch_only, flax_only)
    if grads:
        report.gradients = _gradient_rows(torch_grads, flax_grads, links, dtype, grad_scale)
    return report


def _flax_weights(
    torch_model: nn.Module,
    flax_model: fnn.Module | nnx.Module,
    variables: Mapping[str, Any] | nnx.State | None,
    mapping: Mapping[str, str],
    inputs: Sequence,
    kwargs: Mapping,
    dtype: jnp.dtype,
    rules: Rules | None = None,
) -> tuple[dict[str, Key], dict[Key, jax.Array], dict[str, Any]]:
    """``(links, params, other collections)``: the PyTorch parameters' Flax paths (checked
    against the Flax model's own), and the params to run, ``variables``' or converted."""
    given, rest = _given(variables)
    if isinstance(flax_model, nnx.Module):
        expected = {p: np.shape(v) for p, v in _flatten(nnx_params(flax_model)).items()}
        if given is not None:
            _check_against(
                {"/".join(p): np.shape(v) for p, v in given.items()},
                {"/".join(p): shape for p, shape in expected.items()},
                "variables do not match the NNX model's parameters",
            )
    elif given is not None:
        expected = {p: np.shape(v) for p, v in given.items()}
    else:
        expected, rest = _linen_init(flax_model, inputs, kwargs)
    links, converted = _params_of(torch_model, mapping, expected, rules)
    params = {p: _cast(v, dtype) for p, v in (converted if given is None else given).items()}
    return links, params, rest


def _linen_init(
    model: fnn.Module, inputs: Sequence, kwargs: Mapping
) -> tuple[dict[Key, tuple], dict[str, Any]]:
    """The shapes of a linen model's params (``init`` traced, not run) and its other
    collections (batch statistics and the like: from a real ``init``, if it has any)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
    expected = {p: v.shape for p, v in _flatten(shapes.get("params", {})).items()}
    if not set(shapes) - {"params"}:
        return expected, {}
    initial = model.init(jax.random.key(0), *inputs, **kwargs)
    return expected, {k: v for k, v in initial.items() if k != "params"}


def _given(
    variables: Mapping[str, Any] | nnx.State | None,
) -> tuple[dict[Key, Any] | None, dict[str, Any]]:
    """``(params by linen path, other collections)`` of the ``variables`` argument."""
    if variables is None:
        return None, {}
    if isinstance(variables, nnx.State):
        return _flatten(_linen_params(variables)), {}
    if "params" not in variables:  # bare params
        return _flatten(variables), {}
    return _flatten(variables["params"]), {k: v for k, v in variables.items() if k != "params"}


def _nnx_names(model: nnx.Module) -> dict[Key, str]:
    """How NNX spells each module path (``blocks/0/attn``), by its linen-style key."""
    return {
        _linen_path(path): "/".join(map(str, path)) or _ROOT for path, _ in nnx.iter_modules(model)
    }

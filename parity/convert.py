"""Move weights between a PyTorch ``state_dict`` and Flax ``params`` (SPEC §5).

The generic rules, which also cover users' own models built from these layers:

=====================  =======================  =========================
PyTorch                Flax                     tensor
=====================  =======================  =========================
``Linear.weight``      ``Dense.kernel``         ``(out, in)`` ↔ ``(in, out)``
``Linear.bias``        ``Dense.bias``           unchanged
``LayerNorm.weight``   ``LayerNorm.scale``      unchanged
``Embedding.weight``   ``Embed.embedding``      unchanged
=====================  =======================  =========================

Module paths map ``a.b.0.c`` ↔ ``{"a": {"b_0": {"c": ...}}}`` (Flax names list
submodules ``b_0``). Values are copied bit for bit (a transpose moves values, it does not
round them), so a round trip is exact in every dtype. From a bare ``state_dict`` a 2-D
``weight`` is read as a ``Linear`` and a 1-D one as a ``LayerNorm``; pass the module
itself to convert an ``Embedding``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from torch import nn

__all__ = [
    "ConversionError",
    "flax_to_numpy_state",
    "flax_to_torch",
    "numpy_state_to_flax",
    "torch_to_flax",
]

_LIST_INDEX = re.compile(r"^(.+)_(\d+)$")


class ConversionError(ValueError):
    """Raised when entries are missing, unexpected or of the wrong shape."""


def _torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _module_kinds(module: nn.Module) -> dict[str, str]:
    """``{"path.weight": "linear" | "layernorm" | "embedding"}`` from the module tree."""
    kinds = {}
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(sub, nn.Linear):
            kinds[f"{prefix}weight"] = "linear"
        elif isinstance(sub, nn.LayerNorm):
            kinds[f"{prefix}weight"] = "layernorm"
        elif isinstance(sub, nn.Embedding):
            kinds[f"{prefix}weight"] = "embedding"
    return kinds


def _flax_path(torch_key: str) -> tuple[str, ...]:
    """``"a.b.0.weight"`` -> ``("a", "b_0")`` (the module path, without the leaf)."""
    parts: list[str] = []
    for part in torch_key.split(".")[:-1]:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def _torch_path(flax_path: tuple[str, ...]) -> str:
    """``("a", "b_0")`` -> ``"a.b.0"``."""
    parts = []
    for part in flax_path:
        match = _LIST_INDEX.match(part)
        parts.extend(match.groups() if match else (part,))
    return ".".join(parts)


def _check_against(given: Mapping[str, tuple], expected: Mapping[str, tuple], what: str) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k}: expected {expected[k]}, got {given[k]}"
        for k in set(given) & set(expected)
        if tuple(given[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped [{'; '.join(misshaped)}]")
    if problems:
        raise ConversionError(f"{what}: " + ", ".join(problems))


def _flatten(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    flat = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def numpy_state_to_flax(
    state: Mapping[str, np.ndarray], kinds: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Flax ``params`` (NumPy leaves) from a PyTorch-layout ``{key: array}`` mapping."""
    kinds = kinds or {}
    flat = {}
    for key, value in state.items():
        path, leaf = _flax_path(key), key.rsplit(".", 1)[-1]
        if leaf == "bias":
            flat[(*path, "bias")] = value
            continue
        if leaf != "weight":
            raise ConversionError(f"unexpected entry {key!r}: only weight and bias convert")
        kind = kinds.get(key) or ("linear" if value.ndim == 2 else "layernorm")
        if kind == "linear":
            flat[(*path, "kernel")] = np.ascontiguousarray(value.T)
        elif kind == "layernorm":
            flat[(*path, "scale")] = value
        else:
            flat[(*path, "embedding")] = value
    return _unflatten(flat)


def flax_to_numpy_state(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PyTorch-layout ``{key: array}`` from Flax ``params`` (the inverse of the above)."""
    if "params" in params and len(params) == 1:
        params = params["params"]
    state = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        module, leaf = _torch_path(path[:-1]), path[-1]
        prefix = f"{module}." if module else ""
        if leaf == "kernel":
            state[f"{prefix}weight"] = np.ascontiguousarray(value.T)
        elif leaf in ("scale", "embedding"):
            state[f"{prefix}weight"] = value
        elif leaf == "bias":
            state[f"{prefix}bias"] = value
        else:
            raise ConversionError(
                f"unexpected entry {'/'.join(path)!r}: only kernel, bias, scale and "
                f"embedding convert"
            )
    return state


def torch_to_flax(
    source: nn.Module | Mapping[str, torch.Tensor], *, like: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Flax ``params`` (``jax.Array`` leaves, same dtypes) from a module or its state_dict.

    Args:
      source: a ``torch.nn.Module`` (types read from it) or a ``state_dict``.
      like: optional Flax params (e.g. from ``init``) to check names and shapes against;
        a ``ConversionError`` names every missing, unexpected or mis-shaped entry.
    """
    kinds = _module_kinds(source) if isinstance(source, nn.Module) else None
    state = source.state_dict() if isinstance(source, nn.Module) else source
    params = numpy_state_to_flax({k: _torch_to_numpy(v) for k, v in state.items()}, kinds)
    if like is not None:
        like = like["params"] if "params" in like and len(like) == 1 else like
        _check_against(
            {"/".join(p): np.shape(v) for p, v in _flatten(params).items()},
            {"/".join(p): np.shape(v) for p, v in _flatten(like).items()},
            "Flax params do not match",
        )
    flat = _flatten(params)
    if not jax.config.jax_enable_x64 and any(v.dtype == np.float64 for v in flat.values()):
        raise ConversionError(
            "float64 weights need JAX's 64-bit mode; call "
            "jax.config.update('jax_enable_x64', True) before converting"
        )
    return _unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def flax_to_torch(
    params: Mapping[str, Any], *, like: nn.Module | Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` for ``load_state_dict`` from Flax ``params`` (or ``{"params": ...}``).

    Args:
      params: Flax params.
      like: optional module or state_dict to check names and shapes against; a
        ``ConversionError`` names every missing, unexpected or mis-shaped entry.
    """
    state = {k: _numpy_to_torch(v) for k, v in flax_to_numpy_state(params).items()}
    if like is not None:
        ref = like.state_dict() if isinstance(like, nn.Module) else like
        _check_against(
            {k: tuple(v.shape) for k, v in state.items()},
            {k: tuple(v.shape) for k, v in ref.items()},
            "state_dict does not match",
        )
    return state

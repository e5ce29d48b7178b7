"""Checkpoints exchanged as safetensors files in the PyTorch layout (never pickle).

A file written from either framework holds ``state_dict`` keys (``w_q.weight`` as
``(out, in)``, a convolution's weight as ``(out, in, *k)``), so ``load_state_dict(path)``
and ``load_flax_params(path)`` both read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import safetensors.numpy
import safetensors.torch
import torch
from torch import nn

from .convert import flax_to_numpy_state, torch_to_flax

__all__ = ["load_flax_params", "load_state_dict", "save_flax_params", "save_state_dict"]


def save_state_dict(
    source: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike
) -> None:
    """Write a module's (or a state_dict's) tensors to a safetensors file."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in state.items()}, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file as a PyTorch ``state_dict``."""
    return safetensors.torch.load_file(path)


def save_flax_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write Flax params to a safetensors file in the PyTorch layout."""
    safetensors.numpy.save_file(flax_to_numpy_state(params), path)


def load_flax_params(path: str | os.PathLike, like: Mapping[str, Any] | None = None) -> dict:
    """Read a safetensors file (PyTorch layout) as Flax params.

    A file holds no module types, so each ``weight`` is read by the Flax leaf at the same
    path in ``like`` where ``like`` (Flax params or ``{"params": ...}``, e.g. from ``init``
    or ``jax.eval_shape``) has one: a 2-D ``kernel`` (Dense), a 3-D or larger ``kernel``
    (Conv: ``(out, in, *k)`` becomes ``(*k, in, out)``), a ``scale`` or an
    ``embedding``. Otherwise the bare ``state_dict`` rules apply: a 2-D ``weight`` is a
    Dense kernel, a 1-D one a norm's scale, and any other rank raises a
    ``ConversionError`` naming the key (pass ``like``). With ``like`` the result is also
    checked against its names and shapes (see ``parity.convert``).
    """
    state = safetensors.numpy.load_file(path)
    return torch_to_flax({k: torch.from_numpy(v) for k, v in state.items()}, like=like)

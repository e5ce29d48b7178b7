"""Sharded parameters: the heads split over a mesh axis under ``jax.jit`` (SPEC §13).

Tensor parallelism in JAX is a layout of the parameters, not a change to the layer: put
the kernels of ``w_q``, ``w_k`` and ``w_v`` ``(in, H·D)`` split on their output features
by heads along a mesh axis (device r of N holds query heads ``r·H/N .. (r+1)·H/N - 1`` and
kv heads ``r·K/N .. (r+1)·K/N - 1``; their biases alike), the kernel of ``w_o`` on its
input rows and its bias replicated, as Megatron-LM splits attention, and ``jax.jit`` the
ordinary call. XLA's partitioner (GSPMD) carries the split through the heads (query head
h reads kv head ``h // (H/K)``, on the same device as both are split in contiguous
blocks) and sums the output projection's partial products across the axis; the backward
likewise. Under ``jit`` the layer sees the global arrays, so ALiBi's slopes, masks and
weights need nothing. The input may be replicated, or split on its batch over other
mesh axes (data parallelism). H and K must be multiples of N
(``validate_tensor_parallel``): a vanilla layer's single head, or MQA's single kv head,
cannot be split.

Example::

    mesh = jax.make_mesh((2, 4), ("data", "heads"))
    variables = tensor_parallel(attn, variables, mesh, "heads")   # linen; NNX: its state
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    out, _ = jax.jit(partial(attn.apply, need_weights=False))(variables, x)

Shape legend: B batch, L length, N devices along the axis, H query heads, K kv heads,
D head width, E model width.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .base import PROJECTIONS, Mechanism

__all__ = ["tensor_parallel", "tensor_parallel_plan", "validate_tensor_parallel"]


def validate_tensor_parallel(layer: Mechanism, shards: int) -> None:
    """``ValueError`` unless the layer's query and kv heads split evenly over ``shards``
    devices (whole heads per device)."""
    num_heads, num_kv_heads = layer.head_counts()
    if num_heads % shards or num_kv_heads % shards:
        raise ValueError(
            f"{type(layer).__name__}: tensor parallelism over {shards} devices splits the "
            f"heads, so num_heads and num_kv_heads must be multiples of {shards}; got "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )


def _name(key: Any) -> str:
    """A path entry's name: a dict key (linen), an attribute (NNX's ``.value``)."""
    for field in ("key", "name", "idx"):
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def _spec(path: tuple[Any, ...], axis: str) -> P | None:
    """The split of one leaf: by heads on the output features of ``w_q``/``w_k``/``w_v``
    (kernel ``(in, H·D)``, bias ``(H·D,)``), on the input rows of ``w_o``'s kernel, none
    for ``w_o``'s bias; ``None`` for a leaf that is no projection's."""
    names = [_name(key) for key in path]
    for projection, part in itertools.pairwise(names):
        if projection in PROJECTIONS and part in ("kernel", "bias"):
            if projection == "w_o":
                return P(axis, None) if part == "kernel" else P()
            return P(None, axis) if part == "kernel" else P(axis)
    return None


def tensor_parallel_plan(layer: Mechanism, tree: Any, mesh: Mesh, axis: str = "heads") -> Any:
    """A ``NamedSharding`` on ``mesh`` for every leaf of ``tree``, the layer's linen
    ``variables`` (or ``params``) or its NNX state (``nnx.state(layer)``), in the same
    tree: the projections split by heads along ``axis`` (module docstring), anything else
    (an NNX rng state) replicated. For ``jax.device_put``, or a ``jax.jit``'s
    ``in_shardings`` / ``out_shardings``."""
    if axis not in mesh.shape:
        raise ValueError(f"the mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    validate_tensor_parallel(layer, mesh.shape[axis])
    paths, tree_def = jax.tree_util.tree_flatten_with_path(tree)
    specs = [_spec(path, axis) for path, _ in paths]
    if all(spec is None for spec in specs):
        raise ValueError(
            f"found no projection ({', '.join(PROJECTIONS)}: kernel, bias) in the tree; "
            "pass the layer's own variables, params or NNX state"
        )
    shardings = [NamedSharding(mesh, P() if spec is None else spec) for spec in specs]
    return jax.tree_util.tree_unflatten(tree_def, shardings)


def tensor_parallel(layer: Mechanism, tree: Any, mesh: Mesh, axis: str = "heads") -> Any:
    """``tree`` (the layer's variables, params or NNX state) placed on ``mesh`` with its
    heads split along ``axis`` (``tensor_parallel_plan``); jit the layer's call on it.
    NNX: ``nnx.update(layer, tensor_parallel(layer, nnx.state(layer), mesh))``."""
    return jax.device_put(tree, tensor_parallel_plan(layer, tree, mesh, axis))

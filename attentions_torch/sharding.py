"""Sharded parameters: tensor (head) parallelism and FSDP2 (SPEC §13).

**Tensor parallelism** splits the heads over the N ranks of a 1-D ``DeviceMesh``, as
Megatron-LM splits attention, with PyTorch's DTensor styles: ``w_q``, ``w_k`` and ``w_v``
by their output rows (``ColwiseParallel``: rank r holds query heads ``r·H/N ..
(r+1)·H/N - 1`` and kv heads ``r·K/N .. (r+1)·K/N - 1``), ``w_o`` by its input columns
(``RowwiseParallel``; its bias replicated). Every rank takes the whole input ``x``,
projects and attends with its own heads (query head h reads kv head ``h // (H/K)``, and
both are split in contiguous blocks, so that kv head is on the same rank), and the
output projection's partial sums are all-reduced: one all-reduce in the forward, one in
the backward (for x's gradient). The output is the whole ``(B, L, E)`` on every rank, the
weights, when asked for, the rank's heads ``(B, H/N, L, S)``. ALiBi takes its heads'
slopes and a mask with a head dimension its heads' rows (``SelfAttention.local_heads``).
H and K must be multiples of N (``validate_tensor_parallel``): a vanilla layer's single
head, or MQA's single kv head, cannot be split.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) needs nothing from the layer: it
shards every parameter by rows over the mesh (``torch.chunk``, so any shape), gathers
them before the forward and the backward, and reduce-scatters the gradients, averaged
over the ranks as DDP averages them. The two compose on a 2-D mesh:
``tensor_parallel(layer, mesh["tp"])``, then ``fully_shard(layer, mesh=mesh["dp"])``.

Example (each of N processes, after ``torch.distributed.init_process_group``)::

    mesh = init_device_mesh("cuda", (N,))
    tensor_parallel(attn, mesh)                  # H/N heads of w_q, w_k, w_v per rank
    out, _ = attn(x, need_weights=False)         # x, out: (B, L, E) on every rank

Shape legend: B batch, L length, N ranks, H query heads, K kv heads, D head width,
E model width.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from .base import SelfAttention

__all__ = ["tensor_parallel", "tensor_parallel_plan", "validate_tensor_parallel"]


def validate_tensor_parallel(layer: SelfAttention, shards: int) -> None:
    """``ValueError`` unless the layer's query and kv heads split evenly over ``shards``
    ranks (whole heads per rank)."""
    num_heads, num_kv_heads = layer.num_heads, layer.num_kv_heads
    if num_heads % shards or num_kv_heads % shards:
        raise ValueError(
            f"{type(layer).__name__}: tensor parallelism over {shards} devices splits the "
            f"heads, so num_heads and num_kv_heads must be multiples of {shards}; got "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )


def tensor_parallel_plan(prefix: str = "") -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of a layer: ``w_q``, ``w_k``, ``w_v``
    ``ColwiseParallel`` (by heads), ``w_o`` ``RowwiseParallel``. ``prefix`` is the layer's
    path in a larger model ending in a dot (``"blocks.0.attn."``), to merge into that
    model's plan; validate the layer with ``validate_tensor_parallel`` then."""
    return {
        f"{prefix}w_q": ColwiseParallel(),
        f"{prefix}w_k": ColwiseParallel(),
        f"{prefix}w_v": ColwiseParallel(),
        f"{prefix}w_o": RowwiseParallel(),
    }


def tensor_parallel(layer: SelfAttention, mesh: DeviceMesh) -> SelfAttention:
    """Split ``layer``'s heads over the 1-D ``mesh`` in place (``parallelize_module`` with
    ``tensor_parallel_plan``) and return it; its parameters become DTensors. Every rank
    then calls it on the same whole input."""
    if mesh.ndim != 1:
        raise ValueError(
            f"tensor_parallel needs a 1-D device mesh (slice a larger one, e.g. "
            f'mesh["tp"]); got {mesh.ndim} dimensions'
        )
    validate_tensor_parallel(layer, mesh.size())
    return parallelize_module(layer, mesh, tensor_parallel_plan())

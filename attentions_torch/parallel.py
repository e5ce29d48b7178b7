"""Sequence parallelism: a sequence sharded over the ranks of a process group (SPEC §13).

Each rank of a ``torch.distributed`` process group holds ``Ll = L / N`` positions of the
sequence; a layer called with ``sequence_parallel=group`` (or ``SequenceParallel(group,
layout)``) projects its shard and attends to the whole sequence by **ring attention**:
N steps, at step s the local queries attend to the key/value block of rank
``(r - s) mod N``, each step's output and log-sum-exp merged in float32 or wider, and
the block passed on to rank ``r + 1`` with point-to-point ops (gloo on CPU, NCCL on
GPU). No rank holds more than three key/value blocks at once (its own, the one it
attends to, the one in flight), and a step's scores are made ``QUERY_CHUNK`` queries at a
time, so memory per rank is O(Ll·D) plus ``(chunk, Ll)`` scores per head. Grouped
attention passes its K kv heads, not H.
The backward is the ring again (FlashAttention-2 style: the scores are recomputed from
q, k and the saved log-sum-exp), each key/value block travelling with the gradient
accumulated for it, so every rank ends with the gradient of its own keys and values.

Layouts (which positions a shard holds):

* ``"contiguous"``: shard r holds ``r·Ll .. (r+1)·Ll - 1``;
* ``"zigzag"``: the sequence is cut into 2N chunks of ``c = Ll / 2``; shard r holds
  chunk r and chunk ``2N - 1 - r``. Causal attention then costs every rank the same
  (the first chunk's queries see few keys, the last's many), as ring-flash-attn and
  MaxText do it. ``to_layout`` / ``from_layout`` reorder a whole sequence into it and
  back.

Causal attention and ALiBi are stated on the global positions, and RoPE rotates q and k
at them, so the sharded layer computes the single-device function. Lengths that do not
split evenly (L % N, or L % 2N for zigzag) are refused with a ``ValueError``, and so are
shards of different shapes on different ranks.

Example (each of N processes, after ``torch.distributed.init_process_group``)::

    shards = dist.get_world_size()
    x_local = to_layout(x, shards, "zigzag").chunk(shards, dim=1)[dist.get_rank()]
    out, _ = attn(x_local, is_causal=True, need_weights=False,
                  sequence_parallel=SequenceParallel(None, "zigzag"))   # (B, Ll, E)

Shape legend: B batch, L global length, N shards, Ll = L / N local length, H query heads,
K kv heads (G = H / K query heads per kv head), D head width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "LAYOUTS",
    "SequenceParallel",
    "as_sequence_parallel",
    "check_call",
    "from_layout",
    "ring_attention",
    "shard_positions",
    "to_layout",
]

LAYOUTS = ("contiguous", "zigzag")

QUERY_CHUNK = 1024
"""Queries whose scores against one key/value block are made at once, forward and
backward: ``(B, H, chunk, Ll)`` scores in float32 or wider."""

_KV_TAG, _GRAD_TAG = 0, 1
"""Message tags of the two kinds of blocks that travel the ring in the backward."""


class SequenceParallel(NamedTuple):
    """How a layer's input is sharded: the process ``group`` (``None``: the default
    group) and the ``layout``."""

    group: dist.ProcessGroup | None
    layout: str = "contiguous"


def as_sequence_parallel(spec: dist.ProcessGroup | SequenceParallel) -> SequenceParallel:
    """A layer's ``sequence_parallel`` argument as a ``SequenceParallel``, validated: a
    bare process group means the contiguous layout."""
    if isinstance(spec, dist.ProcessGroup):
        spec = SequenceParallel(spec)
    if not isinstance(spec, SequenceParallel) or not (
        spec.group is None or isinstance(spec.group, dist.ProcessGroup)
    ):
        raise ValueError(
            "sequence_parallel must be a process group or SequenceParallel(group, layout), "
            f"got {spec!r}"
        )
    _check_layout(spec.layout)
    return spec


def check_call(
    layer: str,
    *,
    need_weights: bool,
    mask: object,
    context: object,
    dropping: bool,
) -> None:
    """``ValueError`` for what a sequence-parallel call does not take (before any
    communication)."""
    refused = [
        ("need_weights=True (the (L, L) weights would gather the sequence)", need_weights),
        ("a mask (positions and is_causal state the pattern)", mask is not None),
        ("context (cross-attention)", context is not None),
        ("dropout in training", dropping),
    ]
    for what, given in refused:
        if given:
            raise ValueError(f"{layer}: sequence_parallel does not take {what}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_split(length: int, shards: int, layout: str) -> None:
    """``ValueError`` unless ``length`` splits into ``shards`` equal shards (``2·shards``
    chunks for zigzag)."""
    pieces = shards * (2 if layout == "zigzag" else 1)
    if length % pieces:
        raise ValueError(
            f"a sequence of {length} positions does not split evenly into {pieces} "
            f"{'chunks (2 per shard, zigzag)' if layout == 'zigzag' else 'shards'}: "
            "unevenly split shards are refused; pad the sequence to a multiple (with "
            "is_causal, padding at the end changes no real token's output)"
        )


def shard_positions(
    rank: int, shards: int, local_length: int, layout: str = "contiguous"
) -> Tensor:
    """``(Ll,)`` int64 on the CPU: the global positions shard ``rank`` holds."""
    _check_layout(layout)
    _check_split(local_length * shards, shards, layout)
    if layout == "contiguous":
        return rank * local_length + torch.arange(local_length)
    chunk = local_length // 2
    within = torch.arange(chunk)
    return torch.cat((rank * chunk + within, (2 * shards - 1 - rank) * chunk + within))


def _order(length: int, shards: int, layout: str) -> Tensor:
    """``(L,)`` the global positions in shard order: shard 0's, then shard 1's, ..."""
    _check_layout(layout)
    _check_split(length, shards, layout)
    local = length // shards
    return torch.cat([shard_positions(r, shards, local, layout) for r in range(shards)])


def to_layout(x: Tensor, shards: int, layout: str, dim: int = 1) -> Tensor:
    """Reorder a whole sequence (positions along ``dim``) so that
    ``x.chunk(shards, dim)[r]`` is shard r's part in ``layout``. The identity for
    ``"contiguous"``."""
    if layout == "contiguous":
        _check_split(x.shape[dim], shards, layout)
        return x
    return x.index_select(dim, _order(x.shape[dim], shards, layout).to(x.device))


def from_layout(x: Tensor, shards: int, layout: str, dim: int = 1) -> Tensor:
    """The inverse of ``to_layout``: positions back in order."""
    if layout == "contiguous":
        _check_split(x.shape[dim], shards, layout)
        return x
    inverse = torch.argsort(_order(x.shape[dim], shards, layout))
    return x.index_select(dim, inverse.to(x.device))


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q ``(B, H, Ll, D)``, k and v ``(B, K, Ll, D)`` with ``H % K == 0``."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            "ring_attention expects q of shape (B, H, Ll, D) and k, v of shape (B, K, Ll, D), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, heads, local, d_head = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, local, d_head) or heads % k.shape[1]:
        raise ValueError(
            f"ring_attention expects k and v of shape ({batch}, K, {local}, {d_head}) with "
            f"{heads} % K == 0, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )


def _check_equal_shards(q: Tensor, k: Tensor, group: dist.ProcessGroup | None) -> None:
    """``ValueError`` on every rank unless all ranks hold shards of the same shapes (a
    point-to-point receive of the wrong size would hang or fail inside the backend)."""
    shape = torch.tensor([*q.shape, *k.shape], dtype=torch.int64, device=q.device)
    largest, smallest = shape.clone(), -shape
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(smallest, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = largest.tolist(), (-smallest).tolist()
    if largest != smallest:
        raise ValueError(
            "every rank must hold a shard of the same shape: q (B, H, Ll, D) and k/v "
            f"(B, K, Ll, D) range from {smallest[:4]}/{smallest[4:]} to "
            f"{largest[:4]}/{largest[4:]} over the group: unevenly split shards are refused"
        )


class _InFlight(NamedTuple):
    """A block on its way from the previous rank."""

    works: list
    received: Tensor

    def wait(self) -> Tensor:
        for work in self.works:
            work.wait()
        return self.received


class _Ring(NamedTuple):
    """This rank's place in the ring: its ``rank`` of ``shards`` in ``group``, the global
    ranks it sends to and receives from, and the ``layout`` of ``local`` positions."""

    group: dist.ProcessGroup | None
    rank: int
    shards: int
    send_to: int
    receive_from: int
    layout: str
    local: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None, layout: str, local: int) -> _Ring:
        rank, shards = dist.get_rank(group), dist.get_world_size(group)
        world = dist.group.WORLD if group is None else group
        send_to = dist.get_global_rank(world, (rank + 1) % shards)
        receive_from = dist.get_global_rank(world, (rank - 1) % shards)
        return cls(group, rank, shards, send_to, receive_from, layout, local)

    def source(self, step: int) -> int:
        """The rank whose key/value block this rank holds at ``step``."""
        return (self.rank - step) % self.shards

    def positions(self, rank: int) -> Tensor:
        return shard_positions(rank, self.shards, self.local, self.layout)

    def pass_on(self, block: Tensor, tag: int) -> _InFlight:
        """Send ``block`` to the next rank and receive the previous rank's in its place."""
        received = torch.empty_like(block)
        works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, block, self.send_to, self.group, tag),
                dist.P2POp(dist.irecv, received, self.receive_from, self.group, tag),
            ]
        )
        return _InFlight(works, received)


def _block_scores(
    q: Tensor,
    k: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    scale: float,
    slopes: Tensor | None,
    is_causal: bool,
) -> Tensor:
    """Scores ``(B, K, G, c, Ll)`` of c queries ``(B, K, G, c, D)`` to one block's keys
    ``(B, K, Ll, D)``: scaled, ALiBi added (slopes ``(K, G, 1, 1)``), hidden keys -inf."""
    # (B, K, G, c, D) x (B, K, Ll, D) -> (B, K, G, c, Ll): a kv head serves its G query heads
    scores = torch.einsum("bkgcd,bksd->bkgcs", q, k) * scale
    distance = query_positions[:, None] - key_positions[None, :]
    if slopes is not None:
        scores -= slopes * distance.abs().to(scores.dtype)
    if is_causal:
        scores.masked_fill_(distance < 0, -math.inf)
    return scores


def _row_chunks(length: int):
    for start in range(0, length, QUERY_CHUNK):
        yield start, min(start + QUERY_CHUNK, length)


def _block_forward(
    q: Tensor, k: Tensor, v: Tensor, query_positions: Tensor, key_positions: Tensor, **options
) -> tuple[Tensor, Tensor]:
    """Attention of q ``(B, K, G, Ll, D)`` to one block k, v ``(B, K, Ll, D)``: the output
    ``(B, K, G, Ll, D)`` and log-sum-exp ``(B, K, G, Ll)`` (0 and -inf for a query that sees
    none of the block's keys)."""
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1])
    for start, stop in _row_chunks(q.shape[3]):
        scores = _block_scores(
            q[:, :, :, start:stop], k, query_positions[start:stop], key_positions, **options
        )
        top = scores.amax(dim=-1, keepdim=True)
        top.masked_fill_(top == -math.inf, 0.0)
        weights = (scores - top).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        out[:, :, :, start:stop] = torch.einsum("bkgcs,bksd->bkgcd", weights, v) / (
            total.masked_fill(total == 0.0, 1.0)
        )
        lse[:, :, :, start:stop] = (top + total.log()).squeeze(-1)
    return out, lse


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial attentions over disjoint key sets as one, weighted by their
    ``exp(lse)``; a query blind to both keeps output 0 and lse -inf."""
    total = torch.logaddexp(lse, block_lse)
    finite = total.masked_fill(total == -math.inf, 0.0)
    old, new = (lse - finite).exp()[..., None], (block_lse - finite).exp()[..., None]
    return out * old + block_out * new, total


def _block_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad_out: Tensor,
    lse: Tensor,
    delta: Tensor,
    grad_q: Tensor,
    grad_kv: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    scale: float,
    **options,
) -> None:
    """One block's share of the gradients, added in place: to ``grad_q``
    ``(B, K, G, Ll, D)`` and to ``grad_kv`` ``(2, B, K, Ll, D)`` (keys, values).

    q, grad_out ``(B, K, G, Ll, D)``; k, v ``(B, K, Ll, D)``; lse (of all keys) and
    ``delta = rowsum(dO ∘ O)`` ``(B, K, G, Ll)``. With P = exp(S - lse):
    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - delta), dQ = dS K · scale, dK = dSᵀ Q · scale.
    """
    lse = lse.masked_fill(lse == -math.inf, 0.0)
    for start, stop in _row_chunks(q.shape[3]):
        rows = slice(start, stop)
        scores = _block_scores(
            q[:, :, :, rows], k, query_positions[rows], key_positions, scale=scale, **options
        )
        weights = (scores - lse[:, :, :, rows, None]).exp_()
        grad_rows = grad_out[:, :, :, rows]
        grad_kv[1] += torch.einsum("bkgcs,bkgcd->bksd", weights, grad_rows)
        grad_weights = torch.einsum("bkgcd,bksd->bkgcs", grad_rows, v)
        grad_scores = weights.mul_(grad_weights.sub_(delta[:, :, :, rows, None])).mul_(scale)
        grad_q[:, :, :, rows] += torch.einsum("bkgcs,bksd->bkgcd", grad_scores, k)
        grad_kv[0] += torch.einsum("bkgcs,bkgcd->bksd", grad_scores, q[:, :, :, rows])


def _grouped(x: Tensor, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """``(B, H, Ll, D) -> (B, K, G, Ll, D)`` in ``dtype``."""
    batch, heads, local, d_head = x.shape
    return x.to(dtype).reshape(batch, kv_heads, heads // kv_heads, local, d_head)


class _RingAttention(torch.autograd.Function):
    """Ring attention with the ring backward (point-to-point ops are not autograd-aware)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, ring, is_causal, scale, query_positions):
        acc = torch.promote_types(q.dtype, torch.float32)
        kv_heads = k.shape[1]
        if slopes is not None:
            slopes = slopes.to(device=q.device, dtype=acc).reshape(kv_heads, -1, 1, 1)
        options = {"scale": scale, "slopes": slopes, "is_causal": is_causal}
        last_query = int(query_positions.max())
        query_positions = query_positions.to(q.device)
        grouped_q = _grouped(q, kv_heads, acc)
        out = torch.zeros_like(grouped_q)
        lse = torch.full(grouped_q.shape[:-1], -math.inf, dtype=acc, device=q.device)
        block = torch.stack((k, v))
        for step in range(ring.shards):
            incoming = ring.pass_on(block, _KV_TAG) if step + 1 < ring.shards else None
            key_positions = ring.positions(ring.source(step))
            # a block entirely after the last query is hidden by causality: skip it
            if not (is_causal and int(key_positions.min()) > last_query):
                block_out, block_lse = _block_forward(
                    grouped_q,
                    block[0].to(acc),
                    block[1].to(acc),
                    query_positions,
                    key_positions.to(q.device),
                    **options,
                )
                out, lse = _merge(out, lse, block_out, block_lse)
            if incoming is not None:
                block = incoming.wait()
        out = out.reshape(q.shape).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, query_positions)
        ctx.ring, ctx.options, ctx.last_query = ring, options, last_query
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, query_positions = ctx.saved_tensors
        ring, options = ctx.ring, ctx.options
        acc, kv_heads = lse.dtype, k.shape[1]
        grouped_q = _grouped(q, kv_heads, acc)
        grad_out = _grouped(grad_out, kv_heads, acc)
        delta = (grad_out * _grouped(out, kv_heads, acc)).sum(dim=-1)
        grad_q = torch.zeros_like(grouped_q)
        block = torch.stack((k, v))
        # the gradient of the block held, travelling with it: back at its owner at the end
        grad_kv = torch.zeros(block.shape, dtype=acc, device=q.device)
        for step in range(ring.shards):
            incoming = ring.pass_on(block, _KV_TAG) if step + 1 < ring.shards else None
            key_positions = ring.positions(ring.source(step))
            if not (options["is_causal"] and int(key_positions.min()) > ctx.last_query):
                _block_backward(
                    grouped_q,
                    block[0].to(acc),
                    block[1].to(acc),
                    grad_out,
                    lse,
                    delta,
                    grad_q,
                    grad_kv,
                    query_positions,
                    key_positions.to(q.device),
                    **options,
                )
            if ring.shards > 1:
                grad_kv = ring.pass_on(grad_kv, _GRAD_TAG).wait()
            if incoming is not None:
                block = incoming.wait()
        grad_k, grad_v = grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype)
        return grad_q.reshape(q.shape).to(q.dtype), grad_k, grad_v, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    is_causal: bool = False,
    scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    query_positions: Tensor | None = None,
) -> Tensor:
    """Attention of this rank's queries to the whole sequence sharded over ``group``.

    Args:
      q: ``(B, H, Ll, D)``, this rank's queries; k, v: ``(B, K, Ll, D)``, its keys and
        values (``H % K == 0``; the K kv heads go around the ring). Every rank of the
        group calls this with shards of the same shapes.
      group: the process group the sequence is sharded over (N ranks; ``None``: the
        default group).
      layout: ``"contiguous"`` or ``"zigzag"`` (module docstring).
      is_causal, scale, alibi_slopes: as ``functional.dot_product_attention``, on the
        global positions; the slopes ``(H,)`` are constants (no gradient flows to them).
      query_positions: ``(Ll,)`` this shard's positions, if already computed.

    Returns:
      ``(B, H, Ll, D)`` in q's dtype: the single-device fast path's rows of this shard.
      Differentiable in q, k and v (the backward is a second ring).
    """
    _check_shapes(q, k, v)
    _check_layout(layout)
    ring = _Ring.of(group, layout, q.shape[2])
    _check_split(ring.shards * q.shape[2], ring.shards, layout)
    if ring.shards > 1:
        _check_equal_shards(q, k, group)
    if query_positions is None:
        query_positions = ring.positions(ring.rank)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(
        q, k, v, alibi_slopes, ring, is_causal, scale, query_positions.cpu()
    )

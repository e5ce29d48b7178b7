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
at them, so the sharded layer computes the single-device function.

The other mechanisms (``attend_sharded`` on their classes) exchange what their pattern
needs, never the sequence:

* local (half window ``h``): each chunk of c positions (``Ll``, or ``Ll / 2`` zigzag)
  receives the last h keys/values of the chunk before it in the sequence and, unless
  causal, the first h of the chunk after it (``halo_exchange``: point-to-point with
  the neighbours, O(h·H·D) per rank whatever L; the gradients go back the same way),
  then attends with its compact kernel. ``h > c`` is refused;
* block (size b): nothing when b divides c (every chunk starts a block); else, with the
  contiguous layout only, the ``b - 1`` keys/values on each side of the shard;
* dilated (rate r, dividing c): the residue classes become heads and go around the
  ring above, the class sequences sharded in the same layout;
* linear: the state ``phi(K)ᵀ[V, 1]`` ``(B, H, D, D + 1)`` summed over the ranks
  (``sum_shards``), or when causal every chunk's state gathered (``gather_shards``)
  and the sum of those before a chunk added to its causal sums. Lengths that do not
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
    "check_equal_shards",
    "chunk_keep",
    "from_layout",
    "gather_shards",
    "halo_exchange",
    "ring_attention",
    "shard_chunks",
    "shard_positions",
    "sum_shards",
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


def check_equal_shards(q: Tensor, k: Tensor, group: dist.ProcessGroup | None) -> None:
    """``ValueError`` on every rank unless all ranks hold shards of the same shapes: q
    ``(B, H, Ll, D)`` and k ``(B, K, Ll, D)`` (a point-to-point receive of the wrong size
    would hang or fail inside the backend). One small all-reduce."""
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
        check_equal_shards(q, k, group)
    if query_positions is None:
        query_positions = ring.positions(ring.rank)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(
        q, k, v, alibi_slopes, ring, is_causal, scale, query_positions.cpu()
    )


def shard_chunks(rank: int, shards: int, layout: str) -> tuple[int, ...]:
    """The global indices of the chunks shard ``rank`` holds, in its order: ``(r,)`` of N
    chunks of ``Ll`` (contiguous), ``(r, 2N - 1 - r)`` of 2N chunks of ``Ll / 2`` (zigzag)."""
    _check_layout(layout)
    return (rank,) if layout == "contiguous" else (rank, 2 * shards - 1 - rank)


def _home(chunk: int, shards: int, layout: str) -> tuple[int, int]:
    """The (group rank, slot) holding global chunk ``chunk``."""
    if layout == "contiguous" or chunk < shards:
        return chunk, 0
    return 2 * shards - 1 - chunk, 1


class _Rows(NamedTuple):
    """Rows ``rows`` of the chunk in slot ``source`` moving to the halo ``side`` (0: before,
    1: after) of the chunk in slot ``slot``; ``peer`` the other rank (a global rank), or
    ``None`` when both chunks are this rank's; ``tag`` the message's (the destination
    chunk and side: both ends agree on it, and sort their messages by it, as NCCL matches
    a pair's messages in order)."""

    slot: int
    side: int
    source: int
    rows: slice
    peer: int | None
    tag: int


class _Halos(NamedTuple):
    """One halo exchange planned on this rank (plain Python: the rank is known): the
    halos filled from this rank's own chunks (``local``), received (``incoming``, with
    ``source`` the slot on the sending rank) and this rank's rows that other ranks need
    (``outgoing``, with ``slot`` the destination's). Halos past an end of the sequence
    are in none of them (left zero)."""

    group: dist.ProcessGroup | None
    before: int
    after: int
    chunk: int
    local: tuple[_Rows, ...]
    incoming: tuple[_Rows, ...]
    outgoing: tuple[_Rows, ...]

    @classmethod
    def of(
        cls, group: dist.ProcessGroup | None, layout: str, chunk: int, before: int, after: int
    ) -> _Halos:
        rank, shards = dist.get_rank(group), dist.get_world_size(group)
        world = dist.group.WORLD if group is None else group
        count = shards * (2 if layout == "zigzag" else 1)
        # side 0: the last `before` rows of chunk g - 1; side 1: the first `after` of g + 1
        sides = ((-1, before, slice(chunk - before, chunk)), (1, after, slice(0, after)))
        local, incoming, outgoing = [], [], []
        for slot, index in enumerate(shard_chunks(rank, shards, layout)):
            for side, (step, size, rows) in enumerate(sides):
                if size == 0:
                    continue
                if 0 <= index + step < count:  # this chunk's halo on this side
                    peer, source = _home(index + step, shards, layout)
                    tag = 2 * index + side
                    if peer == rank:
                        local.append(_Rows(slot, side, source, rows, None, tag))
                    else:
                        global_peer = dist.get_global_rank(world, peer)
                        incoming.append(_Rows(slot, side, source, rows, global_peer, tag))
                if 0 <= index - step < count:  # the halo on this side of a neighbour
                    peer, target = _home(index - step, shards, layout)
                    if peer != rank:
                        tag = 2 * (index - step) + side
                        global_peer = dist.get_global_rank(world, peer)
                        outgoing.append(_Rows(target, side, slot, rows, global_peer, tag))
        return cls(
            group,
            before,
            after,
            chunk,
            tuple(local),
            tuple(sorted(incoming, key=_tag)),
            tuple(sorted(outgoing, key=_tag)),
        )

    def region(self, side: int) -> slice:
        """Where the halo of ``side`` lies in an extended chunk."""
        return slice(0, self.before) if side == 0 else slice(self.before + self.chunk, None)

    def own(self) -> slice:
        """Where the chunk itself lies in an extended chunk."""
        return slice(self.before, self.before + self.chunk)


def _tag(rows: _Rows) -> int:
    return rows.tag


def _send_receive(
    group: dist.ProcessGroup | None,
    sends: list[tuple[Tensor, int, int]],
    receives: list[tuple[Tensor, int, int]],
) -> None:
    """Every point-to-point message of a halo exchange, as ``(tensor, global peer, tag)``:
    posted in one batch and waited for. The one place halo bytes leave a rank (a test
    counts them here)."""
    ops = [dist.P2POp(dist.isend, t, peer, group, tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group, tag) for t, peer, tag in receives]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _halo_buffer(like: Tensor, rows: _Rows) -> Tensor:
    """An empty ``(..., rows, D)`` message like a ``(..., n, c, D)`` shard."""
    size = rows.rows.stop - rows.rows.start
    return like.new_empty((*like.shape[:-3], size, like.shape[-1]))


class _HaloExchange(torch.autograd.Function):
    """``(..., n, c, D) -> (..., n, before + c + after, D)``: each chunk between its halos.

    The backward sends each halo's gradient back to the rank it came from and adds the
    gradients received to the rows that were sent (point-to-point ops are not
    autograd-aware)."""

    @staticmethod
    def forward(ctx, chunks, plan):
        received = [_halo_buffer(chunks, rows) for rows in plan.incoming]
        sends = [
            (chunks[..., out.source, out.rows, :].contiguous(), out.peer, out.tag)
            for out in plan.outgoing
        ]
        receives = [
            (buffer, rows.peer, rows.tag)
            for buffer, rows in zip(received, plan.incoming, strict=True)
        ]
        _send_receive(plan.group, sends, receives)
        extended = chunks.new_zeros(
            (*chunks.shape[:-2], plan.before + plan.chunk + plan.after, chunks.shape[-1])
        )
        extended[..., plan.own(), :] = chunks
        for rows in plan.local:
            extended[..., rows.slot, plan.region(rows.side), :] = chunks[
                ..., rows.source, rows.rows, :
            ]
        for buffer, rows in zip(received, plan.incoming, strict=True):
            extended[..., rows.slot, plan.region(rows.side), :] = buffer
        ctx.plan = plan
        return extended

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_extended):
        plan = ctx.plan
        grad = grad_extended[..., plan.own(), :].clone()
        for rows in plan.local:
            grad[..., rows.source, rows.rows, :] += grad_extended[
                ..., rows.slot, plan.region(rows.side), :
            ]
        returned = [_halo_buffer(grad, out) for out in plan.outgoing]
        sends = [
            (
                grad_extended[..., rows.slot, plan.region(rows.side), :].contiguous(),
                rows.peer,
                rows.tag,
            )
            for rows in plan.incoming
        ]
        receives = [
            (buffer, out.peer, out.tag) for buffer, out in zip(returned, plan.outgoing, strict=True)
        ]
        _send_receive(plan.group, sends, receives)
        for buffer, out in zip(returned, plan.outgoing, strict=True):
            grad[..., out.source, out.rows, :] += buffer
        return grad, None


def halo_exchange(
    x: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    before: int,
    after: int,
) -> Tensor:
    """Each chunk of this rank's shard between the rows of its neighbours in the global
    chunk order: the sparse patterns' one exchange (local windows, straddling blocks).

    Args:
      x: ``(..., Ll, D)``, this rank's shard (positions on the second-to-last axis),
        ``n`` chunks of ``c`` (``n = 1``, ``c = Ll`` contiguous; ``n = 2``, ``c = Ll / 2``
        zigzag). Every rank of the group calls this with shards of the same shapes
        (``check_equal_shards`` first).
      group, layout: as ``ring_attention``.
      before, after: how many rows of the previous / next chunk each chunk needs, at
        most c (only neighbouring chunks are exchanged).

    Returns:
      ``(..., n, before + c + after, D)``: per chunk ``[last before rows of chunk g - 1,
      chunk g, first after rows of chunk g + 1]``, zero rows where g - 1 or g + 1 lies
      past an end of the sequence (callers hide them). Differentiable in x. Each rank
      sends ``O((before + after)·n)`` rows per call and as many back in the backward,
      whatever L; neighbouring chunks on the same rank are copied, not sent.
    """
    _check_layout(layout)
    shards = dist.get_world_size(group)
    slots = len(shard_chunks(0, shards, layout))
    _check_split(shards * x.shape[-2], shards, layout)
    chunk = x.shape[-2] // slots
    if before > chunk or after > chunk:
        raise ValueError(
            f"halo_exchange: halos of {before} and {after} rows need chunks of at least "
            f"that many positions, got {chunk}"
        )
    plan = _Halos.of(group, layout, chunk, before, after)
    return _HaloExchange.apply(x.unflatten(-2, (slots, chunk)), plan)


def chunk_keep(
    chunk: int,
    count: int,
    *,
    before: int,
    length: int,
    after: int,
    device: torch.device | None = None,
) -> Tensor | None:
    """``(1, 1, 1, before + length + after)`` key keep-mask of an extended chunk of
    ``halo_exchange`` (global chunk ``chunk`` of ``count``): the halo rows past an end of
    the sequence hidden; ``None`` when both neighbours exist."""
    hide_before, hide_after = chunk == 0 and before > 0, chunk == count - 1 and after > 0
    if not (hide_before or hide_after):
        return None
    keep = torch.ones(before + length + after, dtype=torch.bool, device=device)
    if hide_before:
        keep[:before] = False
    if hide_after:
        keep[before + length :] = False
    return keep[None, None, None]


class _SumShards(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradients: every rank's
    loss reads the sum."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_shards(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of ``x`` (same shape on every rank) over the group's ranks, differentiable
    (the gradient of every rank's copy is summed back to each input)."""
    return _SumShards.apply(x, group)


class _GatherShards(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered stack and
    keeps this rank's row."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        pieces = [
            torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(dist.get_world_size(group))
        ]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.stack(pieces)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def gather_shards(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``(N, *x.shape)``: every rank's ``x`` (same shape on every rank) by group rank,
    differentiable in x."""
    return _GatherShards.apply(x, group)

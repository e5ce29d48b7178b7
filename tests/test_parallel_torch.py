"""Sequence parallelism in PyTorch (``attentions_torch.parallel``, SPEC §13).

The sharded layers run in 4 gloo processes that this module starts (it is also their
script: ``python tests/test_parallel_torch.py RANK PORT OUT``): every case over the 4
ranks, then over ranks 1 and 3 (N = 2, group ranks that are not the global ones), and the
bytes local attention's halo exchange sends at two lengths. Each group's rank 0 writes
each case's largest errors against the single-device layer to a JSON file that the tests
read. The layouts, positions and the checks made before any communication are tested in
this process, without a process group.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attentions_torch as at
from attentions_torch import parallel
from attentions_torch.parallel import (
    LAYOUTS,
    SequenceParallel,
    from_layout,
    shard_positions,
    to_layout,
)
from tests.multiprocess import launch_ranks

WORLD = 4
PAIR = (1, 3)
SHARD_COUNTS = (len(PAIR), WORLD)
BATCH, LENGTH = 2, 16
TOLERANCE = 1e-10
Group = dist.ProcessGroup | None

MECHANISMS: dict[str, Callable[[], at.SelfAttention]] = {
    "vanilla": lambda: at.VanillaSelfAttention(8, bias=True),
    "multi_head": lambda: at.MultiHeadSelfAttention(16, 4, input_dim=12),
    "grouped": lambda: at.GroupedSelfAttention(16, 4, 2, temperature=0.7),
    "mqa": lambda: at.GroupedSelfAttention(16, 4, 1, bias=True),
    "grouped_rope": lambda: at.GroupedSelfAttention(16, 4, 2, rope=True, rope_base=500000.0),
    "alibi": lambda: at.ALiBiSelfAttention(16, 4),
    "alibi_6_heads": lambda: at.ALiBiSelfAttention(24, 6, bias=True),
    "rotary": lambda: at.RotarySelfAttention(16, 4),
    "rotary_halves": lambda: at.RotarySelfAttention(16, 4, rope_interleaved=False),
    "local": lambda: at.LocalSelfAttention(16, window_size=5, num_heads=4),
    "local_rope": lambda: at.LocalSelfAttention(16, 2, 4, bias=True, rope=True),
    "block_aligned": lambda: at.BlockSelfAttention(16, block_size=2, num_heads=4),
    "block_straddling": lambda: at.BlockSelfAttention(16, block_size=3, num_heads=2, bias=True),
    "dilated": lambda: at.DilatedSelfAttention(16, dilation_rate=2, num_heads=4),
    "dilated_4": lambda: at.DilatedSelfAttention(16, dilation_rate=4, num_heads=2, rope=True),
    "linear": lambda: at.LinearSelfAttention(16, num_heads=4),
    "linear_relu": lambda: at.LinearSelfAttention(16, 2, feature_map="relu", bias=True),
}
"""The dense family, with GQA, MQA, ALiBi for a head count that is no power of two, and
both RoPE layouts; then the sparse patterns and linear attention. At N = 4 local's half
window h = 2 is a whole zigzag chunk (L/2N = 2), and h = 1 (window 2) with RoPE; blocks
of 2 align with every chunk (no exchange), blocks of 3 straddle the shards at every
residue (contiguous only); dilation 4 needs L = 32 for zigzag chunks of 4."""

LENGTHS = {"dilated_4": 32}
"""Sequence lengths other than ``LENGTH``."""

CONTIGUOUS_ONLY = {"block_straddling"}

CASES = [
    f"{name}-{'causal' if causal else 'full'}-{layout}"
    for name, causal, layout in itertools.product(MECHANISMS, (False, True), LAYOUTS)
    if layout == "contiguous" or name not in CONTIGUOUS_ONLY
]


def _largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _gather(local: torch.Tensor, group: Group, shards: int, layout: str) -> torch.Tensor:
    """The whole sequence, in order, from every rank's ``(B, Ll, ...)`` shard."""
    pieces = [torch.empty_like(local) for _ in range(shards)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return from_layout(torch.cat(pieces, dim=1), shards, layout)


def _compare(case: str, group: Group, shards: int) -> dict[str, float]:
    """Largest errors of the sharded layer's output, input gradient and parameter
    gradients against the same layer on the whole sequence, float64."""
    name, pattern, layout = case.split("-")
    is_causal = pattern == "causal"
    torch.manual_seed(0)
    layer = MECHANISMS[name]().double()
    length = LENGTHS.get(name, LENGTH)
    x = torch.randn(BATCH, length, layer.input_dim, dtype=torch.float64)
    cotangent = torch.randn(BATCH, length, layer.d_model, dtype=torch.float64)

    whole = x.clone().requires_grad_()
    expected, _ = layer(whole, is_causal=is_causal, need_weights=False)
    (expected * cotangent).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    rank = dist.get_rank(group)
    local = to_layout(x, shards, layout).chunk(shards, dim=1)[rank].clone().requires_grad_()
    out, weights = layer(
        local,
        is_causal=is_causal,
        need_weights=False,
        sequence_parallel=SequenceParallel(group, layout),
    )
    assert weights is None
    local_cotangent = to_layout(cotangent, shards, layout).chunk(shards, dim=1)[rank]
    (out * local_cotangent).sum().backward()
    errors = {
        "out": _largest(_gather(out.detach(), group, shards, layout), expected),
        "x": _largest(_gather(local.grad, group, shards, layout), whole.grad),
    }
    for param_name, param in layer.named_parameters():
        # each rank's parameter gradient covers its shard's share of the loss
        dist.all_reduce(param.grad, group=group)
        errors[param_name] = _largest(param.grad, expected_grads[param_name])
    return errors


def _uneven(group: dist.ProcessGroup) -> str:
    """Ranks with shards of different lengths (a bare group: contiguous): every rank
    refuses the call."""
    layer = at.MultiHeadSelfAttention(16, 4).double()
    x = torch.randn(1, 4 + 2 * dist.get_rank(group), 16, dtype=torch.float64)
    try:
        layer(x, need_weights=False, sequence_parallel=group)
    except ValueError as error:
        return str(error)
    return "no error"


def _local_bytes(group: Group, shards: int) -> list[dict[str, int]]:
    """Bytes each rank sends in local attention's halo exchanges, forward and backward,
    at two lengths in each layout (counted where every message is posted,
    ``parallel._send_receive``): one dict per rank of the group."""
    sent: list[int] = []
    post = parallel._send_receive

    def counting(group_: Group, sends: list, receives: list) -> None:
        sent.append(sum(t.numel() * t.element_size() for t, _, _ in sends))
        post(group_, sends, receives)

    parallel._send_receive = counting
    counts = {}
    try:
        for layout, length in itertools.product(LAYOUTS, (LENGTH, 2 * LENGTH)):
            sent.clear()
            layer = MECHANISMS["local"]().double()
            local = torch.randn(BATCH, length // shards, 16, dtype=torch.float64)
            local.requires_grad_()
            spec = SequenceParallel(group, layout)
            out, _ = layer(local, need_weights=False, sequence_parallel=spec)
            out.sum().backward()
            counts[f"{layout}-{length}"] = sum(sent)
    finally:
        parallel._send_receive = post
    gathered: list = [None] * shards
    dist.all_gather_object(gathered, counts, group=group)
    return gathered


def worker(rank: int, port: int, out: str) -> None:
    """One of ``WORLD`` ranks: every case over all of them (the default group) and over
    ranks 1 and 3 (a group whose ranks are not the global ones); then the unequal shards.
    Each group's rank 0 writes its results to ``out/results_{N}.json``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        pair = dist.new_group(list(PAIR))
        for shards, group in ((WORLD, None), (len(PAIR), pair)):
            if group is not None and rank not in PAIR:
                continue
            results: dict[str, object] = {}
            for index, case in enumerate(CASES):
                # a third of the cases cut each step's queries into chunks of 3 (Ll = 4 or 8)
                parallel.QUERY_CHUNK = 3 if index % 3 == 0 else 1024
                results[case] = _compare(case, group, shards)
            parallel.QUERY_CHUNK = 1024
            results["uneven"] = _uneven(dist.group.WORLD if group is None else group)
            results["local_bytes"] = _local_bytes(group, shards)
            if dist.get_rank(group) == 0:
                Path(out, f"results_{shards}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _launch(out: Path) -> dict[int, dict[str, object]]:
    """Run ``WORLD`` gloo processes of this module's ``worker``; the results by N."""
    launch_ranks(__file__, WORLD, out)
    return {n: json.loads(Path(out, f"results_{n}.json").read_text()) for n in SHARD_COUNTS}


def test_sharded_layers_match_one_device(tmp_path):
    """Every case over N = 4 and 2 gloo processes: output, input gradient and every
    parameter gradient within 1e-10 of one device (float64); shards of unequal lengths
    refused on every rank. One test, so that pytest-xdist starts the processes once."""
    results = _launch(tmp_path)
    failures = {
        f"N={shards} {case}": errors
        for shards in SHARD_COUNTS
        for case in CASES
        if max((errors := results[shards][case]).values()) > TOLERANCE
    }
    assert not failures, failures
    for shards in SHARD_COUNTS:
        assert "unevenly split shards are refused" in results[shards]["uneven"], shards
    # local attention sends the same halos whatever L: per rank and message (forward and
    # back), keys and values of B·H·h·D float64 (h = 2, D = 4), to each neighbour
    counts = results[WORLD]["local_bytes"]
    for layout in LAYOUTS:
        assert [c[f"{layout}-{LENGTH}"] for c in counts] == [
            c[f"{layout}-{2 * LENGTH}"] for c in counts
        ], counts
    message = 2 * 2 * BATCH * 4 * 2 * 4 * 8
    assert [c[f"contiguous-{LENGTH}"] for c in counts] == [message * n for n in (1, 2, 2, 1)]
    # zigzag: rank 3 holds chunks 3 and 4, neighbours of each other
    assert [c[f"zigzag-{LENGTH}"] for c in counts] == [message * n for n in (2, 4, 4, 2)]
    pair = results[len(PAIR)]["local_bytes"]
    assert pair[0] == {key: message * (1 if "contiguous" in key else 2) for key in pair[0]}


def test_shard_positions():
    assert shard_positions(1, 4, 4, "contiguous").tolist() == [4, 5, 6, 7]
    # 2N = 8 chunks of 2: shard 1 holds chunks 1 and 6
    assert shard_positions(1, 4, 4, "zigzag").tolist() == [2, 3, 12, 13]
    assert shard_positions(0, 2, 4, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(0, 1, 4, "zigzag").tolist() == [0, 1, 2, 3]
    for layout in LAYOUTS:
        held = torch.cat([shard_positions(r, 4, 6, layout) for r in range(4)])
        assert sorted(held.tolist()) == list(range(24))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", (1, -1))
def test_to_layout_and_back(layout, dim):
    shards, length = 4, 24
    x = torch.randn(2, length, 3).movedim(1, dim)
    arranged = to_layout(x, shards, layout, dim=dim)
    for rank, piece in enumerate(arranged.chunk(shards, dim=dim)):
        expected = x.index_select(dim, shard_positions(rank, shards, length // shards, layout))
        assert torch.equal(piece, expected)
    assert torch.equal(from_layout(arranged, shards, layout, dim=dim), x)


@pytest.mark.parametrize(
    ("layout", "length", "pieces"),
    [("contiguous", 10, "into 4 shards"), ("zigzag", 12, "into 8 chunks")],
)
def test_uneven_length_is_refused(layout, length, pieces):
    x = torch.zeros(1, length, 2)
    for reorder in (to_layout, from_layout):
        with pytest.raises(ValueError, match=f"{length} positions .* {pieces}.*refused"):
            reorder(x, 4, layout)


def test_odd_zigzag_shard_is_refused():
    with pytest.raises(ValueError, match="8 chunks"):
        shard_positions(0, 4, 3, "zigzag")


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_positions(0, 2, 4, "striped")
    with pytest.raises(ValueError, match="layout must be one of"):
        at.MultiHeadSelfAttention(8, 2)(
            torch.zeros(1, 4, 8), need_weights=False, sequence_parallel=SequenceParallel(None, "x")
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({}, "need_weights=True"),
        ({"need_weights": False, "mask": torch.ones(4, 4, dtype=torch.bool)}, "a mask"),
        ({"need_weights": False, "context": torch.zeros(1, 4, 8)}, "context"),
    ],
)
def test_refused_calls(call, message):
    """Checked before any communication: no process group is needed to see them."""
    layer = at.MultiHeadSelfAttention(8, 2)
    with pytest.raises(ValueError, match=f"sequence_parallel does not take {message}"):
        layer(torch.zeros(1, 4, 8), sequence_parallel=SequenceParallel(None), **call)


def test_dropout_in_training_is_refused():
    layer = at.MultiHeadSelfAttention(8, 2, dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout in training"):
        layer(torch.zeros(1, 4, 8), need_weights=False, sequence_parallel=SequenceParallel(None))


@pytest.mark.parametrize(
    ("layer", "layout", "message"),
    [
        (
            at.LocalSelfAttention(8, window_size=7, num_heads=2),
            "zigzag",
            r"window_size // 2 = 3 <= the chunk length L/2N = 2 \(L = 16, N = 4, zigzag\)"
            ".* fewer shards",
        ),
        (
            at.LocalSelfAttention(8, window_size=10, num_heads=2),
            "contiguous",
            r"window_size // 2 = 5 <= the chunk length L/N = 4 \(L = 16, N = 4\)",
        ),
        (
            at.DilatedSelfAttention(8, dilation_rate=4, num_heads=2),
            "zigzag",
            r"dilation_rate = 4 to divide the chunk length L/2N = 2",
        ),
        (
            at.DilatedSelfAttention(8, dilation_rate=3, num_heads=2),
            "contiguous",
            r"dilation_rate = 3 to divide the chunk length L/N = 4",
        ),
        (
            at.BlockSelfAttention(8, block_size=3, num_heads=2),
            "zigzag",
            r"layout='zigzag' needs block_size = 3 to divide the chunk length L/2N = 2 "
            ".* layout='contiguous'",
        ),
        (
            at.BlockSelfAttention(8, block_size=6, num_heads=2),
            "contiguous",
            r"block_size - 1 = 5 <= the shard length L/N = 4 ",
        ),
    ],
    ids=[
        "local-zigzag",
        "local-contiguous",
        "dilated-zigzag",
        "dilated-contiguous",
        "block-zigzag",
        "block-too-wide",
    ],
)
def test_patterns_that_do_not_fit_the_shards_are_refused(monkeypatch, layer, layout, message):
    """Refused before any communication: 4 ranks are pretended, and no process group
    exists for a message to go through."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: WORLD)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    with pytest.raises(ValueError, match=message):
        layer(
            torch.zeros(1, LENGTH // WORLD, 8),
            need_weights=False,
            sequence_parallel=SequenceParallel(None, layout),
        )


def test_sequence_parallel_must_be_a_group():
    with pytest.raises(ValueError, match="process group or SequenceParallel"):
        at.MultiHeadSelfAttention(8, 2)(
            torch.zeros(1, 4, 8), need_weights=False, sequence_parallel="sequence"
        )


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

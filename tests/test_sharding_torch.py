"""Sharded parameters in PyTorch (``attentions_torch.sharding``, SPEC §13).

The layers run in 4 gloo processes that this module starts (it is also their script:
``python tests/test_sharding_torch.py RANK PORT OUT``), on a 1-D mesh of the 4 ranks and
on a 2 x 2 ``("dp", "tp")`` mesh: tensor parallelism (heads split by ``ColwiseParallel``
and ``RowwiseParallel``) over 4 and over 2 ranks, FSDP2 (``fully_shard``, each rank its
own rows of the batch) over 4 and over 2, and both at once on the 2 x 2 mesh. Every rank
writes each case's largest errors against the single-device layer (float64: output,
input gradient and every parameter gradient of the fast path, ``need_weights=False``; the
output and weights of the weights path), the share of each parameter it holds, and the
errors it was refused with, to a JSON file that the tests read.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

import attentions_torch as at
from attentions_torch.sharding import (
    tensor_parallel,
    tensor_parallel_plan,
    validate_tensor_parallel,
)
from tests.multiprocess import launch_ranks

WORLD = 4
BATCH, LENGTH = 4, 7
TOLERANCE = 1e-10

CASES: dict[str, tuple[Callable[[], at.SelfAttention], dict[str, object]]] = {
    "vanilla": (lambda: at.VanillaSelfAttention(8, bias=True), {}),
    "multi_head": (
        lambda: at.MultiHeadSelfAttention(16, 4, input_dim=12, bias=True),
        {"mask": "heads"},
    ),
    "cross": (lambda: at.MultiHeadSelfAttention(16, 4, context_dim=6), {"context": 5}),
    "local": (lambda: at.LocalSelfAttention(16, 3, 4), {"mask": "padding"}),
    "grouped": (
        lambda: at.GroupedSelfAttention(32, 8, 4, temperature=0.7, rope=True, rope_base=5e5),
        {},
    ),
    "mqa": (lambda: at.GroupedSelfAttention(16, 4, 1, bias=True), {}),
    "dilated": (lambda: at.DilatedSelfAttention(16, 2, 4), {"mask": "heads"}),
    "linear": (lambda: at.LinearSelfAttention(16, 4, bias=True), {}),
    "block": (lambda: at.BlockSelfAttention(16, 3, 4), {"mask": "padding"}),
    "alibi": (lambda: at.ALiBiSelfAttention(24, 12), {"mask": "heads"}),
    "rotary": (lambda: at.RotarySelfAttention(16, 4, rope_interleaved=False), {}),
}
"""Every mechanism, with per-head and padding masks (which a rank must cut to its heads
and its rows), cross-attention, GQA with RoPE, and ALiBi with 12 heads (no power of two,
so each rank's slopes are not a rescaled copy of another's)."""

SPLIT = {"tp": ("tp",), "fsdp": ("dp",), "2d": ("tp", "dp")}
"""How each mode shards: over which mesh dimensions (``"tp"`` the heads, ``"dp"`` FSDP2
and the batch rows)."""
RUNS = {
    "tp4": ("tp", 4, False),
    "tp2": ("tp", 2, True),
    "fsdp4": ("fsdp", 4, True),
    "fsdp2": ("fsdp", 2, False),
    "2d": ("2d", 4, True),
}
"""name: (mode, ranks sharding the parameters, is_causal): each mechanism causal and not
under tensor parallelism and under FSDP2 (cross-attention never causal)."""


def _largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _data(name: str, layer: at.SelfAttention) -> dict[str, torch.Tensor | None]:
    """The whole batch's input, context, mask and output cotangent, the same on every rank."""
    _, call = CASES[name]
    generator = torch.Generator().manual_seed(1)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    keys = call.get("context", LENGTH)
    mask = None
    if call.get("mask") == "heads":
        mask = torch.rand(BATCH, layer.num_heads, LENGTH, keys, generator=generator) < 0.7
    elif call.get("mask") == "padding":
        mask = at.padding_mask(torch.tensor([7, 3, 5, 1]), LENGTH)
    return {
        "x": normal(BATCH, LENGTH, layer.input_dim),
        "context": normal(BATCH, keys, layer.context_dim) if "context" in call else None,
        "mask": mask,
        "cotangent": normal(BATCH, LENGTH, layer.d_model),
    }


def _run(layer: at.SelfAttention, name: str, rows: slice, causal: bool) -> dict[str, object]:
    """Output and gradients of the layer's fast path on the batch's ``rows``, loss
    ``sum(out * cotangent)``, then its output and weights from the weights path."""
    data = {k: None if v is None else v[rows] for k, v in _data(name, layer).items()}
    x = data["x"].clone().requires_grad_()
    call = {"context": data["context"], "is_causal": causal and data["context"] is None}
    out, _ = layer(x, data["mask"], need_weights=False, **call)
    (out * data["cotangent"]).sum().backward()
    grads = {}
    for param_name, param in layer.named_parameters():
        grad = param.grad
        grads[param_name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    with torch.no_grad():
        slow, weights = layer(data["x"], data["mask"], **call)
    return {"out": out.detach(), "slow": slow, "weights": weights, "x": x.grad, "params": grads}


def _layer(name: str) -> at.SelfAttention:
    torch.manual_seed(0)
    return CASES[name][0]().double()


def _share(mesh: DeviceMesh, total: int) -> slice:
    """This rank's contiguous block of ``total`` rows or heads split over ``mesh``."""
    size = total // mesh.size()
    return slice(mesh.get_local_rank() * size, (mesh.get_local_rank() + 1) * size)


def _compare(
    name: str, mode: str, meshes: dict[str, DeviceMesh], causal: bool
) -> dict[str, object]:
    """The sharded layer's largest errors against one device, and the share of each
    parameter this rank holds."""
    expected = _run(_layer(name), name, slice(None), causal)
    layer = _layer(name)
    if "tp" in SPLIT[mode]:
        tensor_parallel(layer, meshes["tp"])
    if "dp" in SPLIT[mode]:
        fully_shard(layer, mesh=meshes["dp"])
    # FSDP is data parallel: each rank its rows of the batch
    rows = _share(meshes["dp"], BATCH) if "dp" in SPLIT[mode] else slice(None)
    heads = _share(meshes["tp"], layer.num_heads) if "tp" in SPLIT[mode] else slice(None)
    held = {
        n: (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) / p.numel()
        for n, p in layer.named_parameters()
    }
    got = _run(layer, name, rows, causal)
    # FSDP averages the gradients over its ranks, as DDP does
    averaged = meshes["dp"].size() if "dp" in SPLIT[mode] else 1
    errors = {
        "out": _largest(got["out"], expected["out"][rows]),
        "slow": _largest(got["slow"], expected["out"][rows]),
        "weights": _largest(got["weights"], expected["weights"][rows][:, heads]),
        "x": _largest(got["x"], expected["x"][rows]),
    }
    for param_name, grad in got["params"].items():
        errors[param_name] = _largest(grad * averaged, expected["params"][param_name])
    return {"errors": errors, "held": held}


def _refused(make: Callable[[], None]) -> str:
    try:
        make()
    except ValueError as error:
        return str(error)
    return "no error"


def worker(rank: int, port: int, out: str) -> None:
    """One of ``WORLD`` ranks: every case in every run (each mode on the meshes it takes),
    then the refused ones; writes ``out/results_{rank}.json``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        line = init_device_mesh("cpu", (WORLD,))
        square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        meshes = {4: {"tp": line, "dp": line}, 2: {"tp": square["tp"], "dp": square["dp"]}}
        results: dict[str, object] = {}
        for run, (mode, shards, causal) in RUNS.items():
            on = meshes[2 if mode == "2d" else shards]
            results[run] = {
                name: _compare(name, mode, on, causal)
                for name in CASES
                if "tp" not in SPLIT[mode] or _fits(name, on["tp"])
            }
        results["refused"] = {
            "vanilla": _refused(lambda: tensor_parallel(_layer("vanilla"), line)),
            "mqa": _refused(lambda: tensor_parallel(_layer("mqa"), square["tp"])),
            "mesh": _refused(lambda: tensor_parallel(_layer("multi_head"), square)),
            "part_of_a_head": _refused(lambda: _plan_only(at.MultiHeadSelfAttention(12, 3), line)),
            "uneven_alibi": _refused(lambda: _plan_only(at.ALiBiSelfAttention(14, 7), line)),
        }
        Path(out, f"results_{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _fits(name: str, mesh: DeviceMesh) -> bool:
    """The layer's heads split over ``mesh`` (the others are refused, below)."""
    layer = _layer(name)
    return layer.num_heads % mesh.size() == 0 and layer.num_kv_heads % mesh.size() == 0


def _plan_only(layer: at.SelfAttention, mesh: DeviceMesh) -> None:
    """The plan applied without ``tensor_parallel``'s checks, and the layer called."""
    parallelize_module(layer, mesh, tensor_parallel_plan())
    layer(torch.randn(1, 3, layer.input_dim))


def _launch(out: Path) -> list[dict[str, object]]:
    """Run ``WORLD`` gloo processes of this module's ``worker``; each rank's results."""
    launch_ranks(__file__, WORLD, out)
    return [json.loads(Path(out, f"results_{rank}.json").read_text()) for rank in range(WORLD)]


def test_sharded_layers_match_one_device(tmp_path):
    """Tensor parallel over 4 and 2 ranks, FSDP2 over 4 and 2, both on 2 x 2: on every
    rank, output, weights (the rank's heads and rows), input gradient and every parameter
    gradient within 1e-10 of one device (float64); each rank holds its share of the
    parameters; what cannot shard is refused. One test, so that pytest-xdist starts the
    processes once."""
    results = _launch(tmp_path)
    failures = {
        f"rank {rank} {run} {name}": case["errors"]
        for rank, result in enumerate(results)
        for run in RUNS
        for name, case in result[run].items()
        if max(case["errors"].values()) > TOLERANCE
    }
    assert not failures, failures
    for run, (mode, _, _) in RUNS.items():
        expected = set(CASES) - ({"vanilla", "mqa"} if "tp" in SPLIT[mode] else set())
        assert set(results[0][run]) == expected, run
    _check_shares(results)
    _check_refusals(results)


def _check_shares(results: list[dict[str, object]]) -> None:
    """Tensor parallel: 1/N of w_q, w_k, w_v (weights and biases) and of w_o's weight, all
    of w_o's bias; FSDP2: 1/N of every parameter (rows split by ``torch.chunk``: MQA's w_k
    of 4 rows over 4 ranks is one row each); both: 1/4 of each, 1/2 of w_o's bias."""
    for rank, result in enumerate(results):
        for run, (mode, shards, _) in RUNS.items():
            for name, case in result[run].items():
                for param_name, held in case["held"].items():
                    expected = 1 / shards
                    if param_name == "w_o.bias" and mode != "fsdp":
                        expected = 1 / 2 if mode == "2d" else 1.0
                    assert held == expected, (rank, run, name, param_name, held)


def _check_refusals(results: list[dict[str, object]]) -> None:
    refused = results[0]["refused"]
    assert refused["vanilla"] == (
        "VanillaSelfAttention: tensor parallelism over 4 devices splits the heads, so "
        "num_heads and num_kv_heads must be multiples of 4; got num_heads=1, num_kv_heads=1"
    )
    assert "num_heads=4, num_kv_heads=1" in refused["mqa"]
    assert "needs a 1-D device mesh" in refused["mesh"]
    assert "gives 3 features, not whole heads of 4" in refused["part_of_a_head"]
    for result in results:  # w_q's 14 rows split 4, 4, 4, 2 (torch.chunk), not 3.5 each
        assert "w_q's rows must be split by whole heads of 2" in result["refused"]["uneven_alibi"]


@pytest.mark.parametrize(
    ("layer", "shards", "given"),
    [
        (at.MultiHeadSelfAttention(24, 6), 4, "num_heads=6, num_kv_heads=6"),
        (at.GroupedSelfAttention(16, 4, 2), 4, "num_heads=4, num_kv_heads=2"),
        (at.LinearSelfAttention(16), 2, "num_heads=1, num_kv_heads=1"),
    ],
    ids=["heads", "kv_heads", "one_head"],
)
def test_heads_must_split_evenly(layer, shards, given):
    with pytest.raises(ValueError, match=f"over {shards} devices splits the heads.*got {given}"):
        validate_tensor_parallel(layer, shards)
    validate_tensor_parallel(layer, 1)


def test_unsharded_layer_holds_every_head():
    assert at.ALiBiSelfAttention(24, 12).local_heads() == slice(0, 12)


def test_plan():
    plan = tensor_parallel_plan("blocks.0.attn.")
    assert sorted(plan) == [f"blocks.0.attn.{p}" for p in ("w_k", "w_o", "w_q", "w_v")]
    assert {type(style).__name__ for style in plan.values()} == {
        "ColwiseParallel",
        "RowwiseParallel",
    }


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

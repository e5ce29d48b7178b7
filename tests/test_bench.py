"""``python -m parity.bench``: its counts, its references, its meters, and tiny full runs."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace

import jax
import numpy as np
import pytest
import torch

import attentions_torch
from parity import devices, mechanisms
from parity.bench import (
    Cell,
    exit_code,
    jax_runs,
    main,
    parse_args,
    run,
    torch_runs,
    useful_flops,
    visible_pairs,
)
from parity.bench import decode as bench_decode
from parity.bench import targets as bench_targets
from parity.bench.cases import alibi_slopes
from parity.bench.decode import QUICK_DECODE_SIZES, bytes_per_token, decode_checks, step_cell
from parity.bench.measure import peak_cuda_growth, peak_rss_growth, time_interleaved
from parity.bench.plan import bench_size, reference_pattern
from parity.bench.report import format_checks
from parity.bench.runner import Bench, Measurement, Planner
from parity.bench.targets import Check, failures
from parity.mechanisms import MECHANISMS, Mechanism, by_name
from tests.reference import softmax_attention

MASK_BUILDERS = {
    "local": attentions_torch.local_mask,
    "dilated": attentions_torch.dilated_mask,
    "block": attentions_torch.block_mask,
}


@pytest.mark.parametrize("pattern", ["dense", "local", "dilated", "block"])
@pytest.mark.parametrize("size", [1, 3, 4, 64])
@pytest.mark.parametrize("length", [1, 13, 100])
@pytest.mark.parametrize("is_causal", [False, True])
def test_visible_pairs_counts_the_mask(pattern, size, length, is_causal):
    mask = torch.ones(length, length, dtype=torch.bool)
    if pattern != "dense":
        mask = MASK_BUILDERS[pattern](length, size)
    if is_causal:
        mask = mask & attentions_torch.causal_mask(length)
    assert visible_pairs(pattern, size, length, is_causal) == int(mask.sum())


def test_alibi_slopes_follow_the_paper():
    assert np.allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    assert np.allclose(alibi_slopes(1), [2.0**-8])
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads
    assert np.allclose(alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]))


def test_useful_flops_of_a_dense_layer():
    case = by_name("multi_head")  # H = 8, D = 64
    cell = Cell("multi_head", "torch", "layer", "layer", 1024, "fwd")
    projections = 4 * 2 * 1024 * 512 * 512
    attention = 4 * 8 * 64 * 1024 * 1024
    assert useful_flops(case, cell) == projections + attention
    backward = Cell("multi_head", "torch", "layer", "core", 1024, "fwdbwd")
    assert useful_flops(case, backward) == 3 * attention


def _runnable(framework):
    return [m for m in MECHANISMS if m.softmax and m.available(framework)]


def _output(workload):
    out = workload.run()
    return np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float64)


# JAX compiles ~1 s per program: one case per hand-written path (plain, GQA, RoPE, bias)
JAX_BY_HAND = ("multi_head", "grouped", "rotary", "alibi")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_references_compute_the_same_function_as_the_layers(framework):
    """The ratios compare like with like: each "same" reference reproduces the layer."""
    runs = torch_runs if framework == "torch" else jax_runs
    for case in _runnable(framework):
        if framework == "jax" and case.name not in JAX_BY_HAND:
            continue
        for is_causal in (
            (False, True) if framework == "torch" or case.name == "alibi" else (False,)
        ):
            cell = Cell(case.name, framework, "layer", "layer", 70, "fwd", is_causal, d_model=32)
            ours = _output(runs.build(case, cell))
            same = _output(runs.build(case, Cell(**{**cell.as_dict(), "subject": "same"})))
            assert np.abs(ours - same).max() <= 1e-4 * max(1.0, np.abs(ours).max()), case.name


def test_torch_core_reference_matches_attend():
    for case in _runnable("torch"):
        cell = Cell(case.name, "torch", "layer", "core", 70, "fwd", d_model=32)
        ours = _output(torch_runs.build(case, cell))
        same = _output(torch_runs.build(case, Cell(**{**cell.as_dict(), "subject": "same"})))
        assert np.abs(ours - same).max() <= 1e-4 * max(1.0, np.abs(ours).max()), case.name


def _numpy_reference(case, q, k, v, is_causal):
    """Float64 attention of the case's pattern on ``(B, H, L, D)`` q and ``(B, K, L, D)`` k, v."""
    length = q.shape[2]
    offsets = np.arange(length)[:, None] - np.arange(length)[None, :]
    size = max(bench_size(case), 1)
    keep = {
        "local": np.abs(offsets) <= size // 2,
        "dilated": offsets % size == 0,
        "block": (np.arange(length)[:, None] // size) == (np.arange(length)[None, :] // size),
    }.get(case.pattern, np.ones((length, length), bool))
    if is_causal:
        keep = keep & (offsets >= 0)
    bias = None
    if case.pattern == "alibi":
        bias = -alibi_slopes(q.shape[1])[:, None, None] * np.abs(offsets)
    return softmax_attention(q, k, v, keep, bias)[0]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_references_match_numpy_for_every_pattern(framework, is_causal):
    """The "same" kernels get each pattern's mask or bias right (no layer class needed)."""
    runs = torch_runs if framework == "torch" else jax_runs
    for case in MECHANISMS:
        if not case.softmax or case.pattern == "rope":
            continue
        workload = runs.build(
            case, Cell(case.name, framework, "same", "core", 70, "fwd", is_causal, d_model=32)
        )
        q, k, v = (np.asarray(a, np.float64) for a in workload.inputs[:3])
        out = _output(workload)
        if framework == "jax":  # the kernel's own (B, L, H, D) layout
            q, k, v, out = (a.transpose(0, 2, 1, 3) for a in (q, k, v, out))
        expected = _numpy_reference(case, q, k, v, is_causal)
        assert np.abs(out - expected).max() <= 1e-4, case.name


def test_linear_has_no_fused_reference():
    assert reference_pattern(by_name("linear"), "same", "layer") is None
    assert reference_pattern(by_name("linear"), "dense", "layer") == "dense"
    assert reference_pattern(by_name("rotary"), "same", "core") == "dense"


def test_time_interleaved_takes_turns_and_excludes_the_warmup():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("not ready")

    timings = time_interleaved([make("a"), make("b"), broken], repeats=3, budget_s=60.0)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups first, then turns
    assert [len(t.times_s) for t in timings[:2]] == [3, 3]
    assert isinstance(timings[2], RuntimeError)
    slow = time_interleaved([lambda: time.sleep(0.02)], repeats=50, budget_s=0.0)[0]
    assert len(slow.times_s) == 1  # the budget is spent after one timed call
    assert slow.times_s[0] >= 0.02


def test_peak_rss_growth_sees_an_allocation():
    size = 64 * 2**20
    grown, elapsed = peak_rss_growth(lambda: np.ones(size, dtype=np.uint8))
    if grown is None:
        pytest.skip("no resettable resident high-water mark on this system")
    assert size * 0.9 <= grown <= size * 1.5
    assert elapsed > 0.0


def _find(measurements, **fields):
    found = [m for m in measurements if all(m[k] == v for k, v in fields.items())]
    assert len(found) == 1, fields
    return found[0]


def _quick_run(tmp_path, *extra: str) -> tuple[dict, str]:
    argv = ["--quick", "--mechanism", "multi_head", "--repeats", "1", "--budget", "0"]
    argv += ["--no-progress", "--json", str(tmp_path / "bench.json"), *extra]
    args = parse_args(argv)
    args.argv = argv
    with open(tmp_path / "out.txt", "w") as out:
        run(args, out=out)
    return json.loads((tmp_path / "bench.json").read_text()), (tmp_path / "out.txt").read_text()


def test_quick_torch_run_writes_json_plots_and_target_ratios(tmp_path):
    payload, printed = _quick_run(
        tmp_path,
        *("--framework", "torch", "--device", "cpu"),
        *("--lengths", "32,64", "--plot", str(tmp_path)),
    )
    assert {"command", "machine", "config", "measurements", "rows", "targets"} <= set(payload)
    assert payload["machine"]["device"] == payload["config"]["device"] == "cpu"
    assert "accelerator" not in payload["machine"]
    assert "device" not in printed.splitlines()[1]  # the CPU header is as it was
    assert set(payload["machine"]["matmul_gflops"]) == {"torch"}
    assert payload["machine"]["matmul_gflops"]["torch"] > 0
    assert (tmp_path / "bench_multi_head.png").stat().st_size > 0
    assert (tmp_path / "bench_overview.png").stat().st_size > 0
    assert "targets (quick sizes" in printed

    measurements = payload["measurements"]
    assert [(row["framework"], row["length"]) for row in payload["rows"]] == [
        ("torch", 32),
        ("torch", 64),
    ]
    for row in payload["rows"]:
        for mode in ("fwd", "fwdbwd"):
            figures = row[mode]
            ours = _find(
                measurements, subject="layer", scope="layer", length=row["length"], mode=mode
            )
            dense = _find(measurements, subject="same", length=row["length"], mode=mode)
            assert ours["status"] == dense["status"] == "ok"
            assert figures["ms"] == pytest.approx(ours["median_s"] * 1e3)
            assert figures["x_dense"] == pytest.approx(dense["median_s"] / ours["median_s"])
            assert figures["x_same"] == figures["x_dense"]  # multi_head's own reference is dense
            flops = ours["useful_flops"] / ours["median_s"] / 1e9
            assert figures["gflops"] == pytest.approx(flops)
            assert figures["peak_mib"] > 0
            assert figures["memory_method"] == "rss"

    overhead = {c["label"]: c for c in payload["targets"]}["multi_head fwd L=128"]
    hand = _find(measurements, subject="same", scope="layer", length=128, mode="fwd")
    assert hand["tag"] != ""  # measured together with the layer, for this check
    layer = _find(
        measurements, subject="layer", scope="layer", length=128, mode="fwd", tag=hand["tag"]
    )
    assert overhead["value"] == pytest.approx(layer["median_s"] / hand["median_s"])
    assert overhead["status"] == ("met" if overhead["value"] <= 1.15 else "missed")
    efficiency = {c["label"]: c for c in payload["targets"]}["multi_head layer fwd L=256"]
    header = _find(measurements, subject="matmul", tag="")
    assert header["useful_gflops"] == payload["machine"]["matmul_gflops"]["torch"]
    measured = _find(measurements, subject="layer", scope="layer", length=256, mode="fwd")
    matmul = _find(measurements, subject="matmul", tag=measured["tag"])  # timed with the layer
    assert matmul["useful_gflops"] == pytest.approx(2 * 256**3 / matmul["median_s"] / 1e9)
    ratio = measured["useful_gflops"] / matmul["useful_gflops"]
    assert efficiency["value"] == pytest.approx(100 * ratio)


def test_quick_jax_run_reports_compile_time_and_xla_memory(tmp_path):
    payload, _ = _quick_run(tmp_path, "--framework", "jax", "--lengths", "32", "--no-targets")
    (row,) = payload["rows"]
    for mode in ("fwd", "fwdbwd"):
        assert row[mode]["compile_s"] > 0
        assert row[mode]["memory_method"] == "xla"
        assert row[mode]["peak_mib"] > 0
        assert row[mode]["x_dense"] > 0


def test_a_class_not_written_yet_is_reported_not_raised(monkeypatch):
    small = {"d_model": 32, "num_heads": 4}
    ghost = Mechanism("ghost", "GhostSelfAttention", small, small)
    monkeypatch.setattr(mechanisms, "MECHANISMS", (*MECHANISMS, ghost))
    cell = Cell("ghost", "torch", "layer", "layer", 16, "fwd")
    measured = Bench(repeats=1, budget_s=0.0, max_bytes=2**30).measure(cell)
    assert measured.status == "missing"
    assert measured.note == "GhostSelfAttention not in attentions_torch yet"
    assert Planner().measure(cell).status == "missing"
    check = Check("g", "ghost", "torch", None, 1.0, True, "x", "not available yet", measured.note)
    assert format_checks([check]).endswith(f"not available yet: {measured.note} (1 checks)")


def test_time_interleaved_meters_the_first_timed_call_only():
    metered = []

    def meter(run):
        metered.append(run)
        run()
        return 123, 0.5

    def call():
        return None

    timing, plain = time_interleaved([call, call], repeats=3, budget_s=60.0, meters=[meter, None])
    assert metered == [call]
    assert (timing.peak_bytes, timing.times_s[0]) == (123, 0.5)
    assert plain.peak_bytes is None


def _check(label: str, status: str, framework: str = "torch") -> Check:
    value = None if status in ("not available yet", "skipped", "error") else 1.5
    return Check("dense overhead", label, framework, value, 1.15, False, "x", status, "why")


NOT_FAILING = ("met", "info", "skipped", "not available yet")


def test_check_fails_on_missed_and_error_targets_and_names_them(capsys):
    found = [_check(f"{status} one", status) for status in NOT_FAILING]
    found += [_check("multi_head fwd L=2048", "missed"), _check("alibi fwd", "error", "jax")]
    assert [check.label for check in failures(found)] == ["multi_head fwd L=2048", "alibi fwd"]
    assert exit_code(found) == 1
    printed = capsys.readouterr().out
    assert "check failed: 2 of 6 targets missed or in error" in printed
    assert "[torch] multi_head fwd L=2048: 1.50x, goal <= 1.15x (missed: why)" in printed
    assert "[jax] alibi fwd: -, goal <= 1.15x (error: why)" in printed
    assert all(f"{status} one" not in printed for status in NOT_FAILING)


def test_check_passes_without_missed_targets(capsys):
    assert exit_code([_check(f"{status} one", status) for status in NOT_FAILING]) == 0
    assert exit_code([]) == 0
    assert "check passed: 1 targets met, none missed (4 checks)" in capsys.readouterr().out


def test_targets_only_implies_check_and_check_needs_targets(capsys):
    assert parse_args(["--targets-only"]).check
    assert parse_args(["--check"]).check
    assert not parse_args([]).check
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--check", "--no-targets"])
    assert stopped.value.code == 2
    assert "--check needs the targets" in capsys.readouterr().err


def test_a_missed_target_fails_the_quick_run(monkeypatch, capsys):
    """End to end: a goal no run can meet makes ``main`` return 1 and name the target."""
    monkeypatch.setitem(bench_targets.NEED_WEIGHTS_MS, "multi_head", 1e-9)
    argv = ["--quick", "--targets-only", "--mechanism", "multi_head", "--framework", "torch"]
    argv += ["--repeats", "1", "--budget", "0", "--no-progress"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    failed = printed[printed.index("check failed") :]
    assert "need_weights=True forward" in failed
    assert "[torch] multi_head: " in failed
    assert "goal <= 1e-09ms (missed" in failed


def test_devices_on_the_cpu():
    assert devices.torch_device("cpu") == torch.device("cpu")
    assert devices.jax_device("cpu").platform == "cpu"
    assert devices.require("cpu") == {
        "torch": torch.device("cpu"),
        "jax": jax.devices("cpu")[0],
    }
    assert devices.frameworks_on("cpu") == ("torch", "jax")
    assert devices.frameworks_on("tpu") == ("jax",)
    with pytest.raises(ValueError, match="--device must be one of"):
        devices.require("npu")
    with pytest.raises(ValueError, match="PyTorch cannot run on a TPU"):
        devices.torch_device("tpu")


def _present(name: str, framework: str) -> bool:
    try:
        devices.require(name, [framework])
    except devices.DeviceUnavailableError:
        return False
    return True


HAS_CUDA = torch.cuda.is_available()
HAS_JAX_GPU = _present("gpu", "jax")


@pytest.mark.parametrize(
    ("name", "framework", "message"),
    [
        ("cuda", "torch", "--device cuda: PyTorch sees no CUDA device"),
        ("gpu", "torch", "--device gpu: PyTorch sees no CUDA device"),
        ("cuda", "jax", "--device cuda: JAX has no GPU backend"),
        ("tpu", "jax", "--device tpu: JAX has no TPU backend"),
    ],
)
def test_an_absent_device_is_a_clear_error(name, framework, message, capsys):
    if _present(name, framework):
        pytest.skip(f"{framework} has a {name} device here")
    with pytest.raises(devices.DeviceUnavailableError, match=message):
        devices.require(name, [framework])
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--device", name, "--framework", framework])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_torch_on_a_tpu_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--device", "tpu", "--framework", "torch"])
    assert stopped.value.code == 2
    assert "--device tpu: PyTorch cannot run on a TPU" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA and HAS_JAX_GPU, reason="both frameworks have a GPU here")
def test_the_command_exits_nonzero_on_an_absent_device(capsys):
    """``python -m parity.bench --device cuda`` exits 2 before measuring anything."""
    with pytest.raises(SystemExit) as stopped:
        main(["--device", "cuda", "--quick", "--targets-only"])
    assert stopped.value.code == 2
    printed = capsys.readouterr()
    assert "--device cuda:" in printed.err
    assert printed.out == ""


def _same_output_as_on_cpu(runs, device, framework):
    """The workload on ``device`` computes what it computes on the CPU."""
    for subject in ("layer", "same"):
        cell = Cell("local", framework, subject, "layer", 70, "fwd", d_model=32)
        expected = _output(runs.build(by_name("local"), cell))
        workload = runs.build(by_name("local"), cell, device)
        assert np.abs(_output_on_host(workload) - expected).max() <= 1e-3


def _output_on_host(workload):
    out = workload.run()
    out = out[0] if isinstance(out, tuple) else out
    out = out.detach().cpu() if isinstance(out, torch.Tensor) else out
    return np.asarray(out, dtype=np.float64)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_torch_on_cuda(tmp_path):
    _same_output_as_on_cpu(torch_runs, devices.torch_device("cuda"), "torch")
    size = 64 * 2**20
    device = devices.torch_device("cuda")
    grown, elapsed = peak_cuda_growth(
        lambda: torch.ones(size, dtype=torch.uint8, device=device), device
    )
    assert size <= grown <= size * 1.5
    assert elapsed > 0.0
    payload, printed = _quick_run(
        tmp_path, "--framework", "torch", "--device", "cuda", "--lengths", "64", "--no-targets"
    )
    assert "device cuda: torch cuda:0" in printed
    (row,) = payload["rows"]
    for mode in ("fwd", "fwdbwd"):
        assert row[mode]["status"] == "ok"
        assert row[mode]["memory_method"] == "cuda"
        assert row[mode]["peak_mib"] > 0


@pytest.mark.skipif(not HAS_JAX_GPU, reason="JAX has no GPU backend")
def test_jax_on_gpu(tmp_path):
    _same_output_as_on_cpu(jax_runs, devices.jax_device("gpu"), "jax")
    payload, printed = _quick_run(
        tmp_path, "--framework", "jax", "--device", "gpu", "--lengths", "64", "--no-targets"
    )
    assert "device gpu: jax" in printed
    (row,) = payload["rows"]
    for mode in ("fwd", "fwdbwd"):
        assert row[mode]["status"] == "ok"
        assert row[mode]["memory_method"] == "xla"


def _decode_run(tmp_path, *extra: str) -> tuple[dict, str]:
    argv = ["--decode", "--quick", "--repeats", "1", "--budget", "0", "--no-progress"]
    argv += ["--json", str(tmp_path / "decode.json"), *extra]
    args = parse_args(argv)
    args.argv = argv
    with open(tmp_path / "out.txt", "w") as out:
        run(args, out=out)
    return json.loads((tmp_path / "decode.json").read_text()), (tmp_path / "out.txt").read_text()


def _kv_cache_bytes(kv_heads: int, d_head: int, length: int) -> int:
    """keys and values (1, K, S + 1, D) float32 and lengths (1,) int32."""
    return 2 * kv_heads * (length + 1) * d_head * 4 + 4


def test_quick_decode_run_writes_json_a_plot_and_the_targets(tmp_path):
    names = ("multi_head", "grouped", "local")
    selection = [arg for name in names for arg in ("--mechanism", name)]
    payload, printed = _decode_run(
        tmp_path, *selection, "--lengths", "32,256", "--plot", str(tmp_path)
    )
    assert {"command", "machine", "config", "measurements", "rows", "targets"} <= set(payload)
    assert payload["config"]["decode"] and payload["config"]["d_model"] == 64
    assert (tmp_path / "bench_decode.png").stat().st_size > 0
    assert "step time (ms) and cache size (MiB)" in printed
    assert "decoding targets (quick sizes" in printed

    rows = {(row["mechanism"], row["framework"], row["length"]): row for row in payload["rows"]}
    assert list(rows) == [(n, fw, s) for n in names for fw in ("torch", "jax") for s in (32, 256)]
    for framework in ("torch", "jax"):
        for length in (32, 256):
            dense, grouped = (
                rows["multi_head", framework, length],
                rows["grouped", framework, length],
            )
            assert dense["status"] == grouped["status"] == "ok"
            assert dense["ms"] > 0 and grouped["ms"] > 0
            assert dense["cache_bytes"] == _kv_cache_bytes(8, 8, length)
            assert grouped["cache_bytes"] == _kv_cache_bytes(2, 8, length)
            assert (dense["compile_s"] is not None) == (framework == "jax")
        local = [rows["local", framework, length] for length in (32, 256)]
        assert {row["status"] for row in local} <= {"ok", "missing"}  # until local decodes
        if local[0]["status"] == "ok":
            assert local[0]["cache_bytes"] == local[1]["cache_bytes"]

    targets = {(t["label"], t["framework"]): t for t in payload["targets"]}
    measurements = payload["measurements"]
    for framework in ("torch", "jax"):
        speedup = targets["multi_head S=128", framework]
        forward = _find(measurements, subject="layer", framework=framework, case="multi_head")
        step = _find(
            measurements, subject="step", framework=framework, case="multi_head", tag=forward["tag"]
        )
        assert forward["is_causal"] and step["length"] == 128
        assert speedup["value"] == pytest.approx(forward["median_s"] / step["median_s"])
        assert speedup["goal"] == 100.0 and targets["grouped S=128", framework]["goal"] is None
        memory = targets["multi_head cache S=32->256", framework]
        assert (memory["value"], memory["status"]) == (2 * 8 * 8 * 4, "met")
        assert targets["grouped / multi_head (K/H = 2/8)", framework]["value"] == 0.25
        assert ("local S=32->256", framework) in targets
    parity = targets["multi_head S=64", "jax"]
    assert parity["goal"] == 2.0 and parity["status"] in ("met", "missed")
    assert ("vanilla S=64", "jax") not in targets  # not selected


class _MadeUp:
    """A bench answering every cell at once with made-up times and cache sizes."""

    def __init__(self, seconds, cache_bytes) -> None:
        self.seconds = seconds
        self.cache_bytes = cache_bytes

    def measure_group(self, cells):
        return [
            Measurement(
                cell, "ok", times_s=[self.seconds(cell)], cache_bytes=self.cache_bytes(cell)
            )
            for cell in cells
        ]


def test_decode_target_arithmetic_on_made_up_measurements():
    sizes = QUICK_DECODE_SIZES  # dense 128, flat 32 -> 256, parity 64, d_model 64

    def seconds(cell):
        if cell.subject == "layer":  # the full forward: 50x a dense step
            return 0.050
        if cell.case == "block":  # 1 ms at S=32, 2 ms at S=256: not flat
            return 0.001 * (2 if cell.length == 256 else 1)
        if cell.case == "local":
            return 0.001 * (1.2 if cell.length == 256 else 1)
        if cell.case == "linear" and cell.framework == "jax":
            return 0.003  # 3x the PyTorch step
        return 0.001

    def cache_bytes(cell):
        per_token = bytes_per_token(by_name(cell.case), sizes.d_model)
        return 100 + per_token * cell.length * (2 if cell.case == "dilated" else 1)

    found = {(c.label, c.framework): c for c in decode_checks(_MadeUp(seconds, cache_bytes), sizes)}
    for framework in ("torch", "jax"):
        dense = found["multi_head S=128", framework]
        assert (dense.value, dense.goal, dense.status) == (pytest.approx(50.0), 100.0, "missed")
        assert dense.detail == "50.0 ms / 1.0 ms"
        assert found["alibi S=128", framework].status == "info"
        local, block = found["local S=32->256", framework], found["block S=32->256", framework]
        assert (local.value, local.status) == (pytest.approx(1.2), "met")
        assert (block.value, block.status) == (pytest.approx(2.0), "missed")
        dilated = found["dilated cache S=32->256", framework]
        assert (dilated.value, dilated.goal, dilated.status) == (1024.0, 512, "missed")
        assert found["multi_head cache S=32->256", framework].value == 512.0
        assert found["grouped cache S=32->256", framework].value == 128.0
        for name in ("local", "block", "linear"):
            memory = found[f"{name} cache S=32->256", framework]
            assert (memory.value, memory.goal, memory.status) == (0.0, 0, "met")
        share = found["grouped / multi_head (K/H = 2/8)", framework]
        assert (share.value, share.status) == (0.25, "met")
    assert (found["linear S=64", "jax"].value, found["linear S=64", "jax"].status) == (
        pytest.approx(3.0),
        "missed",
    )
    assert found["multi_head S=64", "jax"].status == "met"
    assert {c.status for c in failures(list(found.values()))} == {"missed"}


def test_a_missed_decode_target_fails_the_check(monkeypatch, capsys):
    monkeypatch.setattr(bench_decode, "DENSE_SPEEDUP", 1e12)
    argv = ["--decode", "--quick", "--targets-only", "--mechanism", "multi_head"]
    argv += ["--framework", "torch", "--repeats", "1", "--budget", "0", "--no-progress"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    failed = printed[printed.index("check failed") :]
    assert "full causal forward of S + 1 tokens / one step" in failed
    assert "[torch] multi_head S=128: " in failed
    assert "goal >= 1e+12x (missed" in failed


def test_decode_command_line(capsys):
    args = parse_args(["--decode"])
    assert args.decode and args.repeats == 50 and args.lengths is None
    assert parse_args(["--decode", "--quick"]).d_model == 64
    plain = parse_args([])
    assert (plain.modes, plain.refs, plain.scope, plain.repeats) == (
        ["fwd", "fwdbwd"],
        ["same", "dense"],
        "layer",
        5,
    )
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--decode", "--causal", "--modes", "fwd"])
    assert stopped.value.code == 2
    assert "--decode times one step of T = 1 token: --modes, --causal do not apply" in (
        capsys.readouterr().err
    )


def test_bytes_per_token_follows_the_cache_layout():
    assert [bytes_per_token(m, 512) for m in MECHANISMS] == [
        2 * 1 * 512 * 4,  # vanilla: one head of width 512
        2 * 8 * 64 * 4,  # multi_head
        2 * 2 * 64 * 4,  # grouped: K = 2 kv heads
        *[2 * 8 * 64 * 4] * 2,  # alibi, rotary
        0,  # local: a ring buffer
        2 * 8 * 64 * 4,  # dilated: every key
        0,  # block: the current block
        0,  # linear: its state
    ]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_step_workload_decodes_position_s_on_every_call(framework):
    """max_length is S + 1, so only the reset of ``lengths`` lets a step run again."""
    runs = torch_runs if framework == "torch" else jax_runs
    workload = runs.build(by_name("grouped"), step_cell("grouped", framework, 8, d_model=32))
    outs = [_output_on_host(workload) for _ in range(3)]
    assert outs[0].shape == (1, 1, 32) and np.isfinite(outs[0]).all()
    assert np.array_equal(outs[0], outs[2])  # the same position, the same contents
    assert workload.cache_bytes == 2 * 2 * 9 * 4 * 4 + 4  # K = 2, S + 1 = 9, D = 4


def test_a_layer_that_cannot_decode_yet_is_reported_missing(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise ValueError("decoding with a cache is not available for Ghost yet")

    monkeypatch.setattr(attentions_torch.MultiHeadSelfAttention, "init_cache", refuse)
    cell = step_cell("multi_head", "torch", 8, d_model=32)
    measured = Bench(repeats=1, budget_s=0.0, max_bytes=2**30).measure(cell)
    assert (measured.status, measured.note) == (
        "missing",
        "decoding with a cache is not available for Ghost yet",
    )


def test_a_memory_only_cell_is_compiled_and_never_run():
    """XLA's figures of a fwd+bwd program, without running it (no timing, no skip)."""
    case = by_name("multi_head")
    cell = Cell("multi_head", "jax", "layer", "layer", 64, "fwdbwd", d_model=32, memory_only=True)
    workload = jax_runs.build(case, cell)
    with pytest.raises(RuntimeError, match="memory-only cell is compiled, never run"):
        workload.run()
    timed = jax_runs.build(case, Cell(**{**cell.as_dict(), "memory_only": False}))
    assert 0 < workload.xla_temp_bytes == timed.xla_temp_bytes < workload.xla_bytes
    assert workload.xla_bytes == timed.xla_bytes

    bench = Bench(repeats=3, budget_s=60.0, max_bytes=0)  # nothing to run, nothing to skip
    measured = bench.measure(cell)
    assert measured.status == "ok", measured.note  # run() raising would read "error"
    assert (measured.times_s, measured.warmup_s, measured.median_s) == ([], None, None)
    assert (measured.temp_bytes, measured.peak_bytes) == (
        workload.xla_temp_bytes,
        workload.xla_bytes,
    )
    assert measured.memory_method == "xla" and measured.compile_s > 0
    assert measured.as_dict()["memory_only"] and measured.as_dict()["temp_bytes"] > 0
    assert "memory only" in cell.describe()
    assert cell.key(case) != replace(cell, memory_only=False).key(case)  # measured apart
    refused = bench.measure(replace(cell, framework="torch"))
    assert refused.status == "n/a" and "JAX" in refused.note


class _MadeUpTraining:
    """A bench answering with made-up times, and XLA bytes for memory-only cells."""

    def __init__(self, temp_bytes) -> None:
        self.temp_bytes = temp_bytes
        self.cells = []

    @staticmethod
    def seconds(cell) -> float:
        if cell.subject == "same":  # jax.nn.dot_product_attention
            return 0.45 if cell.scope == "core" and cell.mode == "fwdbwd" else 1.0
        if cell.mode == "fwd":
            return 0.05
        if (cell.framework, cell.case) == ("jax", "multi_head"):
            return 0.3  # 3x PyTorch's fwd+bwd, 6x its own forward
        if cell.case == "alibi":
            return 0.5 if cell.is_causal else 0.12
        return 0.1

    def measure_group(self, cells):
        self.cells += cells
        answers = []
        for cell in cells:
            if cell.memory_only:
                temp = self.temp_bytes(cell)
                answers.append(Measurement(cell, "ok", peak_bytes=temp + 2**20, temp_bytes=temp))
            else:
                answers.append(Measurement(cell, "ok", times_s=[self.seconds(cell)]))
        return answers


def _training_checks(bench) -> dict:
    found = bench_targets._Checks(bench, bench_targets.QUICK_SIZES)
    found.jax_dense_speedup()
    found.training_speed()
    found.alibi_training()
    found.backward_overhead()
    found.training_memory()
    return {(c.label, c.framework): c for c in found.found}


def test_training_target_arithmetic_on_made_up_measurements():
    sizes = bench_targets.QUICK_SIZES  # training 128, causal 256, memory 64 .. 1024 (at 512)

    def temp_bytes(cell):  # 0.5 MiB per token, dilated quadratic
        if cell.case == "dilated":
            return cell.length**2 * 16
        return cell.length * 2**19

    bench = _MadeUpTraining(temp_bytes)
    found = _training_checks(bench)

    kernel = {label: found[label, "jax"] for label, _ in found if "core" in label}
    assert kernel["multi_head core fwd L=128"].goal == 2.5
    core, layer = (found[f"multi_head {s} fwdbwd L=128", "jax"] for s in ("core", "layer"))
    assert (core.value, core.goal, core.status) == (pytest.approx(1.5), 2.0, "missed")
    assert (layer.value, layer.goal, layer.status) == (pytest.approx(1.0 / 0.3), 2.0, "met")
    assert found["multi_head layer fwd L=128", "jax"].goal is None

    twin = found["multi_head jax/torch fwdbwd L=128", "jax"]
    assert twin.group.startswith("training: JAX fwd+bwd time / PyTorch fwd+bwd time")
    assert (twin.value, twin.goal, twin.status) == (pytest.approx(3.0), 1.5, "missed")
    assert twin.detail == "300.0 ms / 100.0 ms"

    alibi = found["fwdbwd L=128", "torch"]
    assert (alibi.value, alibi.goal, alibi.status) == (pytest.approx(1.2), 1.3, "met")
    causal = found["fwdbwd L=256 causal", "torch"]
    assert (causal.value, causal.status) == (pytest.approx(5.0), "missed")
    timed_causal = [c for c in bench.cells if c.is_causal]
    assert {(c.case, c.length, c.mode) for c in timed_causal} == {
        ("alibi", 256, "fwdbwd"),
        ("multi_head", 256, "fwdbwd"),
    }

    for mechanism in MECHANISMS:
        for framework in ("torch", "jax"):
            overhead = found[f"{mechanism.name} fwdbwd/fwd L=128", framework]
            expected = {"multi_head": 6.0 if framework == "jax" else 2.0, "alibi": 2.4}
            assert overhead.value == pytest.approx(expected.get(mechanism.name, 2.0))
            assert overhead.goal == 3.5
            assert overhead.status == ("missed" if overhead.value > 3.5 else "met")

    dense = found["multi_head fwdbwd L=512", "jax"]
    assert (dense.value, dense.goal, dense.unit, dense.status) == (256.0, 400.0, " MiB", "met")
    assert dense.detail == "temporaries alone; outputs 1.0 MiB"
    lengths = sizes.training_memory
    for mechanism in MECHANISMS:
        for short, long in itertools.pairwise(lengths):
            growth = found[f"{mechanism.name} L={short}->{long}", "jax"]
            quadratic = mechanism.name == "dilated"
            assert growth.value == pytest.approx(4.0 if quadratic else 2.0)
            assert (growth.goal, growth.status) == (2.3, "missed" if quadratic else "met")
    memory_cells = [c for c in bench.cells if c.memory_only]
    assert len(memory_cells) == len(MECHANISMS) * len(lengths)
    assert {(c.framework, c.subject, c.scope, c.mode) for c in memory_cells} == {
        ("jax", "layer", "layer", "fwdbwd")
    }
    assert not any(c.memory_only for c in bench.cells if c.framework == "torch")

    heavy = _training_checks(_MadeUpTraining(lambda cell: cell.length * 2**21))
    dense = heavy["multi_head fwdbwd L=512", "jax"]
    assert (dense.value, dense.status) == (1024.0, "missed")
    assert {c.status for c in failures(list(found.values()))} == {"missed"}


def test_quick_run_lists_the_training_targets(tmp_path):
    payload, printed = _quick_run(tmp_path, "--targets-only", "--mechanism", "alibi")
    groups = [
        "training: JAX fwd+bwd time / PyTorch fwd+bwd time (whole layer, same sizes)",
        "training PyTorch: alibi fwd+bwd time / multi_head fwd+bwd time (whole layer)",
        "training: fwd+bwd time / forward time of the same layer (whole layer, L=128)",
        "training JAX memory: XLA temporaries of the layer's fwd+bwd (compiled, not run)",
        "training JAX memory growth when L doubles",
    ]
    for group in groups:
        assert group in printed
    targets = {(t["label"], t["framework"]): t for t in payload["targets"]}
    expected = [
        ("multi_head jax/torch fwdbwd L=128", "jax"),
        ("multi_head layer fwdbwd L=128", "jax"),
        ("fwdbwd L=128", "torch"),
        ("fwdbwd L=256 causal", "torch"),
        ("multi_head fwdbwd L=512", "jax"),
        ("alibi L=512->1024", "jax"),
        *[
            (f"{n} fwdbwd/fwd L=128", fw)
            for n in ("multi_head", "alibi")
            for fw in ("torch", "jax")
        ],
    ]
    for key in expected:
        assert targets[key]["status"] in ("met", "missed"), (key, targets[key])
    assert targets["multi_head layer fwdbwd L=128", "jax"]["goal"] == 2.0
    assert ("grouped L=512->1024", "jax") not in targets  # not selected
    measurements = payload["measurements"]
    memory = [m for m in measurements if m["memory_only"]]
    assert len(memory) == 2 * 5  # multi_head and alibi at five lengths
    for measured in memory:
        assert measured["status"] == "ok" and measured["times_s"] == []
        assert 0 < measured["temp_bytes"] < measured["peak_bytes"]
    dense = _find(measurements, memory_only=True, case="multi_head", length=512)
    assert targets["multi_head fwdbwd L=512", "jax"]["value"] == dense["temp_bytes"] / 2**20


@pytest.mark.slow
def test_sharded_command_counts_what_the_ring_sends():
    """``python -m parity.bench.sharded`` starts itself again with 4 host devices, compiles
    the sharded and the whole layer and counts the ring's traffic: N - 1 steps, each
    passing one device's K and V ``(B, K, L/N, D)`` float32 (multi-head: 8 kv heads,
    grouped: 2)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "parity.bench.sharded", "--length", "256", "--devices", "4"]
    names = ("multi_head", "grouped")
    for name in names:
        command += ["--mechanism", name]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["mechanism"] for row in rows] == list(names)
    for row, kv_heads in zip(rows, (8, 2), strict=True):
        block = 1 * kv_heads * (256 // 4) * 64 * 4
        assert row["exchanged"] == (4 - 1) * 2 * block
        assert 0 < row["forward_sharded"] < row["forward_one"]
        assert 0 < row["training_sharded"] < row["training_one"]

"""``python -m parity.bench``: the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from .. import devices
from ..mechanisms import MECHANISMS, by_name
from .decode import (
    DECODE_SIZES,
    QUICK_DECODE_SIZES,
    decode_checks,
    decode_sweep,
    format_decode_rows,
    plot_decode,
)
from .measure import machine_description
from .plan import MODES, SCOPES, Cell
from .report import format_checks, format_rows, plot, sweep
from .runner import Bench, Measurement, Planner
from .targets import FULL_SIZES, QUICK_SIZES, Check, checks, failures, format_failures

__all__ = ["exit_code", "main", "parse_args", "run"]

QUICK_LENGTHS = (64, 128)
REFERENCES = ("same", "dense")
FORWARD_ONLY = ("modes", "refs", "scope", "causal")
"""Options of the forward sweep that mean nothing to ``--decode``."""


def _list(kind, choices=None):
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if choices is not None and any(value not in choices for value in values):
            raise argparse.ArgumentTypeError(f"expected a comma list of {list(choices)}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m parity.bench",
        description="Time, memory and useful GFLOP/s of every mechanism in PyTorch and JAX, "
        "side by side with the fused references, and the speed targets of the README; "
        "with --decode, the time of one decoding step against the cache's length instead.",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="time one decoding step (T = 1 new token) against caches of S tokens, and "
        "measure the caches, instead of the forward sweep; --lengths are then the S "
        "(default 1k, 4k, 8k, 16k; quick: 32..256) and the decoding targets replace the "
        "forward ones (parity.bench.decode)",
    )
    names = [mechanism.name for mechanism in MECHANISMS]
    parser.add_argument(
        "--mechanism", action="append", choices=names, help="repeatable; default: all"
    )
    parser.add_argument(
        "--framework",
        action="append",
        choices=devices.FRAMEWORKS,
        help="repeatable; default: both (on a TPU: jax)",
    )
    parser.add_argument(
        "--device",
        choices=devices.DEVICES,
        default="cpu",
        help="where to run: cpu (default); cuda or gpu (the same: PyTorch on CUDA, JAX on its "
        "GPU backend); tpu (JAX only). An absent device is an error",
    )
    parser.add_argument(
        "--lengths",
        type=_list(int),
        help="comma list of L for every mechanism (default: 256..4096 dense, ..16384 others); "
        "with --decode, of cache lengths S",
    )
    parser.add_argument(
        "--modes",
        type=_list(str, MODES),
        help="comma list of fwd (forward) and fwdbwd (forward+backward); default: both",
    )
    parser.add_argument(
        "--refs",
        type=_list(str, REFERENCES),
        help="fused references to time beside each layer: same (the mechanism's own mask, "
        "bias or RoPE), dense (no mask); an empty string for none",
    )
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        help="layer: the whole layer from x (default); core: attention alone on q, k, v",
    )
    parser.add_argument("--causal", action="store_true", help="sweep with is_causal=True")
    parser.add_argument("--d-model", type=int, default=None, help="default 512 (quick: 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls (default 5; --decode: 50)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed calls per measurement before stopping early (default 10)",
    )
    parser.add_argument(
        "--max-gb",
        type=float,
        default=4.0,
        help="skip cells estimated to need more LxL memory than this",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--no-targets", action="store_true", help="only the sweep")
    targets.add_argument(
        "--targets-only", action="store_true", help="only the targets (implies --check)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target is missed or its measurement failed, naming each",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--plot", type=Path, help="write PNG plots to this folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.check = args.check or args.targets_only
    if args.check and args.no_targets:
        parser.error("--check needs the targets: drop --no-targets")
    given = [f"--{name}" for name in FORWARD_ONLY if getattr(args, name) not in (None, False)]
    if args.decode and given:
        parser.error(f"--decode times one step of T = 1 token: {', '.join(given)} do not apply")
    args.modes = args.modes if args.modes is not None else list(MODES)
    args.refs = args.refs if args.refs is not None else list(REFERENCES)
    args.scope = args.scope or "layer"
    _choose_frameworks(parser, args)
    args.d_model = args.d_model or (64 if args.quick else 512)
    args.repeats = args.repeats or (2 if args.quick else 5) * (10 if args.decode else 1)
    args.budget = args.budget if args.budget is not None else (1.0 if args.quick else 10.0)
    return args


def _choose_frameworks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Default ``--framework`` to those that run on ``--device``; stop on an absent device."""
    on_device = devices.frameworks_on(args.device)
    args.framework = args.framework or list(on_device)
    try:
        devices.require(args.device, args.framework)
    except devices.DeviceUnavailableError as error:
        parser.error(str(error))


class _Selection:
    """Answers for cells outside ``--mechanism``/``--framework`` with ``"unselected"``.

    The matmul (the machine's rate) belongs to no mechanism and always runs.
    """

    def __init__(self, inner, mechanisms: set[str], frameworks: set[str]) -> None:
        self.inner = inner
        self.mechanisms = mechanisms
        self.frameworks = frameworks

    def _chosen(self, cell: Cell) -> bool:
        mechanism = cell.subject == "matmul" or cell.case in self.mechanisms
        return mechanism and cell.framework in self.frameworks

    def measure_group(self, cells: list[Cell]) -> list[Measurement]:
        chosen = [cell for cell in cells if self._chosen(cell)]
        answers = iter(self.inner.measure_group(chosen) if chosen else [])
        return [
            next(answers) if self._chosen(cell) else Measurement(cell, "unselected")
            for cell in cells
        ]


def _report(bench, args) -> tuple[dict[str, float | None], list[dict], list]:
    """The matmul rates, the sweep rows and the target checks, asking ``bench`` for them."""
    sizes = replace(QUICK_SIZES if args.quick else FULL_SIZES, d_model=args.d_model)
    matmuls = bench.measure_group(
        [Cell("multi_head", fw, "matmul", "core", sizes.matmul, "fwd") for fw in args.framework]
    )
    rates = {m.cell.framework: m.gflops for m in matmuls}
    if args.decode:
        return (rates, *_decode_report(bench, args))
    rows, found = [], []
    if not args.targets_only:

        def lengths(mechanism):
            return args.lengths or (QUICK_LENGTHS if args.quick else mechanism.bench_lengths)

        rows = sweep(
            bench,
            [by_name(name) for name in args.mechanism],
            args.framework,
            lengths,
            args.modes,
            args.refs,
            scope=args.scope,
            is_causal=args.causal,
            d_model=args.d_model,
            batch=args.batch,
        )
    if not args.no_targets:
        found = checks(bench, sizes)
    return rates, rows, found


def _decode_report(bench, args) -> tuple[list[dict], list]:
    """The decode sweep's rows and the decoding checks, asking ``bench`` for them."""
    sizes = replace(QUICK_DECODE_SIZES if args.quick else DECODE_SIZES, d_model=args.d_model)
    rows, found = [], []
    if not args.targets_only:
        rows = decode_sweep(
            bench,
            [by_name(name) for name in args.mechanism],
            args.framework,
            args.lengths or sizes.lengths,
            d_model=args.d_model,
            batch=args.batch,
        )
    if not args.no_targets:
        found = decode_checks(bench, sizes)
    return rows, found


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} {five:.1f} {fifteen:.1f}"


def _header(machine: dict, rates: dict, args: argparse.Namespace) -> str:
    matmul = ", ".join(f"{fw} {rate:.1f} GFLOP/s" for fw, rate in rates.items() if rate)
    first = (
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), jax {machine['jax']}; fp32 matmul "
        f"{machine['matmul_size']}x{machine['matmul_size']}: {matmul}; load average "
        f"(1/5/15 min) {machine['load_before']} before, {machine['load_after']} after\n"
    )
    if args.decode:
        return (
            first + f"decode: B={args.batch}, T=1 new token per step, d_model={args.d_model}, "
            "fp32; a cache of S tokens (random contents, max_length S + 1, lengths set back to "
            "S before every call); PyTorch eager under inference_mode, JAX jitted with the "
            f"cache donated; median of up to {args.repeats} calls after a warm-up; cache MiB: "
            "the sum of its fields' nbytes" + _accelerator(machine)
        )
    scope = "whole layer from x" if args.scope == "layer" else "attention core on q, k, v"
    return (
        first + f"B={args.batch}, d_model={args.d_model}, fp32, {scope}, "
        f"{'causal' if args.causal else 'non-causal'}; median of up to {args.repeats} calls "
        f"after a warm-up; xsame / xdense = fused reference time / library time"
        + _accelerator(machine)
    )


def _accelerator(machine: dict) -> str:
    """The header's device line off the CPU (nothing on the CPU: the header stays as it was)."""
    if machine["device"] == "cpu":
        return ""
    return (
        f"\ndevice {machine['accelerator']}; fp32 matmuls: torch allow_tf32="
        f"{machine['torch_allow_tf32']}, jax default_matmul_precision="
        f"{machine['jax_default_matmul_precision']}"
    )


def run(args: argparse.Namespace, out=sys.stdout) -> dict:
    """Plan, measure (with a progress bar), print; return the JSON payload."""
    started = time.perf_counter()
    load_before = _load()
    args.mechanism = args.mechanism or [mechanism.name for mechanism in MECHANISMS]
    args.framework = args.framework or list(devices.frameworks_on(args.device))
    selected = (set(args.mechanism), set(args.framework))

    planner = Planner()
    _report(_Selection(planner, *selected), args)
    bench = Bench(args.repeats, args.budget, int(args.max_gb * 2**30), args.device)
    with tqdm(total=planner.count, disable=args.no_progress, unit="cell", file=sys.stderr) as bar:
        for group in planner.groups:
            bar.set_postfix_str(group[0].describe())
            bench.measure_group(group)
            bar.update(len(group))
    rates, rows, found = _report(_Selection(bench, *selected), args)
    machine = {
        **machine_description(args.device, tuple(args.framework)),
        "matmul_gflops": rates,
        "matmul_size": (QUICK_SIZES if args.quick else FULL_SIZES).matmul,
        "load_before": load_before,
        "load_after": _load(),
    }

    print(_header(machine, rates, args), file=out)
    if rows and args.decode:
        print(format_decode_rows(rows), file=out)
    elif rows:
        print(format_rows(rows, args.modes, args.refs), file=out)
    if found:
        title = ("decoding targets" if args.decode else "targets") + (
            " (quick sizes: not the sizes the goals are stated at)" if args.quick else ""
        )
        print(f"\n{title}\n{format_checks(found)}", file=out)
    problems = [m for m in bench.measurements() if m.status == "error"]
    for measurement in problems:
        print(f"error: {measurement.cell.describe()}: {measurement.note}", file=out)
    elapsed = time.perf_counter() - started
    print(f"\nfinished in {elapsed:.0f} s ({planner.count} measurements)", file=out)

    payload = {
        "command": "python -m parity.bench " + " ".join(args.argv),
        "machine": machine,
        "config": {key: value for key, value in vars(args).items() if key != "argv"},
        "measurements": [m.as_dict() for m in bench.measurements()],
        "rows": rows,
        "targets": [check.as_dict() for check in found],
        "elapsed_s": elapsed,
    }
    if args.plot and rows:
        if args.decode:
            written = [path for path in [plot_decode(rows, args.plot)] if path]
        else:
            written = plot(rows, args.framework, args.modes, args.refs, args.plot)
        print("plots: " + ", ".join(str(path) for path in written), file=out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"json: {args.json}", file=out)
    return payload


def exit_code(found: Sequence[Check], out=None) -> int:
    """``--check``'s verdict: 1 after naming every target missed or in error, else 0.

    "not available yet", "skipped" and "info" checks do not fail the run. Prints to
    ``out`` (default: standard output, after the report).
    """
    out = out or sys.stdout
    failed = failures(found)
    if failed:
        print(f"\n{format_failures(found)}", file=out)
        return 1
    met = sum(check.status == "met" for check in found)
    print(f"\ncheck passed: {met} targets met, none missed ({len(found)} checks)", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; with ``--check`` (or ``--targets-only``) exit 1 on a missed target."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    payload = run(args)
    if not args.check:
        return 0
    return exit_code([Check(**target) for target in payload["targets"]])

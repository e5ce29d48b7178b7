"""``python -m parity``: the cross-framework parity report on CPU.

For every mechanism, dtype and mask it builds the PyTorch layer, moves its weights to the
Flax twin, runs both, and prints the worst error of the output, the attention weights, the
input gradient and the parameter gradients, with PASS/FAIL against SPEC §6. Exits 1 on
any FAIL.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from .check import DTYPES, Report, compare_layers, enable_x64
from .mechanisms import MECHANISMS

MASKS = ("none", "causal", "padding")
BATCH, LENGTH = 2, 13


def _inputs(mechanism, mask_kind: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    rng = np.random.default_rng(0)
    input_dim = mechanism.kwargs.get("input_dim", mechanism.kwargs["d_model"])
    x = rng.standard_normal((BATCH, LENGTH, input_dim))
    if mask_kind == "padding":
        lengths = np.array([LENGTH, LENGTH - 4])
        mask = (np.arange(LENGTH)[None, :] < lengths[:, None])[:, None, None, :]
        return x, mask, False
    return x, None, mask_kind == "causal"


def _cell(report: Report, prefix: str) -> str:
    found = report.worst(prefix)
    return "-" if found is None else f"{found.max_abs:.1e}"


def run(mechanisms: list[str], dtypes: list[str], out=sys.stdout) -> bool:
    """Print the table; return ``True`` iff every row passes."""
    if "float64" in dtypes:
        enable_x64()
    header = (
        f"{'mechanism':<12} {'dtype':<9} {'mask':<8} {'output':>8} {'weights':>8} "
        f"{'grad x':>8} {'grad W':>8} {'worst/tol':>9}  result"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    all_passed = True
    for mechanism in MECHANISMS:
        if mechanism.name not in mechanisms:
            continue
        for dtype in dtypes:
            for mask_kind in MASKS:
                x, mask, is_causal = _inputs(mechanism, mask_kind)
                torch.manual_seed(0)
                report = compare_layers(
                    mechanism.torch_layer(),
                    mechanism.flax_layer(),
                    x,
                    mask,
                    is_causal=is_causal,
                    dtype=dtype,
                )
                worst = max(c.ratio for c in report.comparisons)
                verdict = "PASS" if report.passed else "FAIL"
                all_passed &= report.passed
                print(
                    f"{mechanism.name:<12} {dtype:<9} {mask_kind:<8} {_cell(report, 'output'):>8} "
                    f"{_cell(report, 'weights'):>8} {_cell(report, 'grad x'):>8} "
                    f"{_cell(report, 'grad w'):>8} {worst:>9.2f}  {verdict}",
                    file=out,
                )
    return all_passed


def main(argv: list[str] | None = None) -> int:
    names = [m.name for m in MECHANISMS]
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mechanism",
        action="append",
        choices=names,
        help="only this mechanism (repeatable); default: all",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="only this dtype (repeatable); default: all",
    )
    args = parser.parse_args(argv)
    passed = run(args.mechanism or names, args.dtype or list(DTYPES))
    print("all PASS" if passed else "some rows FAIL")
    return 0 if passed else 1



if __name__ == "__main__":
    sys.exit(main())

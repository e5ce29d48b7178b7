"""``python -m parity``: the cross-framework parity report (CPU, or ``--device``).

For every mechanism, dtype and mask it builds the PyTorch layer, moves its weights to the
Flax twin, runs both, and prints the largest error of the output, the attention weights,
the input gradient and the parameter gradients, with PASS/FAIL against the tolerances of
docs/semantics.md. Exits 1 on any FAIL. float32 and bfloat16 rows run in JAX's default
mode; float64 rows turn on 64-bit mode for their own comparison only. ``--nnx`` compares
the PyTorch layers against the Flax NNX layers (``attentions_jax.nnx``) instead of linen.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import devices
from .check import DTYPES, Report, compare_layers
from .mechanisms import MECHANISMS, Mechanism

MASKS = ("none", "causal", "padding")
CROSS_MASKS = ("cross", "cross+pad")
"""Cross-attention rows (mechanisms without positions): a context of ``CONTEXT`` tokens of
width ``CONTEXT_DIM``, without a mask and with the second sequence's context padded."""
BATCH, LENGTH = 2, 13
CONTEXT, CONTEXT_DIM = 17, 24
COLUMNS = ("output", "weights", "grad in", "grad W")
"""``grad in``: the inputs' gradients (x, and the context in the cross-attention rows)."""
PREFIXES = {"grad in": ("grad x", "grad context"), "grad W": ("grad w_",)}


def _padding(keys: int) -> np.ndarray:
    """``(B, 1, 1, S)`` key padding: the second sequence is 4 keys shorter."""
    lengths = np.array([keys, keys - 4])
    return (np.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]


def _inputs(mechanism: Mechanism, mask_kind: str) -> dict[str, Any]:
    """``compare_layers``' keyword arguments for one row: x, mask, is_causal, context."""
    rng = np.random.default_rng(0)
    input_dim = mechanism.kwargs.get("input_dim", mechanism.kwargs["d_model"])
    x = rng.standard_normal((BATCH, LENGTH, input_dim))
    if mask_kind in CROSS_MASKS:
        context = rng.standard_normal((BATCH, CONTEXT, CONTEXT_DIM))
        mask = _padding(CONTEXT) if mask_kind == "cross+pad" else None
        return {"x": x, "mask": mask, "is_causal": False, "context": context}
    mask = _padding(LENGTH) if mask_kind == "padding" else None
    return {"x": x, "mask": mask, "is_causal": mask_kind == "causal", "context": None}


def _row(mechanism: Mechanism, dtype: str, mask_kind: str, report: Report) -> dict[str, Any]:
    errors = {}
    for column in COLUMNS:
        found = [report.worst(p) for p in PREFIXES.get(column, (column,))]
        found = [c.max_abs for c in found if c is not None]
        errors[column] = max(found) if found else None
    return {
        "mechanism": mechanism.name,
        "dtype": dtype,
        "mask": mask_kind,
        "max_abs_error": errors,
        "worst_ratio": max(c.ratio for c in report.comparisons),
        "passed": report.passed,
    }


def run(
    mechanisms: list[str],
    dtypes: list[str],
    progress: bool = True,
    device: str = "cpu",
    nnx: bool = False,
) -> list[dict[str, Any]]:
    """Compare every (mechanism, dtype, mask) on ``device`` and return one row for each;
    the mechanisms without positions also get the cross-attention rows (``CROSS_MASKS``).
    ``nnx``: against the NNX layers instead of the linen ones."""
    cases = [
        (m, d, k)
        for m in MECHANISMS
        if m.name in mechanisms
        for d in dtypes
        for k in MASKS + (CROSS_MASKS if m.cross_attention else ())
    ]
    rows = []
    for mechanism, dtype, mask_kind in tqdm(cases, desc="parity", disable=not progress):
        inputs = _inputs(mechanism, mask_kind)
        cross = {"context_dim": CONTEXT_DIM} if inputs["context"] is not None else {}
        torch.manual_seed(0)
        report = compare_layers(
            mechanism.torch_layer(**cross),
            mechanism.nnx_layer(**cross) if nnx else mechanism.flax_layer(**cross),
            **inputs,
            dtype=dtype,
            device=device,
        )
        rows.append(_row(mechanism, dtype, mask_kind, report))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'mechanism':<12} {'dtype':<9} {'mask':<9} "
        + " ".join(f"{c:>8}" for c in COLUMNS)
        + f" {'worst/tol':>9}  result"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        errors = [row["max_abs_error"][c] for c in COLUMNS]
        cells = " ".join(f"{'-' if e is None else format(e, '.1e'):>8}" for e in errors)
        lines.append(
            f"{row['mechanism']:<12} {row['dtype']:<9} {row['mask']:<9} {cells} "
            f"{row['worst_ratio']:>9.2f}  {'PASS' if row['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)


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
    parser.add_argument(
        "--device",
        choices=devices.DEVICES,
        default="cpu",
        help="where the frameworks run: cpu (default); cuda or gpu (the same: both on the GPU); "
        "tpu (JAX on the TPU against PyTorch on the CPU). An absent device is an error",
    )
    parser.add_argument(
        "--nnx",
        action="store_true",
        help="compare against the Flax NNX layers (attentions_jax.nnx) instead of linen",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-': stdout)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        devices.require(args.device, devices.frameworks_on(args.device))
    except devices.DeviceUnavailableError as error:
        parser.error(str(error))
    rows = run(
        args.mechanism or names,
        args.dtype or list(DTYPES),
        not args.no_progress,
        args.device,
        nnx=args.nnx,
    )
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
    failed = sum(not row["passed"] for row in rows)
    summary = f"{len(rows) - failed}/{len(rows)} rows PASS" + (f", {failed} FAIL" if failed else "")
    print(summary, file=sys.stderr if args.json == "-" else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

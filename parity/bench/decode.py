"""``python -m parity.bench --decode``: what one generated token costs, against the cache's length.

For each mechanism x framework x S it times one decoding step, ``layer.decode`` of T = 1
new token (B = 1, fp32), against a cache already holding S tokens (``init_cache``, then
random contents and ``lengths`` = S: see ``torch_runs``/``jax_runs``; PyTorch eager under
``torch.inference_mode()``, JAX jitted with the cache donated), and measures the cache
itself: the sum of its fields' ``nbytes``. Then it checks the decoding targets, as ratios
measured in one run (each check's cells timed in turns with each other):

1. a dense step at S = 8192 against the full causal forward of S + 1 tokens (what a loop
   without a cache pays per token, ``need_weights=False``): at least 100x faster for
   multi_head; the rest of the dense family is reported beside it;
2. local and block steps flat in S: ``t(16384) / t(1024) <= 1.3``;
3. the jitted JAX step within 2x of the eager PyTorch step at S = 4096, every mechanism;
4. the cache's bytes per cached token as SPEC §11 has it: ``2·K·D·4`` (keys and values of
   K kv heads) for the dense family and dilated, 0 for local, block and linear (a ring
   buffer, the current block, a recurrent state); grouped's growth ``K/H`` of
   multi_head's.

Shape legend: B batch, S cached tokens, H query heads, K kv heads, D head width, E model width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import mechanisms
from ..mechanisms import Mechanism
from .plan import Cell, bench_heads
from .report import _length_label
from .runner import Measurement
from .targets import DENSE_FAMILY, Check, _Checks

__all__ = [
    "DECODE_SIZES",
    "DENSE_SPEEDUP",
    "FLAT_GROWTH",
    "JAX_OVER_TORCH",
    "QUICK_DECODE_SIZES",
    "DecodeSizes",
    "bytes_per_token",
    "decode_checks",
    "decode_sweep",
    "format_decode_rows",
    "plot_decode",
    "step_cell",
]

DENSE_SPEEDUP = 100.0
"""Target 1: full causal forward of S + 1 tokens / one dense step, at least."""
FLAT_GROWTH = 1.3
"""Target 2: a local or block step's time at the longest S over the shortest, at most."""
JAX_OVER_TORCH = 2.0
"""Target 3: the jitted JAX step's time over the eager PyTorch step's, at most."""

_FRAMEWORKS = ("torch", "jax")
_GROWING = ("dense", "alibi", "rope", "dilated")
"""The patterns whose cache holds every key (SPEC §11); the others hold a fixed amount."""


@dataclass(frozen=True)
class DecodeSizes:
    """The cache lengths of the sweep and the sizes the decoding targets are stated at."""

    d_model: int = 512
    lengths: tuple[int, ...] = (1024, 4096, 8192, 16384)
    dense: int = 8192
    parity: int = 4096
    flat: tuple[int, int] = (1024, 16384)


DECODE_SIZES = DecodeSizes()
QUICK_DECODE_SIZES = DecodeSizes(
    d_model=64, lengths=(32, 64, 128, 256), dense=128, parity=64, flat=(32, 256)
)


def step_cell(
    name: str, framework: str, length: int, d_model: int, batch: int = 1, tag: str = ""
) -> Cell:
    """The cell of one decoding step against a cache of ``length`` tokens."""
    return Cell(name, framework, "step", "layer", length, "fwd", True, d_model, batch, tag)


def bytes_per_token(mechanism: Mechanism, d_model: int, itemsize: int = 4) -> int:
    """What SPEC §11 says one more cached token costs, per sequence: keys and values of K
    kv heads (``2·K·D·itemsize``) where the cache holds every key, else nothing."""
    if mechanism.pattern not in _GROWING:
        return 0
    heads, kv_heads = bench_heads(mechanism)
    return 2 * kv_heads * (d_model // heads) * itemsize


def _figures(measured: Measurement) -> dict:
    cell = measured.cell
    cache_bytes = measured.cache_bytes
    return {
        "mechanism": cell.case,
        "framework": cell.framework,
        "length": cell.length,
        "status": measured.status,
        "note": measured.note,
        "ms": None if measured.median_s is None else measured.median_s * 1e3,
        "cache_bytes": cache_bytes,
        "cache_mib": None if cache_bytes is None else cache_bytes / 2**20,
        "compile_s": measured.compile_s,
    }


def decode_sweep(
    bench,
    mechanisms: Iterable[Mechanism],
    frameworks: Sequence[str],
    lengths: Sequence[int],
    *,
    d_model: int,
    batch: int,
) -> list[dict]:
    """One row per mechanism x framework x S: step time and cache size.

    The lengths of one mechanism and framework are timed in turns with each other, so a
    curve is measured under one machine load. ``bench``: a ``Bench`` or a ``Planner``.
    """
    rows = []
    for mechanism in mechanisms:
        for framework in frameworks:
            cells = [
                step_cell(mechanism.name, framework, length, d_model, batch) for length in lengths
            ]
            rows += [_figures(measured) for measured in bench.measure_group(cells)]
    return rows


class _DecodeChecks(_Checks):
    """Builds the decoding checks from ``bench``; one method per target."""

    def step(self, name: str, framework: str, length: int) -> Cell:
        return step_cell(name, framework, length, self.sizes.d_model)

    def dense_speedup(self) -> None:
        length = self.sizes.dense
        group = (
            f"dense step at S={length}: full causal forward of S + 1 tokens / one step "
            "(no cache / cache)"
        )
        for name in DENSE_FAMILY:
            for framework in _FRAMEWORKS:
                forward, step = self.measure(
                    self.cell(name, framework, "layer", "layer", length + 1, is_causal=True),
                    self.step(name, framework, length),
                )
                goal = DENSE_SPEEDUP if name == "multi_head" else None
                label = f"{name} S={length}"
                self.ratio(group, label, framework, forward, step, goal, at_least=True)

    def flat_in_length(self) -> None:
        short, long = self.sizes.flat
        group = f"local and block steps flat in S: t(S={long}) / t(S={short})"
        for name in ("local", "block"):
            for framework in _FRAMEWORKS:
                first, last = self.measure(
                    self.step(name, framework, short), self.step(name, framework, long)
                )
                label = f"{name} S={short}->{long}"
                self.ratio(group, label, framework, last, first, FLAT_GROWTH, at_least=False)

    def jax_against_torch(self) -> None:
        length = self.sizes.parity
        group = f"jitted JAX step / eager PyTorch step at S={length}"
        for mechanism in mechanisms.MECHANISMS:
            ours, theirs = self.measure(
                self.step(mechanism.name, "jax", length),
                self.step(mechanism.name, "torch", length),
            )
            label = f"{mechanism.name} S={length}"
            self.ratio(group, label, "jax", ours, theirs, JAX_OVER_TORCH, at_least=False)

    def cache_memory(self) -> None:
        """Bytes per cached token from the caches at two lengths. The caches take no timing
        of their own, so the sweep's cells serve (untagged)."""
        short, long = self.sizes.flat
        group = (
            f"cache bytes per cached token, S={short}->{long} (SPEC §11: 2·K·D·4 for the "
            "dense family and dilated, 0 for local, block, linear)"
        )

        def per_token(first: Measurement, last: Measurement) -> float:
            return (last.cache_bytes - first.cache_bytes) / (long - short)

        growth = {}
        for mechanism in mechanisms.MECHANISMS:
            goal = bytes_per_token(mechanism, self.sizes.d_model)
            for framework in _FRAMEWORKS:
                pair = self.bench.measure_group(
                    [self.step(mechanism.name, framework, n) for n in (short, long)]
                )
                growth[mechanism.name, framework] = pair

                def compute(first=pair[0], last=pair[1]):
                    mib = (m.cache_bytes / 2**20 for m in (last, first))
                    return per_token(first, last), "{:.2f} / {:.2f} MiB".format(*mib)

                label = f"{mechanism.name} cache S={short}->{long}"
                self.add(group, label, framework, pair, compute, goal, False, " B/tok")
        heads, kv_heads = bench_heads(mechanisms.by_name("grouped"))
        for framework in _FRAMEWORKS:
            grouped, dense = growth["grouped", framework], growth["multi_head", framework]

            def share(grouped=grouped, dense=dense):
                ours, theirs = per_token(*grouped), per_token(*dense)
                return ours / theirs, f"{ours:.0f} / {theirs:.0f} B/tok"

            label = f"grouped / multi_head (K/H = {kv_heads}/{heads})"
            goal = kv_heads / heads
            self.add(group, label, framework, (*grouped, *dense), share, goal, False, "x")


def decode_checks(bench, sizes: DecodeSizes) -> list[Check]:
    """Every decoding target check, asking ``bench`` (a ``Bench`` or a ``Planner``)."""
    found = _DecodeChecks(bench, sizes)
    found.dense_speedup()
    found.flat_in_length()
    found.jax_against_torch()
    found.cache_memory()
    return found.found


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}" if value < 1 else f"{value:.2f}"


def format_decode_rows(rows: Sequence[dict]) -> str:
    """The sweep table: one line per mechanism x framework, the step time (ms) and the
    cache (MiB) at each S, and the median compile time of the JAX step programs.

    Series none of whose steps ran are summarized under the table instead.
    """
    lengths = sorted({row["length"] for row in rows})
    columns = [("mechanism", 11), ("fw", 5)]
    columns += [(f"ms {_length_label(length)}", 8) for length in lengths]
    columns += [(f"MiB {_length_label(length)}", 8) for length in lengths]
    columns += [("jit s", 6)]
    header = " ".join(f"{title:>{width}}" for title, width in columns)
    lines = ["step time (ms) and cache size (MiB) at each cache length S", header]
    lines.append("-" * len(header))
    series: dict[tuple[str, str], dict[int, dict]] = {}
    for row in rows:
        series.setdefault((row["mechanism"], row["framework"]), {})[row["length"]] = row
    notes = []
    for (name, framework), by_length in series.items():
        if all(row["status"] != "ok" for row in by_length.values()):
            notes.append(f"{name} ({framework}): {next(iter(by_length.values()))['note']}")
            continue
        figures = [by_length.get(length, {}) for length in lengths]
        cells = [name, framework]
        cells += [_number(row.get("ms")) for row in figures]
        cells += [_number(row.get("cache_mib")) for row in figures]
        compiles = sorted(row["compile_s"] for row in figures if row.get("compile_s") is not None)
        cells.append(_number(compiles[len(compiles) // 2] if compiles else None))
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns, strict=True)))
    return "\n".join(lines + notes)


def _series(rows: Sequence[dict], name: str, framework: str, key: str):
    points = [
        (row["length"], row[key])
        for row in rows
        if (row["mechanism"], row["framework"]) == (name, framework) and row[key] is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_decode(rows: Sequence[dict], directory: str | Path) -> Path | None:
    """``bench_decode.png``: step time and cache size against S, log-log, one line per
    mechanism x framework (colour: mechanism; solid: PyTorch, dashed: JAX). ``None`` when
    no step ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (times, memory) = plt.subplots(1, 2, figsize=(13, 5.6))
    names = list(dict.fromkeys(row["mechanism"] for row in rows))
    colors = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(names)}
    styles = {"torch": ("-", "o"), "jax": ("--", "s")}
    drawn = False
    for name in names:
        for framework, (line, marker) in styles.items():
            lengths, ms = _series(rows, name, framework, "ms")
            if not lengths:
                continue
            kwargs = {"color": colors[name], "linestyle": line, "marker": marker, "markersize": 4}
            times.plot(lengths, ms, label=f"{name} {framework}", **kwargs)
            memory.plot(*_series(rows, name, framework, "cache_mib"), **kwargs)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    lengths = sorted({row["length"] for row in rows})
    for axis, title, unit in (
        (times, "one decoding step (T = 1), median time", "ms"),
        (memory, "cache size (sum of its fields' nbytes)", "MiB"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(lengths, [_length_label(length) for length in lengths])
        axis.minorticks_off()
        axis.set_xlabel("S (tokens in the cache)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="major", alpha=0.3)
    fig.legend(loc="lower center", ncol=6, fontsize=7, handlelength=3, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench_decode.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

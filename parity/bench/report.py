"""The sweep's rows, the printed tables, and the log-log plots."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from ..mechanisms import Mechanism
from .plan import Cell
from .targets import Check

__all__ = ["format_checks", "format_rows", "plot", "sweep"]

_MODE_NAMES = {"fwd": "fwd", "fwdbwd": "f+b"}
_MEMORY_METHODS = {"rss": "RSS growth", "cuda": "CUDA allocator peak", "xla": "XLA temp + output"}


def _mode_figures(bench, cell: Cell, refs: Sequence[str]) -> dict:
    """The layer's figures in one mode, and each reference's time and speed ratio."""
    ours, *others = bench.measure_group([cell, *(replace(cell, subject=ref) for ref in refs)])
    figures = {
        "status": ours.status,
        "note": ours.note,
        "ms": None if ours.median_s is None else ours.median_s * 1e3,
        "peak_mib": None if ours.peak_bytes is None else ours.peak_bytes / 2**20,
        "memory_method": ours.memory_method,
        "gflops": ours.gflops,
        "compile_s": ours.compile_s,
    }
    for ref, other in zip(refs, others, strict=True):
        both = ours.median_s is not None and other.median_s is not None
        figures[f"{ref}_ms"] = None if other.median_s is None else other.median_s * 1e3
        figures[f"{ref}_status"] = other.status
        # > 1: the library is faster than the fused reference
        figures[f"x_{ref}"] = other.median_s / ours.median_s if both else None
    return figures


def sweep(
    bench,
    mechanisms: Iterable[Mechanism],
    frameworks: Sequence[str],
    lengths: Callable[[Mechanism], Sequence[int]],
    modes: Sequence[str],
    refs: Sequence[str],
    *,
    scope: str,
    is_causal: bool,
    d_model: int,
    batch: int,
) -> list[dict]:
    """One row per mechanism x framework x L, each mode with its reference ratios.

    ``bench`` is a ``Bench`` or a ``Planner`` (anything with ``measure_group``).
    """
    rows = []
    for mechanism in mechanisms:
        for framework in frameworks:
            for length in lengths(mechanism):
                row = {"mechanism": mechanism.name, "framework": framework, "length": length}
                for mode in modes:
                    cell = Cell(
                        mechanism.name,
                        framework,
                        "layer",
                        scope,
                        length,
                        mode,
                        is_causal,
                        d_model,
                        batch,
                    )
                    row[mode] = _mode_figures(bench, cell, refs)
                rows.append(row)
    return rows


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def format_rows(rows: Sequence[dict], modes: Sequence[str], refs: Sequence[str]) -> str:
    """The sweep table: times, memory, useful GFLOP/s and the speed ratios per mode.

    ``xsame``/``xdense`` are reference time / library time (> 1: the library is faster).
    Rows whose layer did not run are summarized under the table instead.
    """
    columns = [("mechanism", 11), ("fw", 5), ("L", 6)]
    for mode in modes:
        name = _MODE_NAMES[mode]
        columns += [(f"{name} ms", 9), (f"{name} MiB", 8)]
        columns += [(f"{name} x{ref}", 9) for ref in refs]
    columns += [(f"{_MODE_NAMES[modes[0]]} GF/s", 9), ("jit s", 6)]
    header = " ".join(f"{title:>{width}}" for title, width in columns)
    lines = [header, "-" * len(header)]
    notes = {}
    for row in rows:
        figures = [row[mode] for mode in modes]
        if all(f["status"] != "ok" for f in figures):
            notes.setdefault((row["mechanism"], row["framework"]), figures[0]["note"])
            continue
        cells = [row["mechanism"], row["framework"], str(row["length"])]
        for f in figures:
            cells += [_number(f["ms"], 1), _number(f["peak_mib"], 1)]
            cells += [_number(f[f"x_{ref}"], 2) for ref in refs]
        compile_s = [f["compile_s"] for f in figures if f["compile_s"] is not None]
        cells += [_number(figures[0]["gflops"], 1), _number(sum(compile_s) or None, 2)]
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns, strict=True)))
    lines += [f"{name} ({framework}): {note}" for (name, framework), note in notes.items()]
    return "\n".join(lines)


def format_checks(checks: Sequence[Check]) -> str:
    """The targets, grouped, one line each: measured value, goal, verdict, raw figures.

    Checks on mechanisms not in the packages yet are summarized at the end, one line per
    missing class, instead of one line per check.
    """
    lines, missing = [], {}
    group = None
    for check in checks:
        if check.status == "not available yet":
            missing[check.detail] = missing.get(check.detail, 0) + 1
            continue
        if check.group != group:
            group = check.group
            lines += ["", group]
        value = "-" if check.value is None else f"{check.value:.2f}{check.unit}"
        goal = "-"
        if check.goal is not None:
            goal = f"{'>=' if check.at_least else '<='} {check.goal:g}{check.unit}"
        lines.append(
            f"  {check.label:<34} {check.framework:<6} {value:>11} {goal:>12}  "
            f"{check.status:<7} {check.detail}"
        )
    if missing:
        lines.append("")
    lines += [f"not available yet: {note} ({count} checks)" for note, count in missing.items()]
    return "\n".join(lines).lstrip("\n")


def _length_label(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def _log_axes(axis, lengths: Sequence[int]) -> None:
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(lengths, [_length_label(length) for length in lengths])
    axis.minorticks_off()
    axis.set_xlabel("L")
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(fontsize=7, handlelength=3)


def _series(rows, mechanism, framework, mode, key):
    points = [
        (row["length"], row[mode][key])
        for row in rows
        if row["mechanism"] == mechanism
        and row["framework"] == framework
        and mode in row
        and row[mode][key] is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _guides(axis, lengths, values) -> None:
    """Slope guides over the last two octaves, ending at the last point: O(L) and O(L²).

    Short, so they show the slope to read the curves against without stretching the axis.
    """
    if len(lengths) < 3:
        return
    first, last = lengths[-3], lengths[-1]
    for power, style in ((1, "--"), (2, ":")):
        axis.plot(
            [first, last],
            [values[-1] * (first / last) ** power, values[-1]],
            color="0.55",
            linewidth=1.0,
            linestyle=style,
            label=f"O(L{'²' if power == 2 else ''}) slope",
            zorder=0,
        )


def _memory_label(rows, mechanism) -> str:
    """``"MiB (torch: RSS growth; jax: XLA temp + output)"``: each framework's meter."""
    methods = {}
    for row in rows:
        for figures in (row[mode] for mode in _MODE_NAMES if mode in row):
            if row["mechanism"] == mechanism and figures["memory_method"]:
                methods.setdefault(row["framework"], _MEMORY_METHODS[figures["memory_method"]])
    return "MiB (" + "; ".join(f"{fw}: {name}" for fw, name in methods.items()) + ")"


def _mechanism_figure(plt, rows, mechanism, frameworks, modes, refs, path: Path) -> bool:
    fig, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"torch": "tab:red", "jax": "tab:blue"}
    styles = {"fwd": ("-", "o"), "fwdbwd": ("--", "D")}
    drawn = False
    for framework in frameworks:
        for mode in modes:
            lengths, ms = _series(rows, mechanism, framework, mode, "ms")
            if not lengths:
                continue
            label = f"{framework} {_MODE_NAMES[mode]}"
            line, marker = styles[mode]
            kwargs = {"color": colors[framework], "linestyle": line, "marker": marker}
            times.plot(lengths, ms, label=label, **kwargs)
            memory_lengths, mib = _series(rows, mechanism, framework, mode, "peak_mib")
            if memory_lengths:
                memory.plot(memory_lengths, mib, label=label, **kwargs)
            if not drawn:
                _guides(times, lengths, ms)
                _guides(memory, memory_lengths, mib)
            drawn = True
        for ref, marker in zip(refs, ("s", "^"), strict=False):
            lengths, ms = _series(rows, mechanism, framework, "fwd", f"{ref}_ms")
            if lengths:
                times.plot(
                    lengths,
                    ms,
                    color=colors[framework],
                    linestyle=":",
                    marker=marker,
                    markerfacecolor="none",
                    label=f"{framework} fwd, {ref} fused reference",
                )
    if drawn:
        times.set_title(f"{mechanism}: median time")
        times.set_ylabel("ms")
        memory.set_title(f"{mechanism}: peak memory of one call")
        memory.set_ylabel(_memory_label(rows, mechanism))
        lengths = sorted({row["length"] for row in rows if row["mechanism"] == mechanism})
        for axis in (times, memory):
            _log_axes(axis, lengths)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _overview_figure(plt, rows, mechanisms, frameworks, path: Path) -> bool:
    fig, axes = plt.subplots(1, len(frameworks), figsize=(5.5 * len(frameworks), 4.2))
    axes = axes if len(frameworks) > 1 else [axes]
    drawn = False
    for axis, framework in zip(axes, frameworks, strict=True):
        for mechanism in mechanisms:
            lengths, ms = _series(rows, mechanism, framework, "fwd", "ms")
            if lengths:
                axis.plot(lengths, ms, marker="o", label=mechanism)
                drawn = True
        axis.set_title(f"{framework}: forward fast path, median time")
        axis.set_ylabel("ms")
        _log_axes(axis, sorted({row["length"] for row in rows}))
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot(rows, frameworks, modes, refs, directory: str | Path) -> list[Path]:
    """``bench_<mechanism>.png`` (time and memory vs L, log-log) and ``bench_overview.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mechanisms = list(dict.fromkeys(row["mechanism"] for row in rows))
    written = []
    for mechanism in mechanisms:
        path = directory / f"bench_{mechanism}.png"
        if _mechanism_figure(plt, rows, mechanism, frameworks, modes, refs, path):
            written.append(path)
    path = directory / "bench_overview.png"
    if "fwd" in modes and _overview_figure(plt, rows, mechanisms, frameworks, path):
        written.append(path)
    return written

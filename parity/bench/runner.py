"""Run cells once each, remember the results; or only record which cells are wanted.

The sweep and the targets ask for measurements through ``measure(cell)``. A ``Planner``
answers every request with a placeholder and keeps the list, so the whole run is known
(and its progress bar sized) before anything is timed; a ``Bench`` then measures each
distinct computation once, so a reference shared by several mechanisms, or a cell that
the sweep and a target both need, costs one measurement. Cells asked for together (a
layer and its references) are timed in turns, under the same machine load. A memory-only
cell (JAX) is compiled for its ``memory_analysis()`` and never run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .. import devices
from ..mechanisms import Mechanism, by_name
from . import jax_runs, torch_runs
from .measure import Meter, peak_cuda_growth, peak_rss_growth, time_interleaved
from .plan import Cell, NotAvailableYetError, estimated_bytes, reference_pattern, useful_flops

__all__ = ["Bench", "Measurement", "Planner"]

_RUNS = {"torch": torch_runs, "jax": jax_runs}


@dataclass
class Measurement:
    """The outcome of one cell.

    ``status``: ``"ok"``; ``"missing"`` (the class is not in that package yet, or it does
    not decode with a cache yet); ``"n/a"`` (no fused kernel computes this mechanism);
    ``"skipped"`` (over the memory budget); ``"error"``; ``"planned"`` (a ``Planner``
    placeholder); ``"unselected"`` (left out by ``--mechanism``/``--framework``).

    ``peak_bytes``: the meter's figure (JAX: XLA temporaries + outputs); ``temp_bytes``:
    JAX's temporaries alone. A memory-only cell has these and ``compile_s``, no times.
    """

    cell: Cell
    status: str
    note: str = ""
    times_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    compile_s: float | None = None
    peak_bytes: int | None = None
    temp_bytes: int | None = None
    memory_method: str | None = None
    flops: float | None = None
    cache_bytes: int | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def gflops(self) -> float | None:
        """Useful GFLOP/s: the cell's useful FLOPs over its median time."""
        if self.flops is None or self.median_s is None:
            return None
        return self.flops / self.median_s / 1e9

    def as_dict(self) -> dict:
        return {
            **self.cell.as_dict(),
            "status": self.status,
            "note": self.note,
            "median_s": self.median_s,
            "times_s": self.times_s,
            "warmup_s": self.warmup_s,
            "compile_s": self.compile_s,
            "peak_bytes": self.peak_bytes,
            "temp_bytes": self.temp_bytes,
            "memory_method": self.memory_method,
            "useful_flops": self.flops,
            "useful_gflops": self.gflops,
            "cache_bytes": self.cache_bytes,
        }


def _unavailable(mechanism: Mechanism, cell: Cell) -> Measurement | None:
    """A measurement that cannot run, with the reason; ``None`` if it can."""
    if cell.memory_only and (cell.framework != "jax" or cell.subject in ("matmul", "step")):
        return Measurement(
            cell, "n/a", "memory-only cells are JAX programs (XLA's memory_analysis)"
        )
    if cell.subject == "matmul":
        return None
    if not mechanism.available(cell.framework):
        return Measurement(
            cell, "missing", f"{mechanism.class_name} not in attentions_{cell.framework} yet"
        )
    if (
        cell.subject in ("same", "dense")
        and reference_pattern(mechanism, cell.subject, cell.scope) is None
    ):
        return Measurement(cell, "n/a", f"no fused kernel computes {mechanism.name}")
    return None


class Planner:
    """Collects the distinct cells asked for, in groups, answering with placeholders."""

    def __init__(self) -> None:
        self.groups: list[list[Cell]] = []
        self._seen: set[tuple] = set()

    def measure(self, cell: Cell) -> Measurement:
        return self.measure_group([cell])[0]

    def measure_group(self, cells: list[Cell]) -> list[Measurement]:
        group, answers = [], []
        for cell in cells:
            mechanism = by_name(cell.case)
            unavailable = _unavailable(mechanism, cell)
            answers.append(unavailable or Measurement(cell, "planned"))
            if unavailable is None and cell.key(mechanism) not in self._seen:
                self._seen.add(cell.key(mechanism))
                group.append(cell)
        if group:
            self.groups.append(group)
        return answers

    @property
    def count(self) -> int:
        return sum(len(group) for group in self.groups)


class Bench:
    """Measures cells, each distinct computation once; a group's cells take turns.

    ``repeats`` timed calls at most, stopping once ``budget_s`` seconds of timed calls
    have passed; cells estimated to need more than ``max_bytes`` of ``LxL`` memory are
    skipped. Everything runs on ``device`` (a name of ``parity.devices.DEVICES``).
    """

    def __init__(self, repeats: int, budget_s: float, max_bytes: int, device: str = "cpu") -> None:
        self.repeats = repeats
        self.budget_s = budget_s
        self.max_bytes = max_bytes
        self.device = device
        self.results: dict[tuple, Measurement] = {}
        self._devices: dict[str, object] = {}

    def framework_device(self, framework: str):
        """The ``torch.device`` or ``jax.Device`` of this run (looked up once)."""
        if framework not in self._devices:
            self._devices.update(devices.require(self.device, [framework]))
        return self._devices[framework]

    def _meter(self, cell: Cell) -> tuple[Meter | None, str | None]:
        """How a cell's peak memory is measured here, and the method's name.

        A decoding step's memory is its cache (``cache_bytes``), so it has no meter.
        """
        if cell.subject == "step":
            return None, None
        if cell.framework == "jax":
            return None, "xla"
        if self.device == "cpu":
            return peak_rss_growth, "rss"
        device = self.framework_device("torch")
        return (lambda run: peak_cuda_growth(run, device)), "cuda"

    def measure(self, cell: Cell) -> Measurement:
        return self.measure_group([cell])[0]

    def measure_group(self, cells: list[Cell]) -> list[Measurement]:
        """Measure the cells not measured yet together (interleaved), then answer all."""
        fresh: dict[tuple, tuple[Mechanism, Cell]] = {}
        for cell in cells:
            mechanism = by_name(cell.case)
            key = cell.key(mechanism)
            if _unavailable(mechanism, cell) is None and key not in self.results:
                fresh.setdefault(key, (mechanism, cell))
        self._run(fresh)
        answers = []
        for cell in cells:
            mechanism = by_name(cell.case)
            answers.append(_unavailable(mechanism, cell) or self.results[cell.key(mechanism)])
        return answers

    def _run(self, fresh: dict[tuple, tuple[Mechanism, Cell]]) -> None:
        ready = []
        for key, (mechanism, cell) in fresh.items():
            needed = estimated_bytes(mechanism, cell)
            if needed > self.max_bytes:
                self.results[key] = Measurement(
                    cell,
                    "skipped",
                    f"needs ~{needed / 2**30:.1f} GiB of LxL memory, over --max-gb "
                    f"{self.max_bytes / 2**30:g}",
                )
                continue
            device = self.framework_device(cell.framework)
            try:
                workload = _RUNS[cell.framework].build(mechanism, cell, device)
            except NotAvailableYetError as error:
                self.results[key] = Measurement(cell, "missing", str(error))
                continue
            except Exception as error:  # a mechanism still in the making must not stop the run
                self.results[key] = _failed(cell, error)
                continue
            if cell.memory_only:
                self.results[key] = _compiled_only(cell, workload)
                continue
            ready.append((key, mechanism, cell, workload))
        if not ready:
            return
        meters = [self._meter(cell) for _, _, cell, _ in ready]
        outcomes = time_interleaved(
            [workload.run for *_, workload in ready],
            self.repeats,
            self.budget_s,
            meters=[meter for meter, _ in meters],
        )
        for (key, mechanism, cell, workload), timing, (meter, method) in zip(
            ready, outcomes, meters, strict=True
        ):
            if isinstance(timing, Exception):
                self.results[key] = _failed(cell, timing)
                continue
            self.results[key] = Measurement(
                cell,
                "ok",
                times_s=timing.times_s,
                warmup_s=timing.warmup_s,
                compile_s=workload.compile_s,
                peak_bytes=workload.xla_bytes if meter is None else timing.peak_bytes,
                temp_bytes=workload.xla_temp_bytes,
                memory_method=method,
                flops=useful_flops(mechanism, cell),
                cache_bytes=workload.cache_bytes,
            )

    def measurements(self) -> list[Measurement]:
        return list(self.results.values())


def _compiled_only(cell: Cell, workload) -> Measurement:
    """A memory-only cell's figures: compile time and XLA's bytes; ``run`` is never called."""
    if workload.xla_bytes is None:
        return Measurement(
            cell, "n/a", "this backend gives no memory_analysis()", compile_s=workload.compile_s
        )
    return Measurement(
        cell,
        "ok",
        compile_s=workload.compile_s,
        peak_bytes=workload.xla_bytes,
        temp_bytes=workload.xla_temp_bytes,
        memory_method="xla",
    )


def _failed(cell: Cell, error: Exception) -> Measurement:
    return Measurement(cell, "error", f"{type(error).__name__}: {error}")

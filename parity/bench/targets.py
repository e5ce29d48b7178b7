"""The speed targets of the README's "Benchmarks" section, as ratios measured in one run.

Every check is a ratio or a time computed from cells measured in the same process, so
the load of a shared machine moves both sides together. A check whose mechanism is not in
the packages yet reads "not available yet"; one whose measurement was skipped or failed
says why. ``failures`` picks the checks that fail a ``--check`` run: "missed" and "error".

The training targets (issue 14) are forward+backward time ratios, and JAX's fwd+bwd
temporaries from XLA's buffer assignment of programs compiled and never run (memory-only
cells), so their L = 16384 costs a compile, not minutes of running.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from .. import mechanisms
from .plan import SCOPES, Cell

__all__ = [
    "ALIBI_TRAINING",
    "BACKWARD_OVER_FORWARD",
    "FAILING",
    "FULL_SIZES",
    "JAX_KERNEL_FWDBWD_SPEEDUP",
    "JAX_OVER_TORCH_FWDBWD",
    "NEED_WEIGHTS_MS",
    "QUICK_SIZES",
    "TRAINING_MEMORY_GROWTH",
    "TRAINING_TEMP_MIB",
    "Check",
    "TargetSizes",
    "checks",
    "failures",
    "format_failures",
]

DENSE_FAMILY = ("multi_head", "grouped", "rotary", "alibi")

NEED_WEIGHTS_MS = {
    "multi_head": 226.0,
    "local": 450.0,
    "grouped": 260.0,
    "dilated": 6600.0,
    "block": 75.0,
    "alibi": 362.0,
    "linear": 37.0,
}
"""``need_weights=True`` forward times (ms) at L=2048, B=1, d_model=128, 8 heads, measured
on this machine for the implementation the mechanism names come from."""

TRAINING_TEMP_MIB = 400.0
"""JAX dense (multi_head) fwd+bwd XLA temporaries at ``training_memory_at``, MiB."""
TRAINING_MEMORY_GROWTH = 2.3
"""Every mechanism's JAX fwd+bwd temporaries, t(2L) / t(L), at most (O(L): about 2)."""
JAX_OVER_TORCH_FWDBWD = 1.5
"""JAX dense fwd+bwd time / the PyTorch twin's, at most."""
JAX_KERNEL_FWDBWD_SPEEDUP = 2.0
"""``jax.nn.dot_product_attention`` fwd+bwd time / the JAX fast path's, at least."""
ALIBI_TRAINING = 1.3
"""PyTorch ALiBi fwd+bwd time / multi-head fwd+bwd time, at most."""
BACKWARD_OVER_FORWARD = 3.5
"""Every mechanism's fwd+bwd time / its own forward time, at most, in both frameworks."""


@dataclass(frozen=True)
class TargetSizes:
    """The lengths and widths the targets are stated at (``QUICK_SIZES`` for smoke tests)."""

    d_model: int = 512
    dense: int = 2048
    efficiency: int = 4096
    sparse: int = 16384
    dilated: int = 8192
    linear: tuple[int, ...] = (16384, 32768, 65536)
    weights: int = 2048
    weights_d_model: int = 128
    matmul: int = 2048
    training: int = 2048
    training_causal: int = 8192
    training_memory: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    training_memory_at: int = 8192


FULL_SIZES = TargetSizes()
QUICK_SIZES = TargetSizes(
    d_model=64,
    dense=128,
    efficiency=256,
    sparse=512,
    dilated=256,
    linear=(256, 512, 1024),
    weights=128,
    weights_d_model=32,
    matmul=256,
    training=128,
    training_causal=256,
    training_memory=(64, 128, 256, 512, 1024),
    training_memory_at=512,
)


@dataclass(frozen=True)
class Check:
    """One target: ``value`` against ``goal`` (``>=`` if ``at_least`` else ``<=``).

    ``status``: ``"met"``, ``"missed"``, ``"info"`` (no goal), ``"not available yet"``,
    or ``"skipped"``/``"error"`` with the reason in ``detail``.
    """

    group: str
    label: str
    framework: str
    value: float | None
    goal: float | None
    at_least: bool
    unit: str
    status: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """``"[torch] multi_head fwd L=2048: 1.20x, goal <= 1.15x (missed)"``, for failures."""
        value = "-" if self.value is None else f"{self.value:.2f}{self.unit}"
        goal = ""
        if self.goal is not None:
            goal = f", goal {'>=' if self.at_least else '<='} {self.goal:g}{self.unit}"
        detail = f": {self.detail}" if self.detail else ""
        return f"[{self.framework}] {self.label}: {value}{goal} ({self.status}{detail})"


FAILING = ("missed", "error")
"""The statuses that fail ``--check``; "not available yet", "skipped", "info" do not."""


def failures(found: Sequence[Check]) -> list[Check]:
    """The checks that fail a ``--check`` run: goals missed, and measurements that raised."""
    return [check for check in found if check.status in FAILING]


def format_failures(found: Sequence[Check]) -> str:
    """What a failed ``--check`` prints: each failing target by name, under its group."""
    failed = failures(found)
    lines = [f"check failed: {len(failed)} of {len(found)} targets missed or in error"]
    group = None
    for check in failed:
        if check.group != group:
            group = check.group
            lines.append(f"  {group}")
        lines.append(f"    {check.describe()}")
    return "\n".join(lines)


_JAX_GROUP = (
    "dense JAX: jax.nn.dot_product_attention time / fast-path time "
    "(core: attention alone on the same q, k, v; layer: same projections on both sides)"
)


def _problem(*measurements) -> tuple[str, str] | None:
    """``(status, detail)`` of the first measurement that did not run, else ``None``."""
    for measurement in measurements:
        if measurement.status == "missing":
            return "not available yet", measurement.note
        if measurement.status in ("planned", "skipped", "error", "n/a"):
            return measurement.status, measurement.note
    return None


def _verdict(value: float, goal: float | None, at_least: bool) -> str:
    if goal is None:
        return "info"
    return "met" if (value >= goal if at_least else value <= goal) else "missed"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


class _Checks:
    """Builds the checks from ``bench``; one method per target group."""

    def __init__(self, bench, sizes: TargetSizes) -> None:
        self.bench = bench
        self.sizes = sizes
        self.found: list[Check] = []
        self.groups = 0

    def cell(self, case, framework, subject, scope, length, mode="fwd", **kw) -> Cell:
        """A cell of the targets (``kw``: ``is_causal``, ``d_model``)."""
        kw.setdefault("d_model", self.sizes.d_model)
        return Cell(case, framework, subject, scope, length, mode, **kw)

    def measure(self, *cells: Cell) -> list:
        """The cells' measurements, timed in turns with each other.

        Each call tags its cells with its own number, so they are measured here, together,
        rather than read from the sweep or another check (measured at another moment).
        """
        self.groups += 1
        tag = f"targets/{self.groups}"
        return self.bench.measure_group([replace(cell, tag=tag) for cell in cells])

    def add(self, group, label, framework, measurements, compute, goal, at_least, unit):
        """Append a check; ``compute()`` gives ``(value, detail)`` once all ran.

        A check on a mechanism or framework left out of the run (``--mechanism``,
        ``--framework``) is dropped.
        """
        if any(m.status == "unselected" for m in measurements):
            return
        problem = _problem(*measurements)
        value, detail = (None, problem[1]) if problem else compute()
        status = problem[0] if problem else _verdict(value, goal, at_least)
        self.found.append(
            Check(group, label, framework, value, goal, at_least, unit, status, detail)
        )

    def ratio(self, group, label, framework, slow, fast, goal, at_least):
        """``slow.median / fast.median`` as a check (a speed-up or an overhead)."""

        def compute():
            value = slow.median_s / fast.median_s
            return value, f"{_ms(slow.median_s)} / {_ms(fast.median_s)}"

        self.add(group, label, framework, (slow, fast), compute, goal, at_least, "x")

    def dense_overhead(self) -> None:
        group = "dense PyTorch: layer time / (projections + SDPA + out-projection by hand)"
        length = self.sizes.dense
        for name in DENSE_FAMILY:
            for mode in ("fwd", "fwdbwd"):
                layer, hand = self.measure(
                    self.cell(name, "torch", "layer", "layer", length, mode),
                    self.cell(name, "torch", "same", "layer", length, mode),
                )
                label = f"{name} {mode} L={length}"
                self.ratio(group, label, "torch", layer, hand, 1.15, at_least=False)

    def jax_dense_speedup(self) -> None:
        length = self.sizes.dense
        for name in DENSE_FAMILY:
            kernel, ours = self.measure(
                self.cell(name, "jax", "same", "core", length),
                self.cell(name, "jax", "layer", "core", length),
            )
            label = f"{name} core fwd L={length}"
            self.ratio(_JAX_GROUP, label, "jax", kernel, ours, 2.5, at_least=True)
        for scope, mode in (("layer", "fwd"), ("core", "fwdbwd"), ("layer", "fwdbwd")):
            kernel, ours = self.measure(
                self.cell("multi_head", "jax", "same", scope, length, mode),
                self.cell("multi_head", "jax", "layer", scope, length, mode),
            )
            label = f"multi_head {scope} {mode} L={length}"
            goal = JAX_KERNEL_FWDBWD_SPEEDUP if mode == "fwdbwd" else None
            self.ratio(_JAX_GROUP, label, "jax", kernel, ours, goal, at_least=True)

    def efficiency(self) -> None:
        """Useful GFLOP/s of the dense layer and core over a matmul's, all timed in turns."""
        group = "dense useful-FLOP rate / this machine's fp32 matmul rate (timed in turns)"
        length = self.sizes.efficiency
        for framework in ("torch", "jax"):
            rate, *measured = self.measure(
                self.cell("multi_head", framework, "matmul", "core", self.sizes.matmul),
                *(self.cell("multi_head", framework, "layer", s, length) for s in SCOPES),
            )
            for scope, attention in zip(SCOPES, measured, strict=True):

                def compute(attention=attention, rate=rate):
                    detail = f"{attention.gflops:.1f} / {rate.gflops:.1f} GFLOP/s"
                    return 100.0 * attention.gflops / rate.gflops, detail

                goal = 60.0 if (framework, scope) == ("torch", "layer") else None
                label = f"multi_head {scope} fwd L={length}"
                self.add(group, label, framework, (rate, attention), compute, goal, True, "%")

    def sparse_speedup(self) -> None:
        group = "sparse PyTorch: dense SDPA time / attend time on the same q, k, v"
        for name, length, goal in (
            ("local", self.sizes.sparse, 20.0),
            ("block", self.sizes.sparse, 30.0),
            ("dilated", self.sizes.dilated, 3.0),
        ):
            dense, ours = self.measure(
                self.cell(name, "torch", "dense", "core", length),
                self.cell(name, "torch", "layer", "core", length),
            )
            self.ratio(group, f"{name} fwd L={length}", "torch", dense, ours, goal, at_least=True)

    def memory_growth(self) -> None:
        group = "peak memory growth when L doubles (O(L): about 2)"
        sparse = self.sizes.sparse
        pairs = [(name, sparse // 2, sparse) for name in ("local", "block")]
        pairs.append(("linear", *self.sizes.linear[-2:]))
        for name, short, long in pairs:
            for framework in ("torch", "jax"):
                first, second = self.measure(
                    self.cell(name, framework, "layer", "layer", short),
                    self.cell(name, framework, "layer", "layer", long),
                )

                def compute(first=first, second=second):
                    if not first.peak_bytes or second.peak_bytes is None:
                        return float("nan"), "no memory figure"
                    detail = f"{second.peak_bytes / 2**20:.0f} / {first.peak_bytes / 2**20:.0f} MiB"
                    return second.peak_bytes / first.peak_bytes, detail

                label = f"{name} layer fwd L={short}->{long}"
                self.add(group, label, framework, (first, second), compute, 2.3, False, "x")

    def linear_scaling(self) -> None:
        lengths = self.sizes.linear
        for framework in ("torch", "jax"):
            grid = [(length, causal) for length in lengths for causal in (False, True)]
            measured = self.measure(
                *(
                    self.cell("linear", framework, "layer", "layer", length, is_causal=causal)
                    for length, causal in grid
                )
            )
            timed = dict(zip(grid, measured, strict=True))
            for causal in (False, True):
                kind = "causal" if causal else "non-causal"
                for short, long in itertools.pairwise(lengths):
                    self.ratio(
                        "linear: time growth t(2L) / t(L)",
                        f"{kind} L={short}->{long}",
                        framework,
                        timed[long, causal],
                        timed[short, causal],
                        2.3,
                        at_least=False,
                    )
            for length in lengths:
                self.ratio(
                    "linear: causal time / non-causal time",
                    f"L={length}",
                    framework,
                    timed[length, True],
                    timed[length, False],
                    3.0,
                    at_least=False,
                )

    def need_weights(self) -> None:
        group = (
            f"need_weights=True forward at L={self.sizes.weights}, d_model="
            f"{self.sizes.weights_d_model}: time vs the reference implementation's figure"
        )
        for mechanism in mechanisms.MECHANISMS:
            goal = NEED_WEIGHTS_MS.get(mechanism.name)
            for framework in ("torch", "jax"):
                (measured,) = self.measure(
                    self.cell(
                        mechanism.name,
                        framework,
                        "weights",
                        "layer",
                        self.sizes.weights,
                        d_model=self.sizes.weights_d_model,
                    )
                )

                def compute(measured=measured, goal=goal):
                    reference = "no reference figure" if goal is None else f"reference {goal:g} ms"
                    return measured.median_s * 1e3, reference

                self.add(group, mechanism.name, framework, (measured,), compute, goal, False, "ms")

    def training_speed(self) -> None:
        """JAX dense fwd+bwd against the PyTorch twin's, timed in turns (whole layer)."""
        group = "training: JAX fwd+bwd time / PyTorch fwd+bwd time (whole layer, same sizes)"
        length = self.sizes.training
        ours, twin = self.measure(
            self.cell("multi_head", "jax", "layer", "layer", length, "fwdbwd"),
            self.cell("multi_head", "torch", "layer", "layer", length, "fwdbwd"),
        )
        label = f"multi_head jax/torch fwdbwd L={length}"
        self.ratio(group, label, "jax", ours, twin, JAX_OVER_TORCH_FWDBWD, at_least=False)

    def alibi_training(self) -> None:
        group = "training PyTorch: alibi fwd+bwd time / multi_head fwd+bwd time (whole layer)"
        for length, causal in ((self.sizes.training, False), (self.sizes.training_causal, True)):
            alibi, dense = self.measure(
                *(
                    self.cell(name, "torch", "layer", "layer", length, "fwdbwd", is_causal=causal)
                    for name in ("alibi", "multi_head")
                )
            )
            label = f"fwdbwd L={length}{' causal' if causal else ''}"
            self.ratio(group, label, "torch", alibi, dense, ALIBI_TRAINING, at_least=False)

    def backward_overhead(self) -> None:
        length = self.sizes.training
        group = f"training: fwd+bwd time / forward time of the same layer (whole layer, L={length})"
        for mechanism in mechanisms.MECHANISMS:
            for framework in ("torch", "jax"):
                both, forward = self.measure(
                    *(
                        self.cell(mechanism.name, framework, "layer", "layer", length, mode)
                        for mode in ("fwdbwd", "fwd")
                    )
                )
                label = f"{mechanism.name} fwdbwd/fwd L={length}"
                goal = BACKWARD_OVER_FORWARD
                self.ratio(group, label, framework, both, forward, goal, at_least=False)

    def training_memory(self) -> None:
        """JAX fwd+bwd XLA temporaries (``temp_size_in_bytes``, outputs apart), compiled only.

        The dense figure at ``training_memory_at``, then every mechanism's growth per
        doubling of L. The programs are compiled for ``memory_analysis()`` and never run.
        """
        lengths = self.sizes.training_memory
        measured = {}
        for mechanism in mechanisms.MECHANISMS:
            cells = [
                self.cell(mechanism.name, "jax", "layer", "layer", n, "fwdbwd", memory_only=True)
                for n in lengths
            ]
            measured[mechanism.name] = dict(zip(lengths, self.measure(*cells), strict=True))
        at = self.sizes.training_memory_at
        dense = measured["multi_head"][at]

        def absolute(dense=dense):
            if dense.temp_bytes is None:
                return float("nan"), "no memory figure"
            output = (dense.peak_bytes - dense.temp_bytes) / 2**20
            return dense.temp_bytes / 2**20, f"temporaries alone; outputs {output:.1f} MiB"

        self.add(
            "training JAX memory: XLA temporaries of the layer's fwd+bwd (compiled, not run)",
            f"multi_head fwdbwd L={at}",
            "jax",
            (dense,),
            absolute,
            TRAINING_TEMP_MIB,
            False,
            " MiB",
        )
        group = (
            "training JAX memory growth when L doubles: XLA temporaries of the layer's "
            "fwd+bwd (compiled, not run; O(L): about 2)"
        )
        for name, by_length in measured.items():
            for short, long in itertools.pairwise(lengths):
                first, second = by_length[short], by_length[long]

                def growth(first=first, second=second):
                    if not first.temp_bytes or second.temp_bytes is None:
                        return float("nan"), "no memory figure"
                    detail = f"{second.temp_bytes / 2**20:.1f} / {first.temp_bytes / 2**20:.1f} MiB"
                    return second.temp_bytes / first.temp_bytes, detail

                label = f"{name} L={short}->{long}"
                measurements = (first, second)
                self.add(
                    group, label, "jax", measurements, growth, TRAINING_MEMORY_GROWTH, False, "x"
                )


def checks(bench, sizes: TargetSizes) -> list[Check]:
    """Every target check, asking ``bench`` (a ``Bench`` or a ``Planner``) for its cells."""
    found = _Checks(bench, sizes)
    found.dense_overhead()
    found.jax_dense_speedup()
    found.efficiency()
    found.sparse_speedup()
    found.memory_growth()
    found.linear_scaling()
    found.need_weights()
    found.training_speed()
    found.alibi_training()
    found.backward_overhead()
    found.training_memory()
    return found.found

"""What one measurement is (a ``Cell``), what it is worth in FLOPs and in memory.

Subjects:

* ``"layer"``: the library layer's fast path (``need_weights=False``).
* ``"weights"``: the library layer with ``need_weights=True`` (forward only).
* ``"same"``: the framework's fused kernel computing the same function:
  ``F.scaled_dot_product_attention`` or ``jax.nn.dot_product_attention`` with the
  mechanism's keep pattern as a boolean mask, ALiBi as a float bias, RoPE on q and k.
* ``"dense"``: the same fused kernel with no mask: plain dense attention.
* ``"matmul"``: an ``L×L`` by ``L×L`` float32 matmul, this machine's reference rate.
* ``"step"``: one decoding step (``python -m parity.bench --decode``): the layer's
  ``decode`` of T = 1 new token against a cache already holding ``L`` tokens
  (``parity.bench.decode``).

A cell with ``memory_only=True`` (JAX only) is compiled and never run: its figures are
the XLA executable's ``memory_analysis()`` (temporaries, outputs) and its compile time.
That measures the memory of programs far too slow to run here (dense forward+backward at
L = 16384 takes minutes per call).

Scopes: ``"layer"`` times the whole layer from ``x`` (the references do the same
projections by hand with the layer's weights, so projection cost is on both sides);
``"core"`` times attention alone on given q, k, v (``layer.attend`` against the bare
kernel; each side receives q, k, v in the layout it takes, so no side pays a transpose).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..mechanisms import Mechanism
from .cases import visible_pairs

__all__ = [
    "MODES",
    "SCOPES",
    "SUBJECTS",
    "Cell",
    "NotAvailableYetError",
    "Workload",
    "bench_heads",
    "bench_size",
    "estimated_bytes",
    "layer_kwargs",
    "reference_pattern",
    "refusing_not_available",
    "useful_flops",
]

SUBJECTS = ("layer", "weights", "same", "dense", "matmul", "step")
SCOPES = ("layer", "core")
MODES = ("fwd", "fwdbwd")


def bench_heads(mechanism: Mechanism) -> tuple[int, int]:
    """``(H, K)``: query and kv heads at the benchmark's size."""
    return mechanism.head_counts(mechanism.bench_kwargs)


def bench_size(mechanism: Mechanism) -> int:
    """The pattern's window, rate or block at the benchmark's size (0 when it has none)."""
    return mechanism.size(mechanism.bench_kwargs)


def layer_kwargs(mechanism: Mechanism, d_model: int) -> dict[str, Any]:
    """The constructor arguments at the benchmark's size, with ``d_model`` replaced."""
    return {**mechanism.bench_kwargs, "d_model": d_model}


@dataclass(frozen=True)
class Cell:
    """One timed thing: a subject, for a mechanism, in a framework, at one size.

    Cells with different ``tag`` are different measurements even when they compute the
    same thing: each target check tags its cells, so they are timed in turns with each
    other rather than read from the sweep or another check, measured at another moment.
    ``memory_only``: compile the JAX program for its ``memory_analysis()``, never run it.
    """

    case: str  # the mechanism's registry name
    framework: str
    subject: str
    scope: str
    length: int
    mode: str
    is_causal: bool = False
    d_model: int = 512
    batch: int = 1
    tag: str = ""
    memory_only: bool = False

    def key(self, mechanism: Mechanism) -> tuple:
        """Identity of the computation: a reference shared by mechanisms is measured once."""
        sizes = (self.scope, self.length, self.mode, self.is_causal, self.d_model, self.batch)
        sizes = (*sizes, self.memory_only)
        if self.subject == "matmul":
            return (self.tag, self.framework, "matmul", self.length)
        if self.subject in ("layer", "weights", "step"):
            return (self.tag, self.framework, self.subject, mechanism.name, *sizes)
        pattern = reference_pattern(mechanism, self.subject, self.scope)
        size = bench_size(mechanism) if pattern in ("local", "dilated", "block") else 0
        heads = bench_heads(mechanism)
        return (self.tag, self.framework, "reference", pattern, size, heads, *sizes)

    def describe(self) -> str:
        causal = " causal" if self.is_causal else ""
        tag = f" [{self.tag}]" if self.tag else ""
        memory = " memory only" if self.memory_only else ""
        return (
            f"{self.case} {self.framework} {self.subject}/{self.scope} L={self.length} "
            f"{self.mode}{causal}{memory}{tag}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Workload:
    """One call to time, and the arrays it reads (``inputs``: x, or q, k, v, then any mask
    or bias); ``compile_s``, ``xla_bytes`` (temporaries + outputs) and ``xla_temp_bytes``
    (temporaries alone) are set by the JAX builders only.

    ``run()`` returns only once the device has finished the call (``torch.cuda.synchronize``,
    ``jax.block_until_ready``), so a wall clock around it times the work, not its launch.
    ``cache_bytes``: a decoding step's cache, the sum of its fields' ``nbytes``.
    """

    run: Callable[[], object]
    inputs: tuple = ()
    compile_s: float | None = None
    xla_bytes: int | None = None
    xla_temp_bytes: int | None = None
    cache_bytes: int | None = None


class NotAvailableYetError(Exception):
    """The layer exists but refuses the cell for now (its ``init_cache`` says decoding is
    "not available" for it yet); the runner reports it as ``"missing"``, not as an error."""


def refusing_not_available(make: Callable[[], Any]) -> Any:
    """``make()``; a ``ValueError`` saying "not available" is raised as
    ``NotAvailableYetError``."""
    try:
        return make()
    except ValueError as error:
        if "not available" in str(error):
            raise NotAvailableYetError(str(error)) from error
        raise


def reference_pattern(mechanism: Mechanism, subject: str, scope: str) -> str | None:
    """The pattern a reference subject computes; ``None`` where no fused kernel can."""
    if subject == "dense":
        return "dense"
    if mechanism.pattern == "linear":
        return None
    if mechanism.pattern == "rope" and scope == "core":
        return "dense"  # the core receives q and k already rotated
    return mechanism.pattern


def _shape(mechanism: Mechanism, cell: Cell) -> tuple[int, int, int, int]:
    heads, kv_heads = bench_heads(mechanism)
    return heads, kv_heads, cell.d_model // heads, cell.batch


def useful_flops(mechanism: Mechanism, cell: Cell) -> float | None:
    """FLOPs of the function the cell computes, counting only the q·k pairs it lets through.

    Softmax attention: ``4·B·H·D`` per visible pair (``q·k`` and ``p·v``); linear
    attention: ``4·B·H·L·D²`` (``phi(K)ᵀV`` and ``phi(Q)·(…)``). Layer scope adds the four
    projections, ``2·B·L·E·(H·D + 2·K·D) + 2·B·L·E²``. A backward pass costs twice the
    forward (gradients for both operands of every product): ``fwdbwd = 3 × fwd``.
    """
    if cell.subject == "matmul":
        return 2.0 * cell.length**3
    if cell.subject == "step":
        return None  # a step reads its cache: bytes, not FLOPs, set its time
    heads, kv_heads, d_head, batch = _shape(mechanism, cell)
    length, width = cell.length, cell.d_model
    pattern = mechanism.pattern if cell.subject in ("layer", "weights") else None
    pattern = pattern or reference_pattern(mechanism, cell.subject, cell.scope)
    if pattern is None:
        return None
    if pattern == "linear":
        core = 4 * batch * heads * length * d_head * d_head
    else:
        pairs = visible_pairs(pattern, bench_size(mechanism), length, cell.is_causal)
        core = 4 * batch * heads * d_head * pairs
    projections = 0
    if cell.scope == "layer":
        projections = 2 * batch * length * width * (heads * d_head + 2 * kv_heads * d_head)
        projections += 2 * batch * length * width * width
    total = float(core + projections)
    return 3.0 * total if cell.mode == "fwdbwd" else total


def estimated_bytes(mechanism: Mechanism, cell: Cell) -> int:
    """A rough estimate of the ``L×L`` memory a cell needs (0 for the O(L) paths).

    Used only to skip what would not fit: the weights path and the XLA reference hold a
    few ``(B, H, L, L)`` float32 arrays (twice as many with a backward pass); PyTorch's
    fused CPU kernel holds none, but its mask or ALiBi bias is ``L×L``. The layers' fast
    paths hold none, backward included (JAX's custom backward saves q, k, v, the output
    and the log-sum-exp, issue 14). A memory-only cell is compiled and never run: 0.
    """
    if cell.subject in ("matmul", "step") or cell.memory_only:
        return 0  # a memory-only cell is compiled, never run
    heads, _, _, batch = _shape(mechanism, cell)
    scores = 4 * batch * heads * cell.length * cell.length
    backward = 2 if cell.mode == "fwdbwd" else 1
    if cell.subject == "weights":
        return 3 * scores
    if cell.subject == "layer":
        return 0
    pattern = reference_pattern(mechanism, cell.subject, cell.scope)
    if cell.framework == "jax":
        return 3 * scores * backward
    if pattern == "alibi":
        return 2 * scores
    if pattern in ("local", "dilated", "block"):
        return 5 * cell.length * cell.length
    return 0

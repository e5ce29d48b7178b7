"""``python -m parity.bench``: speed and memory of every mechanism, beside the fused kernels.

For each mechanism x framework x L it times the layer's fast path (``need_weights=False``)
forward and forward+backward (median after a warm-up; JAX compile time apart), measures
peak memory, counts useful GFLOP/s (only the q·k pairs the pattern lets through), and
times the fused references in the same process: PyTorch
``F.scaled_dot_product_attention`` and ``jax.nn.dot_product_attention``, dense and with
the mechanism's own mask or bias. Then it checks the speed targets as ratios;
``--check`` (implied by ``--targets-only``) exits 1 when one is missed. ``--device`` runs
it on a GPU or TPU (``parity.devices``).

``--decode`` switches the whole run to decoding (``parity.bench.decode``): the time of one
step of T = 1 new token against caches of S tokens, the caches' sizes, and the decoding
targets.

The mechanisms are the rows of ``parity.mechanisms.MECHANISMS`` at their ``bench_kwargs``
size; a class a package lacks is reported "not available yet" and skipped.
"""

from .cases import visible_pairs
from .cli import exit_code, main, parse_args, run
from .plan import Cell, useful_flops
from .runner import Bench, Measurement, Planner
from .targets import FULL_SIZES, QUICK_SIZES, Check, TargetSizes, checks, failures

__all__ = [
    "FULL_SIZES",
    "QUICK_SIZES",
    "Bench",
    "Cell",
    "Check",
    "Measurement",
    "Planner",
    "TargetSizes",
    "checks",
    "exit_code",
    "failures",
    "main",
    "parse_args",
    "run",
    "useful_flops",
    "visible_pairs",
]

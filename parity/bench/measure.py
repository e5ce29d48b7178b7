"""Clocks and meters: median wall time after a warm-up, peak memory, the machine.

The clock is the host's wall clock around ``run()``; every workload's ``run()`` waits for
its device before returning (``torch.cuda.synchronize``, ``jax.block_until_ready``), so on
an accelerator the time is the work's, not the launch's.

Peak memory is measured three ways, because no single meter is honest for all:

* PyTorch (CPU): the growth of the process's resident set during one call. Linux keeps a
  high-water mark (``VmHWM``) that writing ``5`` to ``/proc/self/clear_refs`` resets;
  ``malloc_trim(0)`` first hands freed heap pages back, so memory the call reuses from
  earlier calls is counted too. PyTorch's CPU allocator is plain ``malloc``/``free``, so
  the figure is what the call holds at its peak: outputs, temporaries and, with a
  backward pass, gradients.
* PyTorch (CUDA): the caching allocator's own peak, ``torch.cuda.max_memory_allocated``
  after ``torch.cuda.reset_peak_memory_stats``, above what was allocated before the call.
* JAX (XLA, any device): the executable's own buffer assignment, ``temp + output`` bytes from
  ``compiled.memory_analysis()``. The resident set cannot be used: the XLA runtime keeps
  its buffers between calls, so the second call shows no growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import devices

__all__ = [
    "Meter",
    "Timing",
    "machine_description",
    "peak_cuda_growth",
    "peak_rss_growth",
    "time_interleaved",
]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"

Meter = Callable[[Callable[[], object]], tuple[int | None, float]]
"""Runs a call once and returns ``(peak bytes above the level before it, seconds)``."""


@dataclass
class Timing:
    """Wall times of the timed calls (warm-up excluded), of the warm-up call, and the
    memory growth of the first timed call when it was metered."""

    times_s: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_interleaved(
    runs: list[Callable[[], object]],
    repeats: int,
    budget_s: float,
    meters: list[Meter | None] | None = None,
) -> list[Timing | Exception]:
    """Warm every call up once, then time them in turns: a, b, c, a, b, c, ...

    Taking turns puts a layer and its references under the same machine load, so their
    ratio holds on a shared machine even when the load drifts. Each call stops on its own
    after ``repeats`` timed runs or once ``budget_s`` seconds of them have passed (at
    least one timed run), so a 10-second reference does not take a minute. With a
    ``meters[i]`` (``peak_rss_growth``, ``peak_cuda_growth``) the first timed run of call i
    also gives its ``peak_bytes``: after the warm-up, so one-time allocations are not
    counted. A call that raises during its warm-up gets the exception instead of a
    ``Timing``.
    """
    meters = meters or [None] * len(runs)
    gc.collect()
    outcomes: list[Timing | Exception] = []
    for run in runs:
        try:
            outcomes.append(Timing(warmup_s=_timed(run)))
        except Exception as error:  # reported per call; the others still run
            outcomes.append(error)
    spent = [0.0] * len(runs)

    def wanted(index: int) -> bool:
        timing = outcomes[index]
        if not isinstance(timing, Timing) or len(timing.times_s) >= repeats:
            return False
        return not timing.times_s or spent[index] < budget_s

    while any(wanted(index) for index in range(len(runs))):
        for index, run in enumerate(runs):
            if not wanted(index):
                continue
            timing = outcomes[index]
            meter = meters[index]
            if meter is not None and not timing.times_s:
                timing.peak_bytes, elapsed = meter(run)
            else:
                elapsed = _timed(run)
            timing.times_s.append(elapsed)
            spent[index] += elapsed
    return outcomes


def _status_kib(key: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in {_STATUS}")


def _malloc_trim() -> None:
    # without glibc, freed heap pages may stay resident and the figure is then a floor
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def peak_rss_growth(run: Callable[[], object]) -> tuple[int | None, float]:
    """``(bytes, seconds)``: how far the resident set peaked above its level before
    ``run()``, and the call's wall time (the meter's own work is outside it).

    The bytes are ``None`` where the kernel does not offer the reset (non-Linux systems).
    """
    gc.collect()
    _malloc_trim()
    try:
        with open(_CLEAR_REFS, "w") as refs:
            refs.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None, _timed(run)
    elapsed = _timed(run)
    return max(0, _status_kib("VmHWM") - before) * 1024, elapsed


def peak_cuda_growth(run: Callable[[], object], device: Any = None) -> tuple[int, float]:
    """``(bytes, seconds)``: how far PyTorch's CUDA allocations peaked above their level
    before ``run()`` (which synchronizes itself), and the call's wall time."""
    import torch

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    elapsed = _timed(run)
    return max(0, torch.cuda.max_memory_allocated(device) - before), elapsed


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str = "cpu", frameworks: tuple[str, ...] = ()) -> dict:
    """CPU model, core count, library versions and thread settings of this run; off the
    CPU also the accelerator (``devices.describe``) and the fp32 matmul precisions."""
    import flax
    import jax
    import torch

    description = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jax_backend": jax.default_backend(),
        "device": device,
    }
    if device != "cpu":
        description["accelerator"] = devices.describe(device, frameworks)
        description["torch_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        description["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    return description

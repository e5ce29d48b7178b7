"""Where to run: the ``--device`` of ``python -m parity`` and ``python -m parity.bench``.

One name per accelerator kind, mapped to each framework's own device:

* ``"cpu"``: ``torch.device("cpu")`` and JAX's first CPU device (the default behaviour).
* ``"cuda"`` / ``"gpu"`` (the same thing): ``torch.device("cuda")`` and JAX's first GPU
  device (``jax.devices("gpu")``: a CUDA or ROCm build of jaxlib).
* ``"tpu"``: JAX's first TPU device; PyTorch has no TPU backend here (no ``torch_xla``),
  so on a TPU only JAX runs (``frameworks_on("tpu") == ("jax",)``).

A device that is absent raises ``DeviceUnavailableError`` (a ``ValueError``) whose message
names the flag, the device and the framework, ready for ``parser.error``. torch and jax
are imported inside the functions, so this module imports with either framework alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEVICES",
    "FRAMEWORKS",
    "DeviceUnavailableError",
    "describe",
    "frameworks_on",
    "jax_device",
    "require",
    "torch_device",
]

DEVICES = ("cpu", "cuda", "gpu", "tpu")
FRAMEWORKS = ("torch", "jax")

_JAX_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}
_JAX_INSTALL = {"gpu": "pip install -U 'jax[cuda12]'", "tpu": "pip install -U 'jax[tpu]'"}


class DeviceUnavailableError(ValueError):
    """The device asked for is not on this machine (or not in this framework's build)."""


def _check_name(name: str) -> None:
    if name not in DEVICES:
        raise DeviceUnavailableError(f"--device must be one of {list(DEVICES)}, got {name!r}")


def frameworks_on(name: str) -> tuple[str, ...]:
    """The frameworks that can run on device ``name`` at all: both, or JAX alone on a TPU."""
    _check_name(name)
    return ("jax",) if name == "tpu" else FRAMEWORKS


def torch_device(name: str) -> Any:
    """The ``torch.device`` for ``name``; ``DeviceUnavailableError`` when PyTorch cannot use it."""
    import torch

    _check_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "tpu":
        raise DeviceUnavailableError(
            "--device tpu: PyTorch cannot run on a TPU here (torch_xla is not supported); "
            "run JAX alone (--framework jax)"
        )
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device {name}: PyTorch sees no CUDA device (torch.cuda.is_available() is False)"
        )
    return torch.device("cuda")


def jax_device(name: str) -> Any:
    """The first ``jax.Device`` of ``name``'s platform; ``DeviceUnavailableError`` when absent."""
    import jax

    _check_name(name)
    platform = _JAX_PLATFORMS[name]
    try:
        return jax.devices(platform)[0]
    except RuntimeError as error:
        raise DeviceUnavailableError(
            f"--device {name}: JAX has no {platform.upper()} backend "
            f"(jax.devices({platform!r}) failed: {error}); a jaxlib built for it comes with "
            f"{_JAX_INSTALL.get(platform, 'pip install -U jax')}"
        ) from error


_GETTERS = {"torch": torch_device, "jax": jax_device}


def require(name: str, frameworks: Sequence[str] = FRAMEWORKS) -> dict[str, Any]:
    """Each framework's device for ``name``: ``{"torch": torch.device, "jax": jax.Device}``.

    Raises ``DeviceUnavailableError`` naming the first framework that cannot use the device.
    """
    _check_name(name)
    return {framework: _GETTERS[framework](name) for framework in frameworks}


def _torch_name(device: Any) -> str:
    import torch

    if device.type != "cuda":
        return f"{device.type} (CPU)"
    return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"


def describe(name: str, frameworks: Sequence[str] = FRAMEWORKS) -> str:
    """For run headers: ``"cuda: torch cuda:0 (NVIDIA H200), jax gpu:0 (NVIDIA H200)"``."""
    parts = []
    for framework, device in require(name, frameworks).items():
        if framework == "torch":
            parts.append(f"torch {_torch_name(device)}")
        else:
            parts.append(f"jax {device.platform}:{device.id} ({device.device_kind})")
    return f"{name}: " + ", ".join(parts)

"""Move weights between ``attentions_torch`` and ``attentions_jax`` and prove they agree.

``parity`` needs both frameworks (``pip install "attentions[parity]"``); without one of
them, importing it raises a ``ModuleNotFoundError`` that says which is missing and the
line that installs it, and ``python -m parity`` / ``python -m parity.bench`` print that
sentence instead of a traceback.
"""

import importlib
import sys

_REQUIRED = {
    "torch": "PyTorch",
    "jax": "JAX",
    "flax": "Flax",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
}


def _missing_requirements() -> list[str]:
    missing = []
    for module, name in _REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    return missing


_missing = _missing_requirements()
if _missing:
    _message = (
        f"parity needs PyTorch and JAX/Flax side by side, and {', '.join(_missing)} "
        f"{'is' if len(_missing) == 1 else 'are'} not installed. Install them with: "
        f'pip install "attentions[parity]". A user of one framework needs only '
        f"attentions_torch or attentions_jax."
    )
    if sys.argv[:1] == ["-m"]:  # python -m parity / parity.bench: a sentence, no traceback
        raise SystemExit(_message)
    raise ModuleNotFoundError(_message)

from .check import DTYPES, Comparison, Report, compare_layers, enable_x64  # noqa: E402
from .convert import (  # noqa: E402
    ConversionError,
    cache_to_jax,
    cache_to_torch,
    flax_to_torch,
    nnx_params,
    nnx_to_torch,
    torch_to_flax,
    torch_to_nnx,
)
from .io import load_flax_params, load_state_dict, save_flax_params, save_state_dict  # noqa: E402
from .mechanisms import MECHANISMS, Mechanism  # noqa: E402
from .trace import TraceReport, TraceRow, trace  # noqa: E402

__all__ = [
    "DTYPES",
    "MECHANISMS",
    "Comparison",
    "ConversionError",
    "Mechanism",
    "Report",
    "TraceReport",
    "TraceRow",
    "cache_to_jax",
    "cache_to_torch",
    "compare_layers",
    "enable_x64",
    "flax_to_torch",
    "load_flax_params",
    "load_state_dict",
    "nnx_params",
    "nnx_to_torch",
    "save_flax_params",
    "save_state_dict",
    "torch_to_flax",
    "torch_to_nnx",
    "trace",
]

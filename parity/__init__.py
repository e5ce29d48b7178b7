"""Move weights between ``attentions_torch`` and ``attentions_jax`` and prove they agree."""

from .check import DTYPES, Comparison, Report, compare_layers, enable_x64
from .convert import ConversionError, flax_to_torch, torch_to_flax
from .io import load_flax_params, load_state_dict, save_flax_params, save_state_dict
from .mechanisms import MECHANISMS, Mechanism

__all__ = [
    "DTYPES",
    "MECHANISMS",
    "Comparison",
    "ConversionError",
    "Mechanism",
    "Report",
    "compare_layers",
    "enable_x64",
    "flax_to_torch",
    "load_flax_params",
    "load_state_dict",
    "save_flax_params",
    "save_state_dict",
    "torch_to_flax",
]

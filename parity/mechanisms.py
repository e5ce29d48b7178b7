"""The mechanisms the parity report and the test matrix walk through.

One row per mechanism: its class name (the same in both packages) and a small
configuration whose sequence length is not a multiple of its window, block or rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import attentions_jax
import attentions_torch

__all__ = ["MECHANISMS", "Mechanism", "by_name"]


@dataclass(frozen=True)
class Mechanism:
    name: str
    class_name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def torch_layer(self, **overrides: Any):
        return getattr(attentions_torch, self.class_name)(**{**self.kwargs, **overrides})

    def flax_layer(self, **overrides: Any):
        return getattr(attentions_jax, self.class_name)(**{**self.kwargs, **overrides})


MECHANISMS: tuple[Mechanism, ...] = (
    Mechanism("vanilla", "VanillaSelfAttention", {"d_model": 32}),
    Mechanism("multi_head", "MultiHeadSelfAttention", {"d_model": 32, "num_heads": 4}),
    Mechanism(
        "grouped",
        "GroupedSelfAttention",
        {"d_model": 32, "num_query_heads": 4, "num_kv_heads": 2},
    ),
    Mechanism("alibi", "ALiBiSelfAttention", {"d_model": 48, "num_heads": 6}),
    Mechanism("rotary", "RotarySelfAttention", {"d_model": 32, "num_heads": 4}),
    Mechanism("local", "LocalSelfAttention", {"d_model": 32, "window_size": 5, "num_heads": 4}),
    Mechanism(
        "dilated", "DilatedSelfAttention", {"d_model": 32, "dilation_rate": 3, "num_heads": 4}
    ),
    Mechanism("block", "BlockSelfAttention", {"d_model": 32, "block_size": 4, "num_heads": 4}),
    Mechanism("linear", "LinearSelfAttention", {"d_model": 32, "num_heads": 4}),
)


def by_name(name: str) -> Mechanism:
    for mechanism in MECHANISMS:
        if mechanism.name == name:
            return mechanism
    raise ValueError(f"unknown mechanism {name!r}; expected one of {[m.name for m in MECHANISMS]}")

"""``torch.export`` with a symbolic sequence length (docs/semantics.md, "Compilation"): each
mechanism is exported once at one length and the program runs at others, equal to eager.

The other lengths are multiples of no window, block or rate, shorter than a tile and than
the traced length, and 2 (``Dim``'s smallest size).
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import attentions_torch as at

E, TRACED = 16, 40
LENGTHS = (2, 13, 67)

LAYERS = {
    "VanillaSelfAttention": lambda: at.VanillaSelfAttention(E),
    "MultiHeadSelfAttention": lambda: at.MultiHeadSelfAttention(E, 2),
    "GroupedSelfAttention": lambda: at.GroupedSelfAttention(E, 4, 2, rope=True),
    "LocalSelfAttention": lambda: at.LocalSelfAttention(E, 5, 2),
    "DilatedSelfAttention": lambda: at.DilatedSelfAttention(E, 3, 2),
    "BlockSelfAttention": lambda: at.BlockSelfAttention(E, 6, 2),
    "ALiBiSelfAttention": lambda: at.ALiBiSelfAttention(E, 2),
    "RotarySelfAttention": lambda: at.RotarySelfAttention(E, 2),
    "LinearSelfAttention": lambda: at.LinearSelfAttention(E, 2),
}


class _Call(torch.nn.Module):
    """``layer(x, is_causal=..., need_weights=...)`` as a module of ``x`` alone."""

    def __init__(self, layer: torch.nn.Module, is_causal: bool, need_weights: bool) -> None:
        super().__init__()
        self.layer, self.is_causal, self.need_weights = layer, is_causal, need_weights

    def forward(self, x: torch.Tensor):
        out, weights = self.layer(x, is_causal=self.is_causal, need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


def _check_exported(layer: torch.nn.Module, is_causal: bool, need_weights: bool) -> None:
    call = _Call(layer.eval(), is_causal, need_weights)
    x = torch.randn(2, TRACED, E)
    program = export(call, (x,), dynamic_shapes={"x": {1: Dim("L")}}).module()
    with torch.no_grad():
        for length in LENGTHS:
            x = torch.randn(2, length, E)
            torch.testing.assert_close(program(x), call(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fast_path_exports_with_a_symbolic_length(name, is_causal):
    _check_exported(LAYERS[name](), is_causal, need_weights=False)


@pytest.mark.parametrize("name", ["LocalSelfAttention", "BlockSelfAttention", "ALiBiSelfAttention"])
def test_weights_path_exports_with_a_symbolic_length(name):
    """The weights path too: the tiled mechanisms run the dense core with their pattern's
    mask there (the weights are ``(B, H, L, L)`` anyway)."""
    _check_exported(LAYERS[name](), is_causal=True, need_weights=True)

"""A small decoder-only language model from ``attentions_torch`` layers (the PyTorch twin
of ``examples.twin_lm_flax``: the same modules under the same names, so
``parity.torch_to_flax`` moves its weights).

Shape legend: B batch, T tokens, V vocabulary, E model width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from parity.mechanisms import by_name


def attention_kwargs(mechanism: str, d_model: int) -> dict[str, Any]:
    """The registry's small configuration of ``mechanism`` at width ``d_model``."""
    return {**by_name(mechanism).kwargs, "d_model": d_model}


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))  # exact GELU, as Flax's below


class Block(nn.Module):
    """Pre-norm: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, mechanism: str, d_model: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = by_name(mechanism).layer_class("torch")(**attention_kwargs(mechanism, d_model))
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))

    def decode(self, cache: Any, x: Tensor) -> tuple[Any, Tensor]:
        cache, attended = self.attn.decode(cache, self.ln1(x))
        x = x + attended
        return cache, x + self.mlp(self.ln2(x))


class TwinLM(nn.Module):
    """Token embedding, ``layers`` blocks of any mechanism of the registry, final LayerNorm
    and a linear head. No position embedding: causal attention (and RoPE or ALiBi when the
    mechanism has them) carries the order."""

    def __init__(
        self, mechanism: str, *, vocab: int, d_model: int = 48, layers: int = 2, hidden: int = 96
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(mechanism, d_model, hidden) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` int64 -> logits ``(B, T, V)``."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def init_caches(self, batch: int, max_length: int) -> list[Any]:
        return [block.attn.init_cache(batch, max_length) for block in self.blocks]

    def decode(self, caches: list[Any], tokens: Tensor) -> tuple[list[Any], Tensor]:
        """The next ``(B, T)`` tokens through every block's cache: logits ``(B, T, V)``."""
        x = self.embed(tokens)
        caches = list(caches)
        for i, block in enumerate(self.blocks):
            caches[i], x = block.decode(caches[i], x)
        return caches, self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, prompt: Tensor, steps: int) -> Tensor:
        """Greedy: the prompt ``(B, P)`` through the caches, then ``steps`` tokens one at a
        time; returns the ``(B, steps)`` new tokens."""
        caches = self.init_caches(prompt.shape[0], prompt.shape[1] + steps)
        caches, logits = self.decode(caches, prompt)
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            caches, logits = self.decode(caches, tokens[-1][:, None])
            tokens.append(logits[:, -1].argmax(-1))
        return torch.stack(tokens, dim=1)

"""The Flax linen twin of ``examples.twin_lm_torch``: the same modules under the same names
(``blocks_0/attn/w_q``, ...), LayerNorm with PyTorch's epsilon and the exact GELU.

Shape legend: B batch, T tokens, V vocabulary, E model width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from parity.mechanisms import by_name

from .twin_lm_torch import attention_kwargs

EPSILON = 1e-5
"""``torch.nn.LayerNorm``'s; Flax's default is 1e-6."""


class MLP(nn.Module):
    d_model: int
    hidden: int

    def setup(self) -> None:
        self.fc1 = nn.Dense(self.hidden)
        self.fc2 = nn.Dense(self.d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nn.gelu(self.fc1(x), approximate=False))


class Block(nn.Module):
    mechanism: str
    d_model: int
    hidden: int

    def setup(self) -> None:
        self.ln1 = nn.LayerNorm(epsilon=EPSILON)
        self.attn = by_name(self.mechanism).layer_class("jax")(
            **attention_kwargs(self.mechanism, self.d_model)
        )
        self.ln2 = nn.LayerNorm(epsilon=EPSILON)
        self.mlp = MLP(self.d_model, self.hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))

    def init_cache(self, batch: int, max_length: int) -> Any:
        return self.attn.init_cache(batch, max_length)

    def decode(self, cache: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        cache, attended = self.attn.decode(cache, self.ln1(x))
        x = x + attended
        return cache, x + self.mlp(self.ln2(x))


class TwinLM(nn.Module):
    """See ``examples.twin_lm_torch.TwinLM``."""

    mechanism: str
    vocab: int
    d_model: int = 48
    layers: int = 2
    hidden: int = 96

    def setup(self) -> None:
        self.embed = nn.Embed(self.vocab, self.d_model)
        self.blocks = [Block(self.mechanism, self.d_model, self.hidden) for _ in range(self.layers)]
        self.ln_f = nn.LayerNorm(epsilon=EPSILON)
        self.head = nn.Dense(self.vocab)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``(B, T)`` int -> logits ``(B, T, V)``."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def init_caches(self, batch: int, max_length: int) -> list[Any]:
        return [block.init_cache(batch, max_length) for block in self.blocks]

    def decode(self, caches: list[Any], tokens: jax.Array) -> tuple[list[Any], jax.Array]:
        x = self.embed(tokens)
        caches = list(caches)
        for i, block in enumerate(self.blocks):
            caches[i], x = block.decode(caches[i], x)
        return caches, self.head(self.ln_f(x))


def generate(model: nn.Module, params: Any, prompt: jax.Array, steps: int) -> jax.Array:
    """Greedy, as ``TwinLM.generate`` in PyTorch: ``(B, steps)`` new tokens; each step one
    jitted call of ``decode`` (any model with ``init_caches`` and ``decode``, as
    ``examples.llama_flax.Llama``; HF's ``generate(do_sample=False)`` without an end token)."""
    variables = {"params": params}
    caches = model.apply(variables, prompt.shape[0], prompt.shape[1] + steps, method="init_caches")
    decode = jax.jit(lambda caches, tokens: model.apply(variables, caches, tokens, method="decode"))
    caches, logits = decode(caches, prompt)
    tokens = [jnp.argmax(logits[:, -1], -1)]
    for _ in range(steps - 1):
        caches, logits = decode(caches, tokens[-1][:, None])
        tokens.append(jnp.argmax(logits[:, -1], -1))
    return jnp.stack(tokens, axis=1)

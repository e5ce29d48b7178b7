"""A LLaMA in Flax linen from our layers, the port of Hugging Face's ``LlamaForCausalLM``.

``python -m examples.llama_flax`` builds a tiny random ``LlamaForCausalLM`` from a config
(``pip install "attentions[llama]"``; no download), moves its weights here with
``parity.torch_to_flax(hf, rules=parity.hf.LLAMA_RULES, mapping=parity.hf.llama_mapping(cfg))``,
prints ``parity.trace``'s table and compares greedy generation with HF's ``generate``.

The modules: token embedding, ``num_hidden_layers`` pre-norm blocks (RMSNorm,
``attentions_jax.GroupedSelfAttention`` with RoPE on halves, RMSNorm, SwiGLU MLP), a final
RMSNorm and a bias-free head (or the embedding, ``tie_word_embeddings``). The names are
``parity.hf``'s (``blocks_0/attn/w_q``, ``blocks_0/mlp/gate_proj``, ...).

Where it is exact and where not (``parity.trace``, see ``tests/test_llama_port.py``):

* float32: every module and gradient within §6's tolerance (at most 7.5 ulps, half the
  allowance), and greedy generation equal to HF's ``generate``.
* float64: not to 1e-10, because HF computes in float32 whatever the model's dtype in
  two places: ``LlamaRMSNorm`` casts its input to float32 (``hidden_states.to(float32)``)
  before the mean of squares, and ``LlamaRotaryEmbedding`` builds ``inv_freq`` and the
  angles ``position * inv_freq`` in float32 (cos and sin then cast to float64). Our
  ``RMSNorm`` computes in ``promote(dtype, float32)`` (float64 for float64) and our RoPE
  angles are float64. The errors are float32-sized (~1e-7 relative); with those two
  float32 steps of HF's done in float64 the port agrees to 1e-10 (the test shows it).

Shape legend: B batch, T tokens, V vocabulary, E model width, F MLP width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attentions_jax
from parity.hf import rope_theta

from .twin_lm_flax import generate


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x²) + eps)`` over the last axis, computed in float32 or
    wider (HF's ``LlamaRMSNorm``: in float32, normalized ``x`` cast back to the input's
    dtype, then times ``scale``)."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        acc = jnp.promote_types(x.dtype, jnp.float32)
        xa = x.astype(acc)
        variance = jnp.mean(jnp.square(xa), axis=-1, keepdims=True)
        return scale * (xa * jax.lax.rsqrt(variance + self.epsilon)).astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    d_model: int
    hidden: int

    def setup(self) -> None:
        self.gate_proj = nn.Dense(self.hidden, use_bias=False)
        self.up_proj = nn.Dense(self.hidden, use_bias=False)
        self.down_proj = nn.Dense(self.d_model, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (HF's ``LlamaDecoderLayer``)."""

    config: Any

    def setup(self) -> None:
        c = self.config
        self.ln1 = RMSNorm(c.rms_norm_eps)
        self.attn = attentions_jax.GroupedSelfAttention(
            d_model=c.hidden_size,
            num_query_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            bias=c.attention_bias,
            rope=True,
            rope_interleaved=False,  # HF rotates (x[i], x[i + D/2]): rotate_half
            rope_base=rope_theta(c),
        )
        self.ln2 = RMSNorm(c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))

    def init_cache(self, batch: int, max_length: int) -> Any:
        return self.attn.init_cache(batch, max_length)

    def decode(self, cache: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        cache, attended = self.attn.decode(cache, self.ln1(x))
        x = x + attended
        return cache, x + self.mlp(self.ln2(x))


class Llama(nn.Module):
    """``LlamaForCausalLM`` of a ``LlamaConfig`` (any object with its attributes): the
    default RoPE, ``head_dim = hidden_size / num_attention_heads``, no MLP bias."""

    config: Any

    def setup(self) -> None:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head_dim * c.num_attention_heads != c.hidden_size or getattr(c, "mlp_bias", False):
            raise ValueError("the port needs head_dim * heads == hidden_size and no MLP bias")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"the port's MLP is SwiGLU, not {c.hidden_act!r}")
        self.embed = nn.Embed(c.vocab_size, c.hidden_size)
        self.blocks = [Block(c) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False)

    def head(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        return self.embed.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``(B, T)`` int -> logits ``(B, T, V)``, causal."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def init_caches(self, batch: int, max_length: int) -> list[Any]:
        return [block.init_cache(batch, max_length) for block in self.blocks]

    def decode(self, caches: list[Any], tokens: jax.Array) -> tuple[list[Any], jax.Array]:
        """The next ``(B, T)`` tokens through every block's cache: logits ``(B, T, V)``."""
        x = self.embed(tokens)
        caches = list(caches)
        for i, block in enumerate(self.blocks):
            caches[i], x = block.decode(caches[i], x)
        return caches, self.head(x)


def tiny_config(**overrides: Any) -> Any:
    """A tiny ``LlamaConfig`` (needs ``transformers``): no end token, so ``generate`` runs
    its full length."""
    from transformers import LlamaConfig

    settings = {
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    return LlamaConfig(**{**settings, **overrides})


def main() -> None:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    import parity
    from parity.hf import LLAMA_RULES, llama_mapping, logits_model

    config = tiny_config()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    model = Llama(config)
    mapping = llama_mapping(config)
    ids = np.random.default_rng(0).integers(config.vocab_size, size=(2, 12))
    report = parity.trace(
        logits_model(hf), model, None, ids, rules=LLAMA_RULES, mapping=mapping, grads=True
    )
    print(report.table())
    params = parity.torch_to_flax(hf, rules=LLAMA_RULES, mapping=mapping)
    prompt = ids[:, :6]
    ours = np.asarray(generate(model, params, jnp.asarray(prompt), 10))
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(prompt), max_new_tokens=10, do_sample=False)
    theirs = theirs[:, prompt.shape[1] :].numpy()
    print("Flax:", ours.tolist())
    print("HF:  ", theirs.tolist())
    print("greedy generation", "matches" if np.array_equal(ours, theirs) else "DIFFERS")


if __name__ == "__main__":
    main()

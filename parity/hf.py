"""Conversion rules for Hugging Face ``transformers`` models (``pip install "attentions[llama]"``).

``parity`` does not import ``transformers``: these rules name HF's classes by their type
names and read a config by its attributes, so this module imports without it. They plug
into ``parity.torch_to_flax`` and ``parity.trace`` (``rules=``, ``mapping=``; see
``parity.convert``).

LLaMA (``LlamaForCausalLM``) onto a Flax model built from our layers with the layout of
``examples.llama_flax`` (each row a module, PyTorch -> Flax):

=====================================================  ==================================
``model.embed_tokens`` (``nn.Embedding``)              ``embed`` (``nn.Embed``)
``model.layers.N.input_layernorm`` (``LlamaRMSNorm``)  ``blocks_N/ln1`` (``scale``)
``model.layers.N.self_attn``                           ``blocks_N/attn``
                                                       (``GroupedSelfAttention``)
``model.layers.N.self_attn.{q,k,v,o}_proj``            ``blocks_N/attn/w_{q,k,v,o}``
``model.layers.N.post_attention_layernorm``            ``blocks_N/ln2``
``model.layers.N.mlp.{gate,up,down}_proj``             ``blocks_N/mlp/{gate,up,down}_proj``
``model.norm``                                         ``norm``
``lm_head`` (absent if ``tie_word_embeddings``: the    ``lm_head`` (``nn.Dense``, no bias;
Flax port reads the embedding, ``Embed.attend``)       tied: ``embed.attend``)
=====================================================  ==================================

``LlamaRMSNorm.weight`` becomes ``scale`` (``LLAMA_RULES``); the projections are
``nn.Linear`` and follow the generic rule (kernel transposed). A tied ``lm_head`` is
converted once, as the embedding (``parity.convert``). Example::

    from parity.hf import LLAMA_RULES, llama_mapping, logits_model

    params = parity.torch_to_flax(hf_model, rules=LLAMA_RULES, mapping=llama_mapping(cfg))
    report = parity.trace(
        logits_model(hf_model), flax_model, None, ids,
        rules=LLAMA_RULES, mapping=llama_mapping(cfg), grads=True,
    )
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LLAMA_RULES", "LogitsModel", "llama_mapping", "logits_model", "rope_theta"]

LLAMA_RULES: dict[str, dict[str, str]] = {"LlamaRMSNorm": {"weight": "scale"}}
"""``rules=`` for LLaMA: ``LlamaRMSNorm.weight`` -> ``scale`` (the rest is generic)."""

_ATTENTION = {"q_proj": "w_q", "k_proj": "w_k", "v_proj": "w_v", "o_proj": "w_o"}
_BLOCK = {"input_layernorm": "ln1", "self_attn": "attn", "post_attention_layernorm": "ln2"}


def llama_mapping(config: Any) -> dict[str, str]:
    """``mapping=`` for a ``LlamaForCausalLM`` of ``config`` (a ``LlamaConfig``) onto the
    Flax layout in the module docstring (one entry per renamed module; ``mlp`` and its
    projections keep HF's names)."""
    mapping = {"model.embed_tokens": "embed", "model.layers": "blocks", "model.norm": "norm"}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        for theirs, ours in _BLOCK.items():
            mapping[f"{layer}.{theirs}"] = f"blocks_{i}/{ours}"
        for theirs, ours in _ATTENTION.items():
            mapping[f"{layer}.self_attn.{theirs}"] = f"blocks_{i}/attn/{ours}"
    return mapping


def rope_theta(config: Any) -> float:
    """The RoPE base of a LLaMA ``config`` (``rope_parameters["rope_theta"]`` in
    transformers 5, ``rope_theta`` before); only the default RoPE (no scaling) ports."""
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", "default"))
    if kind != "default":
        raise ValueError(f"only the default RoPE ports onto our layers, not {kind!r}")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class LogitsModel(nn.Module):
    """A causal LM's ``model`` and ``lm_head`` under their own names, whose ``forward``
    returns the logits tensor (as the Flax port does) instead of a ``ModelOutput``:
    ``lm_head(model(ids, use_cache=False).last_hidden_state)``, what
    ``LlamaForCausalLM.forward`` computes. The modules are the HF model's own (not
    copies), so paths and ``state_dict`` keys are the same: for ``parity.trace``, whose
    final row then compares logits with logits."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.lm_head(hidden)


def logits_model(causal_lm: nn.Module) -> LogitsModel:
    """``LogitsModel(causal_lm)``."""
    return LogitsModel(causal_lm)

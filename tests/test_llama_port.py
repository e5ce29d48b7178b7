"""A tiny Hugging Face LLaMA ported onto our layers (``examples.llama_flax``, ``parity.hf``):
``parity.trace`` within tolerance on every module and gradient, and greedy generation
equal to HF's ``generate`` token for token. Those tests need ``transformers`` (the
``llama`` extra) and are skipped without it; the model-level conversion rules they use
(``rules=``, ``mapping=``, tied parameters) are tested here without it too."""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import parity
from examples.llama_flax import Llama, generate, tiny_config
from parity.hf import LLAMA_RULES, llama_mapping, logits_model, rope_theta

# -- the model-level rules, without transformers -------------------------------------------


class ScaleNorm(nn.Module):
    """A norm type parity has no built-in rule for (as HF's ``LlamaRMSNorm``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.final = ScaleNorm(4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.tok.weight


@pytest.mark.parametrize("key", [ScaleNorm, "ScaleNorm"], ids=["type", "name"])
def test_rules_add_a_module_type_by_type_or_name(key):
    norm = ScaleNorm(4)
    with pytest.raises(parity.ConversionError, match="ScaleNorm"):
        parity.torch_to_flax(norm)
    params = parity.torch_to_flax(norm, rules={key: {"weight": "scale"}})
    np.testing.assert_array_equal(params["scale"], norm.weight.detach().numpy())


def test_mapping_renames_and_tied_parameters_convert_once():
    model = TiedLM()
    params = parity.torch_to_flax(
        model, rules={"ScaleNorm": {"weight": "scale"}}, mapping={"tok": "embed", "final": "norm"}
    )
    assert set(params) == {"embed", "norm"}  # out.weight is tok.weight: converted once
    np.testing.assert_array_equal(params["embed"]["embedding"], model.tok.weight.detach().numpy())
    with pytest.raises(ValueError, match="no module"):
        parity.torch_to_flax(model, mapping={"missing": "x"})


# -- the LLaMA port (transformers) ---------------------------------------------------------


def _hf(**overrides):
    transformers = pytest.importorskip("transformers")
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    return config, transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_llama():
    return _hf()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(64, size=(2, 12))


def _trace(config, hf, tokens, dtype, grads=True):
    return parity.trace(
        logits_model(hf),
        Llama(config),
        None,
        tokens,
        dtype=dtype,
        rules=LLAMA_RULES,
        mapping=llama_mapping(config),
        grads=grads,
    )


def _expected_rows(config):
    # the embedding; per layer: 2 norms, 4 projections, attention, 3 MLP projections,
    # MLP, the layer; then the final norm, the head and the model
    return 1 + config.num_hidden_layers * 12 + 3


def test_float32_trace_passes_on_every_module_and_gradient(hf_llama, tokens):
    config, hf = hf_llama
    report = _trace(config, hf, tokens, "float32")
    assert report.passed, report.table()
    assert len(report.modules) == _expected_rows(config)
    assert len(report.gradients) == len(list(hf.parameters()))
    # HF's modules without a Flax module: RoPE tables, the activation, LlamaModel's own
    # ModelOutput (its effects are in the next rows)
    assert set(report.torch_only) == {
        "model",
        "model.rotary_emb",
        *(f"model.layers.{i}.mlp.act_fn" for i in range(config.num_hidden_layers)),
    }
    assert not report.flax_only


def test_float64_trace_names_hf_float32_rmsnorm_first(hf_llama, tokens):
    """HF's LlamaRMSNorm computes in float32 whatever the dtype: a float64 trace fails
    there first, by float32-sized errors."""
    config, hf = hf_llama
    report = _trace(config, hf, tokens, "float64", grads=False)
    first = report.first_failure
    assert first is not None and first.torch == "model.layers.0.input_layernorm"
    assert max(row.max_rel for row in report.modules) < 1e-6


@contextlib.contextmanager
def _hf_without_float32_steps():
    """HF's LlamaRMSNorm and LlamaRotaryEmbedding computing in the model's dtype (float64
    here) instead of float32, for the duration."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")

    def rms_forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def rope_forward(self, x, position_ids):
        dim = getattr(self.config, "head_dim", None) or (
            self.config.hidden_size // self.config.num_attention_heads
        )
        exponents = -torch.arange(0, dim, 2, dtype=torch.float64) / dim
        inv_freq = torch.tensor(rope_theta(self.config), dtype=torch.float64) ** exponents
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    patches = [
        (llama.LlamaRMSNorm, "forward", rms_forward),
        (llama.LlamaRotaryEmbedding, "forward", rope_forward),
    ]
    saved = [(cls, name, vars(cls)[name]) for cls, name, _ in patches]
    try:
        for cls, name, method in patches:
            setattr(cls, name, method)
        yield
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)


def test_float64_trace_is_exact_without_hf_float32_steps(hf_llama, tokens):
    config, hf = hf_llama
    with _hf_without_float32_steps():
        report = _trace(config, hf, tokens, "float64")
    assert report.passed, report.table()


def test_greedy_generation_matches_hf_generate(hf_llama, tokens):
    config, hf = hf_llama
    params = parity.torch_to_flax(hf, rules=LLAMA_RULES, mapping=llama_mapping(config))
    prompt = tokens[:, :5]
    steps = 10
    ours = np.asarray(generate(Llama(config), params, jnp.asarray(prompt), steps))
    with torch.no_grad():
        theirs = hf.generate(torch.as_tensor(prompt), max_new_tokens=steps, do_sample=False)
    np.testing.assert_array_equal(ours, theirs[:, prompt.shape[1] :].numpy())


def test_tied_embeddings_convert_once_and_trace(tokens):
    config, hf = _hf(tie_word_embeddings=True, num_hidden_layers=1)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    params = parity.torch_to_flax(hf, rules=LLAMA_RULES, mapping=llama_mapping(config))
    assert "lm_head" not in params
    report = parity.trace(
        logits_model(hf),
        Llama(config),
        None,
        tokens,
        rules=LLAMA_RULES,
        mapping=llama_mapping(config),
        grads=True,
    )
    assert report.passed, report.table()
    assert "lm_head.weight" not in [row.torch for row in report.gradients]


def test_rules_are_needed_and_name_the_module(hf_llama):
    config, hf = hf_llama
    with pytest.raises(parity.ConversionError, match="LlamaRMSNorm"):
        parity.torch_to_flax(hf, mapping=llama_mapping(config))

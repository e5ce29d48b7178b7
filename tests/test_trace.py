"""``parity.trace``: a tiny decoder in PyTorch, Flax linen and Flax NNX, traced module by module.

The twins: token embedding, two blocks of (LayerNorm, causal multi-head attention from our
layers, residual, LayerNorm, MLP with an activation module, residual), a final LayerNorm
and a head. A planted divergence (one LayerNorm's epsilon, one activation's formula) must
be named as the first failure, with every module before it passing.
"""

from __future__ import annotations

import json

import flax.linen as fnn
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import attentions_jax as aj
import attentions_jax.nnx as ajn
import attentions_torch as at
from parity import ConversionError, TraceReport, nnx_params, torch_to_flax, trace

VOCAB, WIDTH, HEADS, BATCH, LENGTH = 11, 16, 2, 2, 7
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH))
EPS = 1e-5


# -- PyTorch ------------------------------------------------------------------------------


class TorchMLP(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
    def __init__(self, eps: float = EPS, approximate: str = "none"):
        super().__init__()
        self.ln1 = nn.LayerNorm(WIDTH, eps=EPS)
        self.attn = at.MultiHeadSelfAttention(WIDTH, HEADS, bias=True)
        self.ln2 = nn.LayerNorm(WIDTH, eps=eps)
        self.mlp = TorchMLP(approximate)

    def forward(self, x):
        x = x + self.attn(self.ln1(x), is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class TorchLM(nn.Module):
    """``planted``: ``"eps"`` (blocks.1.ln2's epsilon) or ``"gelu"`` (blocks.1.mlp.act)."""

    def __init__(self, planted: str | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            [
                TorchBlock(),
                TorchBlock(
                    eps=1e-2 if planted == "eps" else EPS,
                    approximate="tanh" if planted == "gelu" else "none",
                ),
            ]
        )
        self.ln_f = nn.LayerNorm(WIDTH, eps=EPS)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class TorchRenamedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class TorchRenamedBlock(TorchBlock):
    """``TorchBlock`` with the MLP as ``ff`` (``up``, ``down``)."""

    def __init__(self):
        super().__init__()
        del self.mlp
        self.ff = TorchRenamedMLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x), is_causal=True)[0]
        return x + self.ff(self.ln2(x))


class TorchRenamedLM(nn.Module):
    """``TorchLM`` with other names: ``tok_emb``, ``layers``, ``ff``, ``norm``, ``lm_head``."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList([TorchRenamedBlock(), TorchRenamedBlock()])
        self.norm = nn.LayerNorm(WIDTH, eps=EPS)
        self.lm_head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.tok_emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


RENAMED = {
    "tok_emb": "embed",
    "layers": "blocks",
    "layers.0.ff": "blocks_0/mlp",  # linen's spelling
    "layers.1.ff": "blocks/1/mlp",  # NNX's spelling: the same path
    "layers.0.ff.up": "blocks_0/mlp/fc1",
    "layers.0.ff.down": "blocks_0/mlp/fc2",
    "layers.1.ff.up": "blocks_1/mlp/fc1",
    "layers.1.ff.down": "blocks_1/mlp/fc2",
    "norm": "ln_f",
    "lm_head": "head",
}


# -- Flax linen ---------------------------------------------------------------------------


class LinenGELU(fnn.Module):
    def __call__(self, x):
        return fnn.gelu(x, approximate=False)


class LinenMLP(fnn.Module):
    def setup(self):
        self.fc1 = fnn.Dense(2 * WIDTH)
        self.act = LinenGELU()
        self.fc2 = fnn.Dense(WIDTH)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LinenBlock(fnn.Module):
    def setup(self):
        self.ln1 = fnn.LayerNorm(epsilon=EPS)
        self.attn = aj.MultiHeadSelfAttention(WIDTH, HEADS, bias=True)
        self.ln2 = fnn.LayerNorm(epsilon=EPS)
        self.mlp = LinenMLP()

    def __call__(self, x):
        x = x + self.attn(self.ln1(x), is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class LinenLM(fnn.Module):
    def setup(self):
        self.embed = fnn.Embed(VOCAB, WIDTH)
        self.blocks = [LinenBlock(), LinenBlock()]
        self.ln_f = fnn.LayerNorm(epsilon=EPS)
        self.head = fnn.Dense(VOCAB)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# -- Flax NNX -----------------------------------------------------------------------------


class NNXGELU(nnx.Module):
    def __call__(self, x):
        return nnx.gelu(x, approximate=False)


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.act = NNXGELU()
        self.fc2 = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(WIDTH, epsilon=EPS, rngs=rngs)
        self.attn = ajn.MultiHeadSelfAttention(WIDTH, HEADS, bias=True, rngs=rngs)
        self.ln2 = nnx.LayerNorm(WIDTH, epsilon=EPS, rngs=rngs)
        self.mlp = NNXMLP(rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x), is_causal=True)[0]
        return x + self.mlp(self.ln2(x))


class NNXLM(nnx.Module):
    """``dtype``: what ``nnx.Embed`` computes in; unlike linen's ``Embed`` (and NNX's
    ``Linear`` and ``LayerNorm``), it does not follow its parameters' dtype, but fixes
    ``dtype or param_dtype`` when built."""

    def __init__(self, rngs: nnx.Rngs, dtype: str | None = None):
        self.embed = nnx.Embed(VOCAB, WIDTH, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(rngs), NNXBlock(rngs)])
        self.ln_f = nnx.LayerNorm(WIDTH, epsilon=EPS, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def flax_lm(framework: str, dtype: str = "float64"):
    return NNXLM(nnx.Rngs(0), dtype) if framework == "nnx" else LinenLM()


EXECUTION_ORDER = [
    "embed",
    *(
        f"blocks.{i}.{name}"
        for i in range(2)
        for name in (
            "ln1",
            "attn.w_q",
            "attn.w_k",
            "attn.w_v",
            "attn.w_o",
            "attn",
            "ln2",
            "mlp.fc1",
            "mlp.act",
            "mlp.fc2",
            "mlp",
            "",
        )
    ),
    "ln_f",
    "head",
    "(model)",
]
EXECUTION_ORDER = [path.rstrip(".") for path in EXECUTION_ORDER]


def modules_of(report: TraceReport) -> list[str]:
    """The module paths of the rows, each once, in row order."""
    return list(dict.fromkeys(row.torch for row in report.modules))


# -- tests --------------------------------------------------------------------------------
# float64 traces run op by op (jit=False): they share JAX's per-operation compilations, so
# each costs a fraction of a second; the float32 and bfloat16 ones run as one jax.jit
# program each (trace's default).


def trace64(torch_model, flax_model, **options) -> TraceReport:
    return trace(torch_model, flax_model, None, TOKENS, dtype="float64", jit=False, **options)


@pytest.fixture(scope="module")
def twins() -> dict[str, tuple[TraceReport, nn.Module, object]]:
    """``{framework: (float64 trace with gradients, the PyTorch model, the Flax model)}``."""
    runs = {}
    for framework in ("linen", "nnx"):
        torch_lm, flax_model = TorchLM(), flax_lm(framework)
        runs[framework] = (trace64(torch_lm, flax_model, grads=True), torch_lm, flax_model)
    return runs


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_float64_twins_pass_everywhere_with_gradients(twins, framework):
    report = twins[framework][0]
    assert report.passed, report.table()
    assert report.first_failure is None
    assert modules_of(report) == EXECUTION_ORDER
    assert report.torch_only == report.flax_only == []
    # the attention layers' (out, weights) compare element by element
    attn = [row for row in report.modules if row.torch == "blocks.0.attn"]
    assert [(row.output, row.shape) for row in attn] == [
        ("[0]", (BATCH, LENGTH, WIDTH)),
        ("[1]", (BATCH, HEADS, LENGTH, LENGTH)),
    ]
    assert max(row.max_abs for row in report.modules) < 1e-13
    names = [name for name, _ in TorchLM().named_parameters()]
    assert [row.torch for row in report.gradients] == names
    assert max(row.max_abs for row in report.gradients) < 1e-13
    flax_names = {row.torch: row.flax for row in report.gradients}
    assert flax_names["blocks.0.attn.w_q.weight"] == "blocks_0/attn/w_q/kernel"
    assert flax_names["blocks.1.ln2.weight"] == "blocks_1/ln2/scale"
    assert flax_names["embed.weight"] == "embed/embedding"
    flax_paths = {row.torch: row.flax for row in report.modules}
    nnx_spelling = framework == "nnx"
    assert flax_paths["blocks.1.mlp.fc2"] == (
        "blocks/1/mlp/fc2" if nnx_spelling else "blocks_1/mlp/fc2"
    )


def test_models_unchanged_and_nnx_classes_restored(twins):
    for _, torch_lm, _ in twins.values():
        assert next(torch_lm.parameters()).dtype == torch.float32
        assert all(not m._forward_hooks for m in torch_lm.modules())
    flax_model = twins["nnx"][2]
    params = jax.tree.map(np.asarray, nnx_params(flax_model))
    assert jax.tree.all(jax.tree.map(np.array_equal, params, nnx_params(NNXLM(nnx.Rngs(0)))))
    assert "__call__" not in vars(ajn.MultiHeadSelfAttention)  # inherited again
    assert not hasattr(vars(nnx.Linear)["__call__"], "__wrapped__")
    assert not hasattr(NNXBlock.__call__, "__wrapped__")


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize(
    ("planted", "culprit"), [("eps", "blocks.1.ln2"), ("gelu", "blocks.1.mlp.act")]
)
def test_planted_divergence_is_the_first_failure(framework, planted, culprit):
    report = trace64(TorchLM(planted), flax_lm(framework))
    assert not report.passed
    assert report.first_failure.torch == culprit
    position = modules_of(report).index(culprit)
    before = [row for row in report.modules if row.torch in modules_of(report)[:position]]
    assert before and all(row.passed for row in before)
    assert max(row.max_abs for row in before) < 1e-13
    assert f"first failure module {culprit} " in report.summary()
    assert not next(row for row in report.modules if row.torch == "(model)").passed


def test_gradient_divergence_is_named():
    """An NNX port whose ``nnx.Embed`` computes in float32 (its default, fixed when it is
    built): every output agrees (the lookup is exact), the embedding's gradient does not."""
    x64 = jax.config.jax_enable_x64
    report = trace64(TorchLM(), NNXLM(nnx.Rngs(0)), grads=True)
    assert jax.config.jax_enable_x64 == x64  # 64-bit mode was on for the trace only
    assert all(row.passed for row in report.modules)
    assert not report.passed
    assert [row.torch for row in report.gradients if not row.passed] == ["embed.weight"]
    assert report.first_failure.torch == "embed.weight"
    assert "first failure gradient of embed.weight (Flax embed/embedding)" in report.summary()


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_given_variables_are_used(framework):
    """The Flax side runs the given weights (one LayerNorm scale perturbed here)."""
    torch_lm = TorchLM()
    params = torch_to_flax(torch_lm)
    params["blocks_0"]["ln2"]["scale"] = params["blocks_0"]["ln2"]["scale"] * 1.001
    variables = params if framework == "nnx" else {"params": params}
    report = trace(torch_lm, flax_lm(framework), variables, TOKENS, dtype="float64", jit=False)
    assert report.first_failure.torch == "blocks.0.ln2"


def test_given_variables_must_match_the_nnx_model():
    params = torch_to_flax(TorchLM())
    del params["head"]["bias"]
    with pytest.raises(ConversionError, match=r"missing \['head/bias'\]"):
        trace(TorchLM(), flax_lm("nnx"), params, TOKENS, dtype="float64", jit=False)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_mapping_renames_modules_and_parameters(framework):
    report = trace64(TorchRenamedLM(), flax_lm(framework), mapping=RENAMED, grads=True)
    assert report.passed, report.table()
    assert report.torch_only == report.flax_only == []
    flax_paths = {row.torch: row.flax for row in report.modules}
    assert flax_paths["tok_emb"] == "embed"
    assert flax_paths["layers.1.ff.down"] == (
        "blocks/1/mlp/fc2" if framework == "nnx" else "blocks_1/mlp/fc2"
    )
    grads = {row.torch: row.flax for row in report.gradients}
    assert grads["lm_head.weight"] == "head/kernel"
    assert grads["layers.0.ff.up.bias"] == "blocks_0/mlp/fc1/bias"
    assert grads["layers.1.attn.w_q.weight"] == "blocks_1/attn/w_q/kernel"


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_unmatched_parameters_are_named(framework):
    with pytest.raises(ConversionError) as error:
        trace(TorchRenamedLM(), flax_lm(framework), None, TOKENS)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "PyTorch only" in message and "Flax only" in message
    assert "tok_emb.weight (as tok_emb/embedding)" in message
    assert "layers.0.ff.up.weight" in message
    assert "embed/embedding" in message and "blocks_1/mlp/fc2/kernel" in message
    assert "mapping=" in message


def test_misshaped_and_uncovered_parameters_are_named():
    torch_lm = TorchLM()
    torch_lm.head = nn.Linear(WIDTH, VOCAB + 1)
    with pytest.raises(ConversionError, match=r"mis-shaped: head\.weight -> head/kernel"):
        trace(torch_lm, LinenLM(), None, TOKENS)
    torch_lm = TorchLM()
    torch_lm.register_parameter("temperature", nn.Parameter(torch.ones(())))
    with pytest.raises(ConversionError, match="no conversion rule for 'temperature'"):
        trace(torch_lm, LinenLM(), None, TOKENS)


@pytest.mark.parametrize(
    ("dtype", "framework", "grads"),
    [
        ("float32", "linen", True),
        ("float32", "nnx", False),
        ("bfloat16", "linen", False),
        ("bfloat16", "nnx", True),
    ],
)
def test_lower_precisions_pass_at_the_tolerances(dtype, framework, grads):
    report = trace(TorchLM(), flax_lm(framework, dtype), None, TOKENS, dtype=dtype, grads=grads)
    assert report.passed, report.table()
    assert len(report.gradients) == (len(list(TorchLM().parameters())) if grads else 0)
    worst = max(row.max_abs for row in report.modules)
    assert 0.0 < worst < (1e-4 if dtype == "float32" else 0.5)


def test_unmatched_modules_are_listed_not_failed():
    """An activation module that the port writes as a function: PyTorch only."""

    class InlineMLP(fnn.Module):
        def setup(self):
            self.fc1 = fnn.Dense(2 * WIDTH)
            self.fc2 = fnn.Dense(WIDTH)

        def __call__(self, x):
            return self.fc2(fnn.gelu(self.fc1(x), approximate=False))

    class InlineBlock(LinenBlock):
        def setup(self):
            self.ln1 = fnn.LayerNorm(epsilon=EPS)
            self.attn = aj.MultiHeadSelfAttention(WIDTH, HEADS, bias=True)
            self.ln2 = fnn.LayerNorm(epsilon=EPS)
            self.mlp = InlineMLP()

    class InlineLM(LinenLM):
        def setup(self):
            self.embed = fnn.Embed(VOCAB, WIDTH)
            self.blocks = [InlineBlock(), InlineBlock()]
            self.ln_f = fnn.LayerNorm(epsilon=EPS)
            self.head = fnn.Dense(VOCAB)

    report = trace64(TorchLM(), InlineLM())
    assert report.passed, report.table()
    assert report.torch_only == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert report.flax_only == []
    assert "PyTorch only (not compared): blocks.0.mlp.act, blocks.1.mlp.act" in report.table()


def test_table_and_dict(twins):
    report = twins["linen"][0]
    table = report.table()
    lines = table.splitlines()
    assert lines[0] == "parity.trace: PyTorch vs Flax linen, float64, tolerance |err| <= 1e-10"
    header = [
        "#",
        "PyTorch module",
        "Flax module",
        "shape",
        "max abs",
        "max rel",
        "ULPs",
        "err/tol",
    ]
    assert [cell.strip() for cell in lines[1].split("  ") if cell.strip()] == header
    row = next(line for line in lines if " blocks.0.attn[1] " in line)
    assert "blocks_0/attn[1]" in row and "(2, 2, 7, 7)" in row and row.endswith("PASS")
    assert "gradients of sum(final output * fixed random cotangent):" in table
    assert any(" blocks.1.ln2.weight " in line and "blocks_1/ln2/scale" in line for line in lines)
    assert (
        lines[-1] == report.summary() == "PASS (float64, 30 module outputs, 37 parameter gradients)"
    )

    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is True and data["first_failure"] is None
    assert data["dtype"] == "float64" and data["framework"] == "linen"
    assert data["tolerance"] == "|err| <= 1e-10"
    assert [m["torch"] for m in data["modules"]][:3] == [
        "embed",
        "blocks.0.ln1",
        "blocks.0.attn.w_q",
    ]
    first = data["modules"][0]
    assert set(first) == {
        "torch",
        "flax",
        "output",
        "shape",
        "max_abs",
        "max_rel",
        "ulps",
        "ratio",
        "passed",
        "note",
    }
    assert first["shape"] == [BATCH, LENGTH, WIDTH]
    assert data["unmatched"] == {"torch": [], "flax": []}
    assert len(data["gradients"]) == 37

    failed = trace64(TorchLM("eps"), LinenLM())
    summary = failed.table().splitlines()[-1]
    assert summary.startswith("FAIL (float64, 30 module outputs; 9 fail): first failure module ")
    assert "blocks.1.ln2 (Flax blocks_1/ln2)" in summary
    failing = failed.to_dict()
    assert failing["passed"] is False
    assert failing["first_failure"]["torch"] == "blocks.1.ln2"
    assert failing["first_failure"]["flax"] == "blocks_1/ln2"
    assert any(
        " blocks.1.ln2 " in line and line.endswith("FAIL") for line in failed.table().splitlines()
    )


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        trace(TorchLM(), LinenLM(), None, TOKENS, dtype="float16")

"""Bad input raises the same ValueError text in both packages, before any computation."""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attentions_jax as aj
import attentions_torch as at

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    ("MultiHeadSelfAttention", {"d_model": 10, "num_heads": 3}, "divisible by num_heads"),
    ("MultiHeadSelfAttention", {"d_model": 0, "num_heads": 1}, "d_model must be a positive"),
    ("MultiHeadSelfAttention", {"d_model": 8, "num_heads": 0}, "num_heads must be a positive"),
    ("MultiHeadSelfAttention", {"d_model": 8, "num_heads": 2.0}, "num_heads must be a positive"),
    ("MultiHeadSelfAttention", {"d_model": 6, "num_heads": 2, "rope": True}, "even head width"),
    ("VanillaSelfAttention", {"d_model": 8, "dropout": 1.0}, "dropout must be in"),
    ("VanillaSelfAttention", {"d_model": 8, "temperature": 0.0}, "temperature must be positive"),
    ("VanillaSelfAttention", {"d_model": 8, "input_dim": -1}, "input_dim must be a positive"),
]


def _messages(torch_call, flax_call) -> tuple[str, str]:
    with pytest.raises(ValueError) as t_err:
        torch_call()
    with pytest.raises(ValueError) as j_err:
        flax_call()
    return str(t_err.value), str(j_err.value)


def test_validation_modules_are_identical():
    assert filecmp.cmp(
        ROOT / "attentions_torch/_validation.py",
        ROOT / "attentions_jax/_validation.py",
        shallow=False,
    )


@pytest.mark.parametrize(("cls", "kwargs", "expected"), CONFIGS)
def test_invalid_configuration(cls, kwargs, expected):
    t_msg, j_msg = _messages(lambda: getattr(at, cls)(**kwargs), lambda: getattr(aj, cls)(**kwargs))
    assert t_msg == j_msg
    assert expected in t_msg


L = 5
CALLS = [
    ("x of rank 2", np.zeros((L, 8)), None, re.escape("expected x of shape (B, L, 8), got (5, 8)")),
    ("wrong last dim", np.zeros((2, L, 7)), None, re.escape("got (2, 5, 7)")),
    ("empty sequence", np.zeros((2, 0, 8)), None, "sequence length L >= 1"),
    ("mask (3, 5)", np.zeros((2, L, 8)), np.ones((3, L)), re.escape("mask of shape (3, 5)")),
    ("mask rank 1", np.zeros((2, L, 8)), np.ones((L,)), re.escape("mask of shape (5,)")),
    ("mask rank 5", np.zeros((2, L, 8)), np.ones((1, 1, 1, L, L)), "rank-4 shape"),
    ("mask wrong batch", np.zeros((2, L, 8)), np.ones((3, L, L)), re.escape("(3, 5, 5)")),
    ("mask wrong heads", np.zeros((2, L, 8)), np.ones((2, 3, L, L)), re.escape("(2, 3, 5, 5)")),
    (
        "mask wrong length",
        np.zeros((2, L, 8)),
        np.ones((2, 1, 1, L + 1)),
        re.escape("(2, 1, 1, 6)"),
    ),
]


@pytest.mark.parametrize(("what", "x", "mask", "expected"), CALLS, ids=[c[0] for c in CALLS])
def test_invalid_call(what, x, mask, expected):
    torch_layer = at.MultiHeadSelfAttention(8, 2)
    flax_layer = aj.MultiHeadSelfAttention(8, 2)
    variables = flax_layer.init(jax.random.key(0), jnp.zeros((2, L, 8)))
    t_mask = None if mask is None else torch.tensor(mask)
    j_mask = None if mask is None else jnp.asarray(mask)
    t_msg, j_msg = _messages(
        lambda: torch_layer(torch.tensor(x, dtype=torch.float32), t_mask),
        lambda: flax_layer.apply(variables, jnp.asarray(x, jnp.float32), j_mask),
    )
    assert t_msg == j_msg
    assert re.search(expected, t_msg)


@pytest.mark.parametrize("builder", ["local_mask", "dilated_mask", "block_mask"])
@pytest.mark.parametrize("size", [0, -2])
def test_mask_builders_reject_non_positive_sizes(builder, size):
    t_msg, j_msg = _messages(
        lambda: getattr(at, builder)(8, size), lambda: getattr(aj, builder)(8, size)
    )
    assert t_msg == j_msg and "must be a positive integer" in t_msg

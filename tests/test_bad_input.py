"""Bad and extreme input for every registered mechanism, in both frameworks (docs/semantics.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity import MECHANISMS, torch_to_flax
from tests import helpers

L = 7


def _pair(mechanism, **overrides):
    torch.manual_seed(0)
    torch_layer = mechanism.torch_layer(**overrides).eval()
    flax_layer = mechanism.flax_layer(**overrides)
    return torch_layer, flax_layer, {"params": torch_to_flax(torch_layer)}


def _input(mechanism, batch: int = 2, length: int = L) -> np.ndarray:
    """A float32 input ``(B, L, input_width)`` of the registry row's layer."""
    width = helpers.input_width(mechanism)
    return np.random.default_rng(0).standard_normal((batch, length, width)).astype(np.float32)


def _both(mechanism, x, mask=None, need_weights=True, layers=None):
    """``{framework: (out, weights)}`` in float32 (``helpers.run_both``) of ``layers``, by
    default the registry row's."""
    torch_layer, flax_layer = layers or _pair(mechanism)[:2]
    return helpers.run_both(
        torch_layer, flax_layer, x, mask, dtype="float32", need_weights=need_weights
    )


def _messages(mechanism, x, mask) -> tuple[str, str]:
    torch_layer, flax_layer, variables = _pair(mechanism)
    with pytest.raises(ValueError) as t_err:
        torch_layer(torch.tensor(x), None if mask is None else torch.tensor(mask))
    with pytest.raises(ValueError) as j_err:
        flax_layer.apply(variables, jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    return str(t_err.value), str(j_err.value)


BAD_CALLS = {
    "rank 2 input": lambda w: (np.zeros((L, w), np.float32), None),
    "rank 4 input": lambda w: (np.zeros((1, 2, L, w), np.float32), None),
    "wrong last dimension": lambda w: (np.zeros((2, L, w + 1), np.float32), None),
    "mask not broadcastable": lambda w: (np.zeros((2, L, w), np.float32), np.ones((2, 3, 1, L))),
    "mask of the wrong length": lambda w: (
        np.zeros((2, L, w), np.float32),
        np.ones((L + 1, L + 1)),
    ),
    "mask of rank 1": lambda w: (np.zeros((2, L, w), np.float32), np.ones((L,))),
}


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_the_same_value_error(mechanism, case):
    x, mask = BAD_CALLS[case](helpers.input_width(mechanism))
    t_msg, j_msg = _messages(mechanism, x, mask)
    assert t_msg == j_msg
    assert "expected" in t_msg


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_length_one_and_empty_batch(mechanism):
    for batch, length in ((2, 1), (0, L)):
        x = _input(mechanism, batch, length)
        for need_weights in (True, False):
            runs = _both(mechanism, x, need_weights=need_weights)
            (t_out, t_w), (j_out, j_w) = runs["torch"], runs["jax"]
            assert t_out.shape == j_out.shape == (batch, length, mechanism.kwargs["d_model"])
            np.testing.assert_allclose(t_out, j_out, atol=1e-5, rtol=1e-5)
            assert np.isfinite(t_out).all() and np.isfinite(j_out).all()
            if need_weights:
                np.testing.assert_allclose(t_w, j_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_nan_input_stays_in_its_batch_element(mechanism):
    """Documented behaviour: NaN/inf in a sequence propagate to that sequence only."""
    x = _input(mechanism)
    x[0, 3, 0] = np.nan
    for out, _ in _both(mechanism, x, need_weights=False).values():
        assert np.isnan(out[0]).any()
        assert np.isfinite(out[1]).all()


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_huge_logits_give_finite_results(mechanism):
    """Queries scaled by 1e4: scores of ~1e4..1e8 must not overflow the softmax."""
    torch_layer, flax_layer, _ = _pair(mechanism)
    with torch.no_grad():
        torch_layer.w_q.weight.mul_(1e4)
    params = torch_to_flax(torch_layer)
    x, keep = _input(mechanism), helpers.user_mask("batched", np.random.default_rng(1), 2, L)
    for need_weights in (True, False):
        runs = _both(mechanism, x, keep, need_weights, layers=(torch_layer, flax_layer))
        for out, weights in runs.values():
            assert np.isfinite(out).all() and (weights is None or np.isfinite(weights).all())

        def loss(params, need_weights=need_weights):
            out, _ = flax_layer.apply({"params": params}, x, keep, need_weights=need_weights)
            return out.sum()

        grads = jax.jit(jax.grad(loss))(params)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

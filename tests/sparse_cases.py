"""Checks shared by the tests of the sparse family (local, dilated, block).

Each ``check_*`` runs one case for one mechanism, named by its registry name
(``parity.mechanisms``); the test files parametrize them with the mechanism's own sizes.
The references' patterns are written from docs/semantics.md in tests/reference.py, not taken from
the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity import torch_to_flax
from parity.mechanisms import by_name
from tests import helpers

B, L, E, H = 2, 75, 16, 2
"""L spans several tiles of every mechanism and is a multiple of none of the sizes used."""


def config(name: str, size: int, **options) -> dict:
    """Constructor arguments of registry row ``name`` with window/rate/block ``size``."""
    mechanism = by_name(name)
    return {"d_model": E, mechanism.size_argument: size, "num_heads": H, **options}


def layers(name: str, size: int, **options):
    """``(torch_layer, flax_layer)`` of registry row ``name`` with window/rate/block ``size``."""
    mechanism, kwargs = by_name(name), config(name, size, **options)
    return mechanism.layer_class("torch")(**kwargs), mechanism.layer_class("jax")(**kwargs)


def user_mask(kind: str, rng: np.random.Generator, length: int = L) -> np.ndarray | None:
    """``helpers.user_mask`` at this module's sizes."""
    return helpers.user_mask(kind, rng, B, length, H)


def check_reference(
    name: str, size: int, mask_kind: str, is_causal: bool, rng, batch: int = B
) -> None:
    """Both frameworks, weights path and fast path, equal the dense float64 reference.

    ``batch=1`` gives the heads of the one sequence the strides of the projection's
    layout (flattening B and H is then a view), which the tilings must honour.
    """
    x = rng.standard_normal((batch, L, E))
    mask = helpers.user_mask(mask_kind, rng, batch, L, H)
    helpers.check_reference(by_name(name), config(name, size, bias=True), x, mask, is_causal)


def check_parity(name: str, size: int, dtype: str, rng) -> None:
    """``compare_layers`` on the fast path under ``jax.jit``, causal, with a square mask
    with a blind row. The registry's rows (tests/test_parity.py) run the weights path, the
    other masks and eager JAX."""
    helpers.check_parity(
        *layers(name, size),
        rng.standard_normal((B, L, E)),
        user_mask("square", rng),
        is_causal=True,
        need_weights=False,
        dtype=dtype,
        jit=True,
    )


def check_blind_rows(name: str, size: int, rng) -> None:
    """Queries that see no key: zero weights, zero output, finite gradients, fast path too."""
    torch_layer, flax_layer = layers(name, size)
    x = rng.standard_normal((B, L, E))
    mask = np.ones((B, 1, L, L), bool)
    mask[0, 0, 3] = False
    mask[1, 0, L - 1] = False
    runs = helpers.run_both(torch_layer, flax_layer, x, mask, need_weights=True)
    for out, weights in runs.values():
        assert not np.any(weights[0, :, 3]) and not np.any(weights[1, :, L - 1])
        assert not np.any(out[0, 3]) and not np.any(out[1, L - 1])  # w_o has no bias

    xt = torch.tensor(x, requires_grad=True)
    out, _ = torch_layer(xt, torch.tensor(mask), need_weights=False)
    out.square().sum().backward()
    assert not np.any(out[0, 3].detach().numpy())
    grads = [xt.grad, *(p.grad for p in torch_layer.parameters())]
    assert all(torch.isfinite(g).all() for g in grads)

    def loss(params, x):
        out, _ = flax_layer.apply({"params": params}, x, jnp.asarray(mask), need_weights=False)
        return jnp.square(out).sum()

    params = torch_to_flax(torch_layer)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def check_invalid_size(name: str, size, message: str) -> None:
    """Both packages reject the size at construction with the same message."""
    errors = []
    for framework in ("torch", "jax"):
        try:
            by_name(name).layer_class(framework)(**config(name, size))
        except ValueError as error:
            errors.append(str(error))
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert message in errors[0]


def check_equals_dense(name: str, size: int, rng) -> None:
    """A size that covers the whole sequence gives the dense multi-head result."""
    torch_layer, flax_layer = layers(name, size)
    dense = by_name("multi_head")
    torch_dense = dense.torch_layer(d_model=E, num_heads=H)
    torch_dense.load_state_dict(torch_layer.state_dict())
    x = rng.standard_normal((B, L, E))
    mask = user_mask("padding", rng)
    for need_weights in (True, False):
        call = {"is_causal": True, "need_weights": need_weights}
        got = helpers.run_both(torch_layer, flax_layer, x, mask, **call)
        want = helpers.run_both(
            torch_dense, dense.flax_layer(d_model=E, num_heads=H), x, mask, **call
        )
        for framework in ("torch", "jax"):
            np.testing.assert_allclose(got[framework][0], want[framework][0], atol=1e-12)
            if need_weights:
                np.testing.assert_allclose(got[framework][1], want[framework][1], atol=1e-12)


def check_only_itself(name: str, size: int, rng) -> None:
    """A pattern of the diagonal alone: weights are the identity, out is ``w_o(w_v(x))``."""
    torch_layer, flax_layer = layers(name, size)
    x = rng.standard_normal((B, L, E))
    torch_layer = torch_layer.double()
    with torch.no_grad():
        expected = torch_layer.w_o(torch_layer.w_v(torch.tensor(x))).numpy()
    for need_weights in (True, False):
        runs = helpers.run_both(torch_layer, flax_layer, x, None, need_weights=need_weights)
        for out, weights in runs.values():
            np.testing.assert_allclose(out, expected, atol=1e-12)
            if need_weights:
                np.testing.assert_array_equal(weights, np.broadcast_to(np.eye(L), weights.shape))


def check_layout(tiling, length: int) -> None:
    """Every run of tiles (the edges, the interior, all) holds the positions ``queries`` and
    ``keys`` name, zeros for padding; ``untile`` puts each query's row back in place; the
    edges are exactly the tiles with padding keys."""
    values = np.arange(1, length + 1, dtype=np.float64)[None, :, None]  # (G, L, D) = p + 1
    x = torch.tensor(values) if isinstance(tiling.queries, torch.Tensor) else jnp.asarray(values)
    queries, keys = np.asarray(tiling.queries), np.asarray(tiling.keys)
    tiles = queries.shape[0]
    front, back = tiling.edges
    for step in (
        slice(0, tiles),
        slice(0, front),
        slice(front, tiles - back),
        slice(tiles - back, tiles),
    ):
        if step.start == step.stop:
            continue
        for laid_out, positions in (
            (tiling.query_tiles(x, step), queries[step]),
            (tiling.key_tiles(x, step), keys[step]),
        ):
            expected = np.where((positions >= 0) & (positions < length), positions + 1, 0)
            np.testing.assert_array_equal(np.asarray(laid_out)[0, :, :, 0], expected)
    everything = tiling.query_tiles(x, slice(0, tiles))
    np.testing.assert_array_equal(np.asarray(tiling.untile(everything)), values)
    np.testing.assert_array_equal(np.sort(queries.reshape(-1)), np.arange(queries.size))
    padded = ((keys < 0) | (keys >= length)).any(axis=1)
    assert not padded[front : tiles - back].any() and padded[:front].all()
    assert padded[tiles - back :].all()

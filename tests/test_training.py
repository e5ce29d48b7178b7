"""The training path (docs/semantics.md "Training", issue 14).

JAX's fast path has a backward of its own (``jax.custom_vjp``: FlashAttention-2's, which
keeps q, k, v, the output and each query's log-sum-exp and recomputes the scores step by
step). These tests hold it to autodiff of the weights path in float64 for every mechanism,
masks with blind rows, ALiBi (slopes included), GQA and positions; to numerical
derivatives (``jax.test_util.check_grads``, ``torch.autograd.gradcheck``); to second-order
reverse mode, ``jax.checkpoint`` and ``vmap``; to linear memory in L; and to one AdamW step
at L = 1024 giving the same parameters in both frameworks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.test_util import check_grads

import attentions_jax as aj
from attentions_jax import functional as jf
from parity import MECHANISMS, flax_to_torch, torch_to_flax
from parity.mechanisms import by_name
from tests import helpers

needs_x64 = pytest.mark.skipif(
    not jax.config.jax_enable_x64, reason="float64 references need JAX's 64-bit mode"
)

B, L = 2, 23


def _blind_mask(rng: np.random.Generator, length: int) -> np.ndarray:
    """A ``(B, L, L)`` keep-mask with random holes and two queries that see nothing."""
    mask = rng.random((B, length, length)) > 0.3
    mask[:, 3] = False
    mask[1, 7] = False
    return mask


def _layer_grads(flax_layer, variables, x, mask, cotangent, **call):
    """Gradients of ``<out, cotangent>`` w.r.t. the parameters and x, under ``jax.jit``."""

    def loss(params, x):
        out, _ = flax_layer.apply({"params": params}, x, mask, **call)
        return jnp.sum(out * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)


def _max_error(a, b) -> float:
    errors = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)
    return max(jax.tree.leaves(errors))


@needs_x64
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "blind"])
def test_fast_path_gradients_equal_the_weights_path(mechanism, is_causal, masked, rng):
    """Both frameworks, float64: the fast path's parameter and input gradients equal
    autodiff of the weights path (``need_weights=True``) to 1e-10."""
    config = {**mechanism.kwargs, "bias": True}
    torch_layer, flax_layer = helpers.make_layers(mechanism, config)
    variables = {"params": torch_to_flax(torch_layer)}
    x = rng.standard_normal((B, L, helpers.input_width(mechanism, config)))
    mask = _blind_mask(rng, L) if masked else None
    cotangent = rng.standard_normal((B, L, config["d_model"]))
    grads = {
        fast: _layer_grads(
            flax_layer,
            variables,
            jnp.asarray(x),
            None if mask is None else jnp.asarray(mask),
            jnp.asarray(cotangent),
            is_causal=is_causal,
            need_weights=not fast,
        )
        for fast in (True, False)
    }
    assert _max_error(grads[True], grads[False]) <= 1e-10

    torch_grads = {}
    for fast in (True, False):
        torch_layer.zero_grad()
        xt = torch.tensor(x, requires_grad=True)
        out, _ = torch_layer(
            xt,
            None if mask is None else torch.tensor(mask),
            is_causal=is_causal,
            need_weights=not fast,
        )
        (out * torch.tensor(cotangent)).sum().backward()
        torch_grads[fast] = [xt.grad.clone()] + [p.grad.clone() for p in torch_layer.parameters()]
    for a, b in zip(torch_grads[True], torch_grads[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # and the two frameworks agree (the gradient of x)
    np.testing.assert_allclose(
        np.asarray(grads[True][1]), torch_grads[True][0].numpy(), atol=1e-10, rtol=0
    )


CORE_CASES = {
    "gqa_causal": {"heads": (4, 2), "is_causal": True},
    "mqa_mask": {"heads": (4, 1), "mask": True},
    "alibi_causal": {"heads": (4, 4), "alibi": True, "is_causal": True},
    "alibi_positions": {"heads": (2, 2), "alibi": True, "positions": True, "mask": True},
    "keys_not_queries": {"heads": (2, 1), "keys": 31, "is_causal": True, "positions": True},
}


def _core_operands(rng, heads, keys=None, length=L, mask=False, alibi=False, positions=False):
    h, kv = heads
    keys = length if keys is None else keys
    q = rng.standard_normal((B, h, length, 8))
    k, v = (rng.standard_normal((B, kv, keys, 8)) for _ in range(2))
    keep = None
    if mask:
        keep = rng.random((B, 1, length, keys)) > 0.3
        keep[:, :, 2] = False
    slopes = 2.0 ** -np.arange(1, h + 1) if alibi else None
    query_positions = key_positions = None
    if positions:
        query_positions = keys - length + 3
        key_positions = np.stack(
            [np.sort(rng.choice(keys + 5, size=keys, replace=False)) for _ in range(B)]
        )
    return q, k, v, keep, slopes, query_positions, key_positions


@needs_x64
@pytest.mark.parametrize("case", list(CORE_CASES), ids=list(CORE_CASES))
def test_core_backward_against_numerical_derivatives(case, rng):
    """``jax.test_util.check_grads`` (reverse mode, first and second order) on the core's
    fast path, many small steps (``STEP_PAIRS`` shrunk), gradients of the ALiBi slopes too;
    and equal to autodiff of the weights path."""
    options = dict(CORE_CASES[case])
    is_causal = options.pop("is_causal", False)
    q, k, v, keep, slopes, qp, kp = _core_operands(rng, **options)
    keep = None if keep is None else jnp.asarray(keep)
    kp = None if kp is None else jnp.asarray(kp)

    def attend(q, k, v, slopes, fast=True):
        out, _ = jf.dot_product_attention(
            q,
            k,
            v,
            keep,
            alibi_slopes=slopes,
            is_causal=is_causal,
            need_weights=not fast,
            query_positions=qp,
            key_positions=kp,
        )
        return out

    args = tuple(jnp.asarray(a) for a in (q, k, v, slopes) if a is not None)
    if slopes is None:
        fast = lambda q, k, v: attend(q, k, v, None)  # noqa: E731
        slow = lambda q, k, v: attend(q, k, v, None, fast=False)  # noqa: E731
    else:
        fast = attend
        slow = lambda q, k, v, s: attend(q, k, v, s, fast=False)  # noqa: E731
    pairs = jf.STEP_PAIRS, jf.BACKWARD_PAIRS
    jf.STEP_PAIRS, jf.BACKWARD_PAIRS = 2**9, 2**8  # several units and query chunks
    try:
        check_grads(fast, args, order=2, modes=["rev"], atol=1e-6, rtol=1e-6)
        cotangent = jnp.asarray(rng.standard_normal(q.shape))
        grads = [
            jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=range(len(args)))(*args)
            for f in (fast, slow)
        ]
    finally:
        jf.STEP_PAIRS, jf.BACKWARD_PAIRS = pairs
    assert _max_error(grads[0], grads[1]) <= 1e-10


@needs_x64
def test_second_order_and_forward_mode(rng):
    """Reverse over reverse works (the backward is JAX code) and equals the weights path's;
    forward mode (``jax.jvp``, ``jax.hessian``) raises JAX's error for a custom VJP."""
    q, k, v, *_ = _core_operands(rng, (2, 2))
    args = tuple(jnp.asarray(a) for a in (q, k, v))

    def norm_of_grad(fast):
        def loss(q, k, v):
            out, _ = jf.dot_product_attention(q, k, v, is_causal=True, need_weights=not fast)
            return jnp.sum(jnp.sin(out))

        return lambda q, k, v: sum(jnp.sum(g**2) for g in jax.grad(loss, (0, 1, 2))(q, k, v))

    second = [jax.grad(norm_of_grad(fast), (0, 1, 2))(*args) for fast in (True, False)]
    assert _max_error(second[0], second[1]) <= 1e-10
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(
            lambda q: jf.dot_product_attention(q, *args[1:], need_weights=False)[0],
            (args[0],),
            (args[0],),
        )


@needs_x64
def test_checkpoint_and_vmap_over_the_layer(rng):
    """``jax.checkpoint`` (remat) of the layer and ``vmap`` over a batch of examples give the
    gradients of the plain layer."""
    layer = aj.MultiHeadSelfAttention(16, 4)
    x = jnp.asarray(rng.standard_normal((3, L, 16)))
    params = jax.tree.map(lambda p: p.astype(x.dtype), layer.init(jax.random.key(0), x)["params"])

    def attend(params, x):
        return layer.apply({"params": params}, x, is_causal=True, need_weights=False)[0]

    def loss(params, x, remat=False):
        return jnp.sum((jax.checkpoint(attend) if remat else attend)(params, x) ** 2)

    plain = jax.grad(loss, (0, 1))(params, x)
    remat = jax.jit(jax.grad(lambda p, x: loss(p, x, remat=True), (0, 1)))(params, x)
    assert _max_error(plain, remat) <= 1e-12
    # per-example gradients through vmap (each example a batch of one) sum to the batch's
    per_example = jax.vmap(jax.grad(loss, (0, 1)), in_axes=(None, 0))(params, x[:, None])
    summed = jax.tree.map(lambda g: g.sum(0), per_example[0])
    assert _max_error(summed, plain[0]) <= 1e-10
    assert _max_error(per_example[1][:, 0], plain[1]) <= 1e-10


@pytest.mark.parametrize(
    "mechanism", [by_name(n) for n in ("multi_head", "alibi", "local")], ids=lambda m: m.name
)
def test_training_memory_grows_linearly(mechanism):
    """XLA's temporaries for forward + backward (compiled, not run): doubling L at most
    doubles them, plus a little (the quadratic autodiff of the steps grew 4x)."""
    layer = mechanism.layer_class("jax")(**{**mechanism.bench_kwargs, "d_model": 64})

    def temporaries(length: int) -> int:
        x = jnp.zeros((1, length, 64), jnp.float32)
        params = layer.init(jax.random.key(0), x[:, :8])

        def loss(params, x):
            out, _ = layer.apply(params, x, is_causal=True, need_weights=False)
            return jnp.sum(out)

        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temporaries(2048), temporaries(4096)
    assert large <= 2.3 * small, (small, large)


@needs_x64
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_one_adamw_step_at_length_1024(mechanism, rng):
    """float64: one ``torch.optim.AdamW`` step and one ``optax.adamw`` step from the same
    weights on a causal L = 1024 batch, both through the fast path, leave the same
    parameters (1e-10)."""
    hyper = {"lr": 1e-2, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.05}
    torch_layer, flax_layer = helpers.make_layers(mechanism, {**mechanism.kwargs, "bias": True})
    params = torch_to_flax(torch_layer)
    x = rng.standard_normal((1, 1024, helpers.input_width(mechanism)))
    target = rng.standard_normal((1, 1024, mechanism.kwargs["d_model"]))

    opt = torch.optim.AdamW(
        torch_layer.parameters(),
        lr=hyper["lr"],
        betas=(hyper["b1"], hyper["b2"]),
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
    )
    out, _ = torch_layer(torch.tensor(x), is_causal=True, need_weights=False)
    ((out - torch.tensor(target)) ** 2).mean().backward()
    opt.step()

    tx = optax.adamw(hyper.pop("lr"), **hyper)

    def loss(p):
        out, _ = flax_layer.apply({"params": p}, jnp.asarray(x), is_causal=True, need_weights=False)
        return ((out - jnp.asarray(target)) ** 2).mean()

    @jax.jit
    def step(params):
        updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    ours = flax_to_torch(step(params))
    for name, value in torch_layer.state_dict().items():
        np.testing.assert_allclose(
            ours[name].numpy(), value.numpy(), atol=1e-10, rtol=0, err_msg=name
        )


@pytest.mark.parametrize(
    "name", ["multi_head", "grouped", "alibi", "local", "dilated", "block", "linear"]
)
def test_torch_gradcheck_on_small_layers(name):
    """``torch.autograd.gradcheck`` (float64, numerical derivatives) of each layer's fast
    path, causal, with a mask that leaves a query blind."""
    mechanism = by_name(name)
    torch.manual_seed(0)
    layer = mechanism.layer_class("torch")(**mechanism.kwargs).double()
    width = helpers.input_width(mechanism)
    x = torch.randn(1, 7, width, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[2] = False

    def attend(x):
        return layer(x, mask, is_causal=True, need_weights=False)[0]

    assert torch.autograd.gradcheck(attend, (x,), atol=1e-6, rtol=1e-5)


def test_torch_second_order_through_the_weights_path():
    """PyTorch: double backward works through ``need_weights=True`` and through the fast
    path raises PyTorch's own error (documented in docs/semantics.md "Training")."""
    layer = by_name("multi_head").layer_class("torch")(16, num_heads=4).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64, requires_grad=True)

    def second(need_weights: bool) -> torch.Tensor:
        out, _ = layer(x, is_causal=True, need_weights=need_weights)
        (grad,) = torch.autograd.grad(out.sin().sum(), x, create_graph=True)
        return torch.autograd.grad((grad**2).sum(), x)[0]

    assert torch.isfinite(second(True)).all()
    with pytest.raises(RuntimeError, match="not implemented"):
        second(False)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_core_backward_in_low_precision(dtype, tolerance, rng):
    """float32 and bfloat16 gradients of the fast path (causal, ALiBi) come back in the
    inputs' dtype, within the dtype's precision of the float32 weights path's (relative to
    the largest entry)."""
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 40, 16)), jnp.float32) for _ in range(3))
    cotangent = jnp.asarray(rng.standard_normal((2, 4, 40, 16)), jnp.float32)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)

    def loss(q, k, v, fast):
        out, _ = jf.dot_product_attention(
            q, k, v, alibi_slopes=slopes, is_causal=True, need_weights=not fast
        )
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    want = jax.grad(loss, (0, 1, 2))(q, k, v, False)
    got = jax.grad(loss, (0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)), True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.dtype(dtype)
        error = jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w))
        assert float(error) <= tolerance


@pytest.mark.parametrize(("length", "keys", "start"), [(2100, 2100, None), (2100, 2400, 300)])
def test_torch_causal_alibi_runs_in_query_chunks(length, keys, start):
    """PyTorch causal ALiBi past ``QUERY_CHUNK`` queries calls SDPA per chunk of queries with
    the keys up to the chunk's last one (about half the work of one call): outputs and
    gradients equal the weights path's in float64."""
    from attentions_torch import functional as tf

    assert length > tf.QUERY_CHUNK
    q = torch.randn(1, 2, length, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, keys, 8, dtype=torch.float64, requires_grad=True) for _ in "kv")
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    positions = {} if start is None else {"query_positions": start, "key_positions": 0}
    results = []
    for need_weights in (False, True):
        out, _ = tf.dot_product_attention(
            q, k, v, alibi_slopes=slopes, is_causal=True, need_weights=need_weights, **positions
        )
        results.append((out, *torch.autograd.grad(out.sin().sum(), (q, k, v))))
    for fast, slow in zip(*results, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)

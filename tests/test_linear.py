"""LinearSelfAttention in both packages against a float64 NumPy reference of docs/semantics.md.

The layers under test use ``chunk_size = 4`` with ``D = 4``, so the causal O(L) path runs
over several chunks and a ragged last chunk at L = 13; one test keeps the default chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

import attentions_jax
import attentions_torch
import parity
from attentions_jax import linear as jlinear
from attentions_torch import linear as tlinear
from tests.reference import rotate

B, L, E, H = 2, 13, 16, 4
D = E // H
EPS = 1e-6


class TorchLinear(attentions_torch.LinearSelfAttention):
    chunk_size = 4


class FlaxLinear(attentions_jax.LinearSelfAttention):
    chunk_size = 4


# ---------------------------------------------------------------- float64 reference


def _phi(x: np.ndarray, feature_map: str) -> np.ndarray:
    return np.where(x > 0, x + 1, np.exp(x)) if feature_map == "elu" else np.maximum(x, 0)


def linear_reference(
    x: np.ndarray,
    state: dict[str, np.ndarray],
    keep: np.ndarray,
    *,
    feature_map: str = "elu",
    rope: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The layer in float64 from the documented formula: ``(out (B, L, E), A (B, H, L, L))``.

    ``keep`` is the full keep-mask (pattern, causal and user mask), broadcastable to
    ``(B, H, L, L)``.
    """

    def linear(name: str, inp: np.ndarray) -> np.ndarray:
        out = inp @ state[f"{name}.weight"].T
        return out + state[f"{name}.bias"] if f"{name}.bias" in state else out

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(t.shape[0], t.shape[1], H, -1).transpose(0, 2, 1, 3)

    q, k, v = (heads(linear(n, x)) for n in ("w_q", "w_k", "w_v"))
    if rope is not None:
        q, k = rotate(q, 10000.0, rope), rotate(k, 10000.0, rope)
    kernel = np.einsum("bhlf,bhsf->bhls", _phi(q, feature_map), _phi(k, feature_map))
    kernel = kernel * np.broadcast_to(keep, kernel.shape)
    weights = kernel / (kernel.sum(-1, keepdims=True) + EPS)
    out = np.einsum("bhls,bhsd->bhld", weights, v)
    merged = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], E)
    return linear("w_o", merged), weights


def _state(layer: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in layer.state_dict().items()}


def _masks(rng: np.random.Generator, length: int = L) -> dict[str, np.ndarray | None]:
    general = rng.random((B, H, length, length)) > 0.4
    general[0, 1, 3] = False  # a query that sees nothing
    lengths = np.array([length, 0])  # the second sequence hides every key
    return {
        "none": None,
        "padding": (np.arange(length)[None, :] < lengths[:, None])[:, None, None, :],
        "query": (np.arange(length) % 3 != 1)[None, None, :, None],
        "rank2": rng.random((length, length)) > 0.3,
        "rank4": general,
    }


def _full_keep(mask: np.ndarray | None, is_causal: bool, length: int = L) -> np.ndarray:
    keep = np.ones((length, length), bool) if mask is None else mask
    if mask is not None and mask.ndim == 2:
        keep = keep[None, None]
    return keep & np.tril(np.ones((length, length), bool)) if is_causal else keep


def _run_torch(layer, x, mask, **call):
    with torch.no_grad():
        out, w = layer(torch.tensor(x), None if mask is None else torch.tensor(mask), **call)
    return out.numpy(), None if w is None else w.numpy()


def _run_flax(layer, params, x, mask, **call):
    out, w = layer.apply(
        {"params": params}, jnp.asarray(x), None if mask is None else jnp.asarray(mask), **call
    )
    return np.asarray(out), None if w is None else np.asarray(w)


def _pair(rng, length=L, **kwargs):
    """A float64 PyTorch layer, its Flax twin, the Flax params and an input."""
    torch_layer = TorchLinear(E, H, **kwargs).double()
    flax_layer = FlaxLinear(E, H, **kwargs)
    params = parity.torch_to_flax(torch_layer)
    return torch_layer, flax_layer, params, rng.standard_normal((B, length, E))


# ------------------------------------------------------------------------ the formula


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(
    ("case", "feature_map"),
    [(c, "elu") for c in ("none", "padding", "query", "rank2", "rank4")]
    + [("padding", "relu"), ("rank4", "relu")],
)
def test_layers_match_float64_reference(rng, case, is_causal, need_weights, feature_map):
    torch_layer, flax_layer, params, x = _pair(rng, feature_map=feature_map)
    mask = _masks(rng)[case]
    ref_out, ref_w = linear_reference(
        x, _state(torch_layer), _full_keep(mask, is_causal), feature_map=feature_map
    )
    call = {"is_causal": is_causal, "need_weights": need_weights}
    for out, w in (
        _run_torch(torch_layer, x, mask, **call),
        _run_flax(flax_layer, params, x, mask, **call),
    ):
        np.testing.assert_allclose(out, ref_out, atol=1e-12, rtol=0)
        if need_weights:
            np.testing.assert_allclose(w, ref_w, atol=1e-12, rtol=0)
        else:
            assert w is None


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_rotates_q_and_k_before_the_feature_map(rng, layout):
    kwargs = {"rope": True, "rope_interleaved": layout == "interleaved", "bias": True}
    torch_layer, flax_layer, params, x = _pair(rng, **kwargs)
    ref_out, _ = linear_reference(x, _state(torch_layer), _full_keep(None, True), rope=layout)
    call = {"is_causal": True, "need_weights": False}
    np.testing.assert_allclose(_run_torch(torch_layer, x, None, **call)[0], ref_out, atol=1e-12)
    np.testing.assert_allclose(
        _run_flax(flax_layer, params, x, None, **call)[0], ref_out, atol=1e-12
    )


@pytest.mark.parametrize("is_causal", [False, True])
def test_default_chunk_over_several_chunks(rng, is_causal):
    """The shipped chunk size (64) at L = 150: two full chunks and a ragged one."""
    torch_layer = attentions_torch.LinearSelfAttention(E, H).double()
    flax_layer = attentions_jax.LinearSelfAttention(E, H)
    x = rng.standard_normal((1, 150, E))
    ref_out, _ = linear_reference(x, _state(torch_layer), _full_keep(None, is_causal, 150))
    call = {"is_causal": is_causal, "need_weights": False}
    np.testing.assert_allclose(_run_torch(torch_layer, x, None, **call)[0], ref_out, atol=1e-12)
    params = parity.torch_to_flax(torch_layer)
    out = _run_flax(flax_layer, params, x, None, **call)[0]
    np.testing.assert_allclose(out, ref_out, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", ["none", "padding", "query", "rank4"])
def test_weights_times_values_is_the_output(rng, case, is_causal):
    """``A @ V`` equals the attention output, also where the output skips A (O(L) paths)."""
    q, k, v = (rng.standard_normal((B, H, L, D)) for _ in range(3))
    mask = _masks(rng)[case]
    t_out, t_w = tlinear.linear_attention(
        *(torch.tensor(a) for a in (q, k, v)),
        None if mask is None else torch.tensor(mask),
        is_causal=is_causal,
        chunk_size=4,
    )
    np.testing.assert_allclose((t_w @ torch.tensor(v)).numpy(), t_out.numpy(), atol=1e-12)
    j_out, j_w = jlinear.linear_attention(
        *(jnp.asarray(a) for a in (q, k, v)), mask, is_causal=is_causal, chunk_size=4
    )
    np.testing.assert_allclose(np.asarray(j_w @ v), np.asarray(j_out), atol=1e-12)
    rows = np.asarray(j_w).sum(-1)
    assert np.all((rows < 1.0) & (rows >= 0.0))  # each row sums to 1 - eps/(den) or to 0


# ------------------------------------------------------------------- fast == weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["none", "causal", "padding", "rank4"])
def test_fast_path_equals_weights_path(rng, case, dtype):
    x = rng.standard_normal((B, L, E))
    mask = _masks(rng)[case] if case in ("padding", "rank4") else None
    is_causal = case == "causal"
    tdtype, jdtype = getattr(torch, dtype), getattr(jnp, dtype)
    torch_layer = TorchLinear(E, H).to(tdtype)
    flax_layer = FlaxLinear(E, H)
    params = jax.tree.map(lambda p: p.astype(jdtype), parity.torch_to_flax(torch_layer))
    tmask = None if mask is None else torch.tensor(mask)
    outs = []
    with torch.no_grad():
        for need_weights in (True, False):
            out, _ = torch_layer(
                torch.tensor(x, dtype=tdtype), tmask, is_causal=is_causal, need_weights=need_weights
            )
            outs.append(out.float().numpy())
            out, _ = flax_layer.apply(
                {"params": params},
                jnp.asarray(x, jdtype),
                mask,
                is_causal=is_causal,
                need_weights=need_weights,
            )
            outs.append(np.asarray(out, np.float32))
    tol = 1e-5 if dtype == "float32" else 2e-2 * np.abs(outs[0]).max()
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], atol=tol, rtol=1e-5)


# --------------------------------------------------------------- cross-framework parity


@pytest.mark.parametrize(
    ("case", "dtype", "need_weights"),
    [(case, "float64", nw) for case in ("none", "causal", "padding") for nw in (True, False)]
    + [
        ("causal", "float32", True),
        ("causal", "float32", False),
        ("padding", "bfloat16", True),
        ("causal", "bfloat16", False),
    ],
)
def test_parity_report_passes(rng, case, dtype, need_weights):
    """Outputs, weights and all gradients within the tolerances; the Flax side runs eagerly for the
    float64 weights path (as ``python -m parity`` does) and under ``jax.jit`` otherwise."""
    x = rng.standard_normal((B, L, E))
    mask = _masks(rng)["padding"] if case == "padding" else None
    report = parity.compare_layers(
        TorchLinear(E, H, bias=True),
        FlaxLinear(E, H, bias=True),
        x,
        mask,
        is_causal=case == "causal",
        need_weights=need_weights,
        dtype=dtype,
        jit=not (dtype == "float64" and need_weights),
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]
    assert report.get("grad x") is not None and report.get("grad w_q.weight") is not None


def test_general_mask_parity_with_relu_and_rope(rng):
    mask = _masks(rng)["rank4"]
    report = parity.compare_layers(
        TorchLinear(E, H, feature_map="relu", rope=True),
        FlaxLinear(E, H, feature_map="relu", rope=True),
        rng.standard_normal((B, L, E)),
        mask,
        is_causal=True,
        dtype="float64",
    )
    assert report.passed, [c for c in report.comparisons if not c.passed]


def test_causal_fast_path_gradcheck():
    """Gradients through the in-place chunked causal path (float64, two ragged chunks)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64) for _ in range(3))

    def fast(q, k, v):
        return tlinear.linear_attention(q, k, v, is_causal=True, need_weights=False, chunk_size=3)[
            0
        ]

    assert torch.autograd.gradcheck(
        fast, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    )


# --------------------------------------------------------------- zero rows, never NaN


def test_rows_that_see_nothing_are_zero_with_finite_gradients(rng):
    x = rng.standard_normal((B, L, E))
    mask = _masks(rng)["padding"]  # sequence 1 sees no key at all
    layer = TorchLinear(E, H).double()
    for need_weights in (True, False):
        for is_causal in (False, True):
            xt = torch.tensor(x, requires_grad=True)
            layer.zero_grad()
            out, w = layer(xt, torch.tensor(mask), is_causal=is_causal, need_weights=need_weights)
            out.sum().backward()
            # zero attention output, so only the w_o bias (none here) remains
            assert torch.all(out[1] == 0)
            assert torch.isfinite(xt.grad).all()
            assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
            if need_weights:
                assert torch.all(w[1] == 0)
    flax_out, flax_w = FlaxLinear(E, H).apply(
        {"params": parity.torch_to_flax(layer)}, jnp.asarray(x), mask, is_causal=True
    )
    assert np.all(np.asarray(flax_out[1]) == 0) and np.all(np.asarray(flax_w[1]) == 0)


def test_relu_features_all_zero_give_zero_not_nan():
    q = -torch.rand(1, 1, 5, 2, dtype=torch.float64)  # relu(q) = 0 everywhere
    k, v = torch.rand(1, 1, 5, 2, dtype=torch.float64), torch.rand(1, 1, 5, 2, dtype=torch.float64)
    for is_causal in (False, True):
        for need_weights in (True, False):
            out, w = tlinear.linear_attention(
                q, k, v, feature_map="relu", is_causal=is_causal, need_weights=need_weights
            )
            assert torch.all(out == 0)
            assert w is None or torch.all(w == 0)
            j_out, _ = jlinear.linear_attention(
                *(jnp.asarray(t.numpy()) for t in (q, k, v)),
                feature_map="relu",
                is_causal=is_causal,
                need_weights=need_weights,
            )
            assert np.all(np.asarray(j_out) == 0)


def test_empty_batch_gives_empty_outputs(rng):
    torch_layer, flax_layer, params, _ = _pair(rng)
    for is_causal in (False, True):
        for need_weights in (False, True):
            call = {"is_causal": is_causal, "need_weights": need_weights}
            for out, w in (
                _run_torch(torch_layer, np.zeros((0, L, E)), None, **call),
                _run_flax(flax_layer, params, np.zeros((0, L, E)), None, **call),
            ):
                assert out.shape == (0, L, E)
                assert w is None or w.shape == (0, H, L, L)


# ---------------------------------------------------------------- recurrent decoding


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rope": True, "bias": True},
        {"rope": True, "rope_interleaved": False, "feature_map": "relu"},
    ],
)
def test_recurrent_steps_equal_the_causal_pass_in_both_frameworks(rng, kwargs):
    torch_layer, flax_layer, params, x = _pair(rng, length=21, **kwargs)
    variables = {"params": params}
    full = _run_torch(torch_layer, x, None, is_causal=True, need_weights=False)[0]

    cache = torch_layer.init_cache(B)
    torch_steps = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            cache, y_t = torch_layer.decode(cache, torch.tensor(x[:, t : t + 1]))
            torch_steps.append(y_t.numpy())
    assert cache.lengths.tolist() == [x.shape[1]] * B

    def body(cache, x_t):
        return flax_layer.apply(variables, cache, x_t, method="decode")

    start = flax_layer.apply(variables, B, method="init_cache")
    _, flax_steps = jax.jit(lambda xs: lax.scan(body, start, xs))(jnp.swapaxes(x, 0, 1)[:, :, None])

    torch_steps = np.concatenate(torch_steps, axis=1)
    flax_steps = np.swapaxes(np.asarray(flax_steps)[:, :, 0], 0, 1)
    np.testing.assert_allclose(torch_steps, full, atol=1e-12)
    np.testing.assert_allclose(flax_steps, full, atol=1e-12)
    np.testing.assert_allclose(torch_steps, flax_steps, atol=1e-10)  # the float64 tolerance


def test_recurrent_step_in_float32_and_bfloat16(rng):
    torch_layer = TorchLinear(E, H)
    x = torch.tensor(rng.standard_normal((B, 9, E)), dtype=torch.float32)
    with torch.no_grad():
        full, _ = torch_layer(x, is_causal=True, need_weights=False)
        cache = torch_layer.init_cache(B)
        assert cache.kv.dtype == torch.float32
        for t in range(x.shape[1]):
            cache, y_t = torch_layer.decode(cache, x[:, t : t + 1])
            np.testing.assert_allclose(y_t[:, 0].numpy(), full[:, t].numpy(), atol=1e-5, rtol=1e-5)
        half = torch_layer.to(torch.bfloat16)
        cache = half.init_cache(B)
        assert cache.kv.dtype == torch.float32  # the state accumulates in float32
        cache, y_t = half.decode(cache, x[:, :1].to(torch.bfloat16))
        assert y_t.dtype == torch.bfloat16
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), parity.torch_to_flax(torch_layer))
    flax_layer = FlaxLinear(E, H)
    start = flax_layer.apply({"params": params}, B, method="init_cache")
    assert start.kv.dtype == jnp.float32
    _, y_t = flax_layer.apply(
        {"params": params}, start, jnp.asarray(x[:, :1].numpy(), jnp.bfloat16), method="decode"
    )
    assert y_t.dtype == jnp.bfloat16


# --------------------------------------------------------------------------- dropout


def test_dropout_drops_weights_and_takes_the_quadratic_path(rng):
    x = rng.standard_normal((B, L, E))
    torch_layer = TorchLinear(E, H, dropout=0.5).double()
    xt = torch.tensor(x)
    evaluated, eval_w = torch_layer.eval()(xt, is_causal=True)
    torch_layer.train()
    torch.manual_seed(1)
    trained, train_w = torch_layer(xt, is_causal=True)
    torch.manual_seed(1)
    fast, _ = torch_layer(xt, is_causal=True, need_weights=False)
    torch.testing.assert_close(train_w, eval_w)  # weights are returned before dropout
    torch.testing.assert_close(fast, trained)  # the same draw on either path
    assert not torch.allclose(trained, evaluated)

    flax_layer = FlaxLinear(E, H, dropout=0.5)
    variables = {"params": parity.torch_to_flax(torch_layer)}
    rngs = {"dropout": jax.random.key(3)}
    dropped, w = flax_layer.apply(variables, x, is_causal=True, deterministic=False, rngs=rngs)
    dropped_fast, _ = flax_layer.apply(
        variables, x, is_causal=True, need_weights=False, deterministic=False, rngs=rngs
    )
    np.testing.assert_allclose(np.asarray(w), eval_w.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(dropped_fast), np.asarray(dropped), atol=1e-12)
    assert not np.allclose(np.asarray(dropped), evaluated.detach().numpy())


# ----------------------------------------------------------------------- compilation


def test_jit_matches_eager(rng):
    _, flax_layer, params, x = _pair(rng)
    mask = _masks(rng)["padding"]
    apply = jax.jit(flax_layer.apply, static_argnames=("is_causal", "need_weights"))
    for is_causal in (False, True):
        for need_weights in (False, True):
            call = {"is_causal": is_causal, "need_weights": need_weights}
            eager = _run_flax(flax_layer, params, x, mask, **call)
            jitted = apply({"params": params}, x, mask, **call)
            np.testing.assert_allclose(np.asarray(jitted[0]), eager[0], atol=1e-12)


def test_torch_compile_matches_eager(rng):
    layer = TorchLinear(E, H)
    x = torch.tensor(rng.standard_normal((1, 10, E)), dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        eager, _ = layer(x, is_causal=True, need_weights=False)
        out, _ = compiled(x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_map": "softmax"}, "feature_map must be one of ('elu', 'relu'), got 'softmax'"),
        ({"temperature": 0.5}, "temperature must be 1.0 for linear attention"),
        ({"num_heads": 3}, "d_model must be divisible by num_heads"),
        ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ],
)
def test_invalid_configurations_raise_the_same_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attentions_torch.LinearSelfAttention(E, **kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attentions_jax.LinearSelfAttention(E, **kwargs)


def test_invalid_decode_calls_raise_the_same_error(rng):
    torch_layer, flax_layer, params, _ = _pair(rng)
    variables = {"params": params}
    cache = torch_layer.init_cache(B)
    start = flax_layer.apply(variables, B, method="init_cache")
    for bad, message in (
        (np.zeros((3, 1, E)), "x holds 3 sequences but the cache holds B = 2"),
        (np.zeros((B, 1, E + 1)), r"expected x of shape \(B, T, 16\), got \(2, 1, 17\)"),
        (np.zeros((B, E)), r"expected x of shape \(B, T, 16\), got \(2, 16\)"),
    ):
        with pytest.raises(ValueError, match=message):
            torch_layer.decode(cache, torch.tensor(bad))
        with pytest.raises(ValueError, match=message):
            flax_layer.apply(variables, start, jnp.asarray(bad), method="decode")
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        torch_layer.init_cache(0)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        flax_layer.apply(variables, 0, method="init_cache")


# ---------------------------------------------------------------- positions and keys S != L


@pytest.mark.parametrize(
    "query_positions, key_positions",
    [(None, None), (12, 0), (5, 3), ("array", None), ("batched", 2)],
)
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_core_with_positions_and_longer_keys(
    rng, query_positions, key_positions, is_causal, need_weights
):
    """Queries at an offset against a longer key sequence (docs/semantics.md, "Positions"):
    causal is ``s_j <= p_i``, and both packages equal the float64 reference."""
    from tests import reference

    length, keys = 7, 19
    if query_positions == "array":
        query_positions = np.array([0, 2, 4, 6, 8, 10, 30])
    elif query_positions == "batched":
        query_positions = np.stack([np.arange(length) + 4, np.arange(length) + 11])
    q = rng.standard_normal((B, H, length, D))
    k, v = rng.standard_normal((2, B, H, keys, D))
    mask = rng.random((B, 1, length, keys)) > 0.3
    if np.ndim(query_positions) == 2:  # per sequence: the reference row by row
        keep = np.concatenate(
            [
                reference.keep_mask(
                    length,
                    mask[b : b + 1],
                    is_causal,
                    keys=keys,
                    query_positions=query_positions[b],
                    key_positions=key_positions,
                )
                for b in range(B)
            ]
        )
    else:
        keep = reference.keep_mask(
            length,
            mask,
            is_causal,
            keys=keys,
            query_positions=query_positions,
            key_positions=key_positions,
        )
    expected, expected_w = reference.linear_attention(q, k, v, keep)
    as_torch, as_jax = (
        lambda p: torch.tensor(p) if isinstance(p, np.ndarray) else p,
        lambda p: jnp.asarray(p) if isinstance(p, np.ndarray) else p,
    )
    runs = {
        "torch": tlinear.linear_attention(
            *(torch.tensor(a) for a in (q, k, v)),
            torch.tensor(mask),
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=as_torch(query_positions),
            key_positions=as_torch(key_positions),
        ),
        "jax": jlinear.linear_attention(
            *(jnp.asarray(a) for a in (q, k, v)),
            jnp.asarray(mask),
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=as_jax(query_positions),
            key_positions=as_jax(key_positions),
        ),
    }
    for framework, (out, weights) in runs.items():
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-12, rtol=0, err_msg=framework)
        if need_weights:
            np.testing.assert_allclose(
                np.asarray(weights), expected_w, atol=1e-12, rtol=0, err_msg=framework
            )
        else:
            assert weights is None

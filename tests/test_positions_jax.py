"""Positions in the JAX cores (SPEC §9): queries at an offset against a longer key sequence.

Every mechanism's core is called on its own (``method="attend"``, or the functional core)
with queries at positions ``p`` and keys at positions ``s``: start offsets, and for the
dense core integer positions ``(L,)`` / ``(B, L)`` and starts traced under ``jax.jit``.
Outputs and weights are compared with the float64 reference of tests/reference.py, whose
rules are written on positions from docs/semantics.md; the fast path equals the weights
path. RoPE is checked on positions too, and in float32 (64-bit mode off) its traced
angles stay within a few ulps of the float64 ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attentions_jax as aj
from attentions_jax import functional as jf
from attentions_jax import rope
from tests import reference

B, H, K, D = 2, 4, 2, 4
L, S = 7, 19
"""Queries against a longer key sequence; neither length a multiple of a size below."""

STARTS = [(12, 0), (5, 3)]
"""``(query_start, key_start)``: queries at the end of the keys, and both shifted."""

TOLERANCE = 1e-10


def _qkv(rng, heads=H, kv_heads=K, length=L, keys=S):
    q = rng.standard_normal((B, heads, length, D))
    k, v = (rng.standard_normal((B, kv_heads, keys, D)) for _ in "kv")
    return q, k, v


def _user_mask(kind: str, rng, length=L, keys=S) -> np.ndarray | None:
    """A keep-mask ``(L, S)``, ``(B, L, S)`` or rank 4, each with a query that sees nothing."""
    if kind == "none":
        return None
    shape = {"square": (length, keys), "batched": (B, length, keys), "rank4": (B, 1, length, keys)}
    mask = rng.random(shape[kind]) > 0.3
    mask[..., 2, :] = False  # a blind row
    return mask


def _rank4(mask: np.ndarray | None) -> jax.Array | None:
    """The rank-4 keep-mask the layers hand to ``attend``."""
    if mask is None:
        return None
    if mask.ndim == 3:
        mask = mask[:, None]
    return jnp.asarray(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))


def _row(positions, b: int):
    """The positions of batch element b: a start, ``(n,)``, or row b of ``(B, n)``."""
    return positions if positions is None or np.ndim(positions) < 2 else positions[b]


def _reference(
    q,
    k,
    v,
    mask,
    *,
    query_positions,
    key_positions,
    is_causal,
    slopes=False,
    pattern="dense",
    size=0,
    scale=None,
):
    """Float64 out and weights, one batch element at a time (positions may be per element)."""
    outs, weights = [], []
    length, keys = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        qp, kp = _row(query_positions, b), _row(key_positions, b)
        element = None if mask is None else (mask if mask.ndim == 2 else mask[b : b + 1])
        keep = reference.keep_mask(
            length,
            element,
            is_causal=is_causal,
            pattern=pattern,
            size=size,
            keys=keys,
            query_positions=qp,
            key_positions=kp,
        )
        bias = reference.alibi_bias(q.shape[1], length, keys, qp, kp) if slopes else None
        out, weight = reference.softmax_attention(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], keep, bias, scale=scale
        )
        outs.append(out)
        weights.append(weight)
    return np.concatenate(outs), np.concatenate(weights)


def _close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got), want, atol=TOLERANCE, rtol=0)


POSITIONS = {
    "starts 12, 0": (12, 0),
    "starts 5, 3": (5, 3),
    "arrays (L,), start": (np.array([3, 9, 4, 4, 20, 0, 11]), 2),
    "arrays (B, L), (B, S)": "batched",
}


def _positions(kind, rng):
    if kind == "batched":
        return rng.integers(-3, 25, (B, L)), rng.integers(0, 25, (B, S))
    return kind


CORE_CASES = [
    # (positions, mask kind): each kind of positions with two mask ranks
    ("starts 12, 0", "none"),
    ("starts 12, 0", "rank4"),
    ("starts 5, 3", "square"),
    ("starts 5, 3", "batched"),
    ("arrays (L,), start", "square"),
    ("arrays (L,), start", "rank4"),
    ("arrays (B, L), (B, S)", "none"),
    ("arrays (B, L), (B, S)", "batched"),
]


@pytest.mark.parametrize(("positions", "mask_kind"), CORE_CASES)
def test_core_matches_reference(positions, mask_kind, rng):
    """GQA, causal and not, ALiBi and not: out and weights on both paths."""
    q, k, v = _qkv(rng)
    qpos, kpos = _positions(POSITIONS[positions], rng)
    mask = _user_mask(mask_kind, rng)
    slopes = reference.alibi_slopes(H)
    for is_causal in (False, True):
        for alibi in (False, True):
            want_out, want_w = _reference(
                q,
                k,
                v,
                mask,
                query_positions=qpos,
                key_positions=kpos,
                is_causal=is_causal,
                slopes=alibi,
            )
            call = dict(
                is_causal=is_causal,
                alibi_slopes=slopes if alibi else None,
                query_positions=None if qpos is None else jnp.asarray(qpos),
                key_positions=None if kpos is None else jnp.asarray(kpos),
            )
            out, weights = jf.dot_product_attention(q, k, v, _rank4(mask), **call)
            fast, none = jf.dot_product_attention(q, k, v, _rank4(mask), need_weights=False, **call)
            assert none is None
            _close(out, want_out)
            _close(weights, want_w)
            _close(fast, want_out)


STEP_MODES = {
    # (QUERY_CHUNK, UNIT_CHUNK, STEP_PAIRS) with L = 7, S = 19, G = 2
    "all heads per step": (2, 1024, 2**21),
    "one head group per step": (2, 2, 2 * 2 * 19),
}


@pytest.mark.parametrize("mode", sorted(STEP_MODES))
def test_fast_path_steps_slice_the_positions(mode, monkeypatch, rng):
    """Several steps (a ragged last one), per batch element or all at once: positions
    ``(B, L)`` are sliced with the step's queries and batch elements."""
    query_chunk, unit_chunk, step_pairs = STEP_MODES[mode]
    monkeypatch.setattr(jf, "QUERY_CHUNK", query_chunk)
    monkeypatch.setattr(jf, "UNIT_CHUNK", unit_chunk)
    monkeypatch.setattr(jf, "STEP_PAIRS", step_pairs)
    q, k, v = _qkv(rng)
    qpos, kpos = rng.integers(0, 25, (B, L)), rng.integers(0, 25, (B, S))
    mask = _user_mask("rank4", rng)
    for qp, kp in ((qpos, kpos), (9, 4), (qpos[0], 1)):
        want, _ = _reference(
            q, k, v, mask, query_positions=qp, key_positions=kp, is_causal=True, slopes=True
        )
        fast, _ = jf.dot_product_attention(
            q,
            k,
            v,
            _rank4(mask),
            is_causal=True,
            alibi_slopes=reference.alibi_slopes(H),
            need_weights=False,
            query_positions=jnp.asarray(qp),
            key_positions=jnp.asarray(kp),
        )
        _close(fast, want)


def test_traced_starts_under_jit(rng):
    """Starts passed as traced scalars: one compiled function serves every offset."""
    q, k, v = _qkv(rng)
    slopes = reference.alibi_slopes(H)

    @jax.jit
    def run(query_start, key_start):
        call = dict(
            is_causal=True,
            alibi_slopes=slopes,
            query_positions=query_start,
            key_positions=key_start,
        )
        fast, _ = jf.dot_product_attention(q, k, v, need_weights=False, **call)
        return fast, *jf.dot_product_attention(q, k, v, **call)

    for qs, ks in [*STARTS, (0, 0), (-2, 6)]:
        fast, out, weights = run(jnp.asarray(qs), jnp.asarray(ks))
        want_out, want_w = _reference(
            q, k, v, None, query_positions=qs, key_positions=ks, is_causal=True, slopes=True
        )
        _close(fast, want_out)
        _close(out, want_out)
        _close(weights, want_w)
    assert run._cache_size() == 1


def test_default_positions_are_the_old_rule(rng):
    """Without positions S != L keeps the top-left rule ``j <= i`` (keys 0..S-1)."""
    q, k, v = _qkv(rng)
    want_out, want_w = _reference(
        q, k, v, None, query_positions=None, key_positions=None, is_causal=True
    )
    out, weights = jf.dot_product_attention(q, k, v, is_causal=True)
    _close(out, want_out)
    _close(weights, want_w)


SPARSE = {
    "local": aj.LocalSelfAttention,
    "dilated": aj.DilatedSelfAttention,
    "block": aj.BlockSelfAttention,
}

SPARSE_CASES = [
    # (mechanism, size, (query_start, key_start), mask kind, is_causal): sizes that divide
    # neither length, every mask rank, the two offsets of STARTS
    ("local", 5, (12, 0), "batched", True),
    ("local", 2, (5, 3), "square", False),
    ("local", 9, (5, 3), "rank4", True),
    ("dilated", 3, (12, 0), "rank4", True),
    ("dilated", 3, (5, 3), "square", False),
    ("dilated", 30, (5, 3), "none", True),
    ("block", 4, (12, 0), "square", True),
    ("block", 16, (5, 3), "batched", True),
    ("block", 4, (5, 3), "none", False),
]


def _sparse_run(layer, is_causal: bool, query_start: int, key_start: int):
    """The jitted fast path and weights path of ``layer.attend`` at these starts."""

    @jax.jit
    def run(q, k, v, mask):
        call = dict(
            is_causal=is_causal,
            query_positions=query_start,
            key_positions=key_start,
            method="attend",
        )
        fast, _ = layer.apply({}, q, k, v, mask, need_weights=False, **call)
        return fast, *layer.apply({}, q, k, v, mask, need_weights=True, **call)

    return run


@pytest.mark.parametrize(("name", "size", "starts", "mask_kind", "is_causal"), SPARSE_CASES)
def test_sparse_matches_reference(name, size, starts, mask_kind, is_causal, rng):
    """Tiles whose keys start elsewhere: out and weights of both paths."""
    layer = SPARSE[name](H * D, size, H)
    q, k, v = _qkv(rng, kv_heads=H)
    mask = _user_mask(mask_kind, rng)
    fast, out, weights = _sparse_run(layer, is_causal, *starts)(q, k, v, _rank4(mask))
    want_out, want_w = _reference(
        q,
        k,
        v,
        mask,
        query_positions=starts[0],
        key_positions=starts[1],
        is_causal=is_causal,
        pattern=name,
        size=size,
        scale=layer.scale,
    )
    _close(fast, want_out)
    _close(out, want_out)
    _close(weights, want_w)


SPARSE_SHAPES = [
    # (mechanism, size, (L, S, query_start, key_start)): several tiles with an interior,
    # keys shorter than the queries, keys after them, one query at the end of the keys
    ("local", 5, (40, 70, 37, 2)),
    ("local", 5, (1, 40, 39, 0)),
    ("dilated", 4, (40, 70, 37, 2)),
    ("dilated", 4, (20, 9, 3, 30)),
    ("block", 6, (40, 70, 37, 2)),
    ("block", 6, (7, 19, 0, 12)),
]


@pytest.mark.parametrize(("name", "size", "shape"), SPARSE_SHAPES)
def test_sparse_shapes(name, size, shape, rng):
    """Layouts with an interior, with edges only, with queries that see no key."""
    length, keys, query_start, key_start = shape
    layer = SPARSE[name](H * D, size, H)
    q, k, v = _qkv(rng, kv_heads=H, length=length, keys=keys)
    mask = rng.random((B, 1, 1, keys)) > 0.2  # a key-padding mask
    fast, out, weights = _sparse_run(layer, True, query_start, key_start)(
        q, k, v, jnp.asarray(mask)
    )
    want_out, want_w = _reference(
        q,
        k,
        v,
        mask,
        query_positions=query_start,
        key_positions=key_start,
        is_causal=True,
        pattern=name,
        size=size,
        scale=layer.scale,
    )
    _close(fast, want_out)
    _close(out, want_out)
    _close(weights, want_w)


DENSE = {
    "vanilla": (aj.VanillaSelfAttention, (), False),
    "multi_head": (aj.MultiHeadSelfAttention, (H,), False),
    "grouped": (aj.GroupedSelfAttention, (H, K), False),
    "alibi": (aj.ALiBiSelfAttention, (H,), True),
}


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_layers_attend_on_positions(name, rng):
    """``SelfAttention.attend`` hands positions to the core (ALiBi's slopes included)."""
    cls, args, slopes = DENSE[name]
    layer = cls(H * D, *args)
    heads, kv_heads = layer.head_counts()
    q, k, v = _qkv(rng, heads=heads, kv_heads=kv_heads)
    qpos, kpos = rng.integers(0, 25, (B, L)), 3
    mask = _user_mask("batched", rng)
    want_out, want_w = _reference(
        q,
        k,
        v,
        mask,
        query_positions=qpos,
        key_positions=kpos,
        is_causal=True,
        slopes=slopes,
        scale=layer.scale,
    )
    for need_weights in (True, False):
        out, weights = layer.apply(
            {},
            q,
            k,
            v,
            _rank4(mask),
            is_causal=True,
            need_weights=need_weights,
            query_positions=jnp.asarray(qpos),
            key_positions=kpos,
            method="attend",
        )
        _close(out, want_out)
        if need_weights:
            _close(weights, want_w)


@pytest.mark.parametrize(
    "positions",
    [
        np.arange(L, dtype=np.float32),
        np.zeros((L + 1,), np.int32),
        np.zeros((3, L), np.int32),
        2.0,
        True,
    ],
    ids=["float", "wrong length", "wrong batch", "float start", "bool"],
)
def test_bad_positions_in_the_core(positions, rng):
    q, k, v = _qkv(rng)
    for need_weights in (True, False):
        with pytest.raises(ValueError, match="query_positions must be None, a start offset"):
            jf.dot_product_attention(q, k, v, query_positions=positions, need_weights=need_weights)
    with pytest.raises(ValueError, match="positions must be None, a start offset"):
        rope.apply_rope(q, positions=positions)


@pytest.mark.parametrize("name", list(SPARSE))
def test_tiled_mechanisms_take_int_starts_only(name, rng):
    layer = SPARSE[name](H * D, 4, H)
    q, k, v = _qkv(rng, kv_heads=H)
    for value in (jnp.arange(L), jnp.asarray(3), 2.0, True):
        with pytest.raises(ValueError, match="query_positions of a tiled mechanism"):
            layer.apply(
                {},
                q,
                k,
                v,
                None,
                is_causal=False,
                need_weights=False,
                query_positions=value,
                method="attend",
            )
    with pytest.raises(ValueError, match="key_positions of a tiled mechanism"):
        layer.apply(
            {},
            q,
            k,
            v,
            None,
            is_causal=False,
            need_weights=False,
            key_positions=np.arange(S),
            method="attend",
        )


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize(
    "positions",
    [None, 12, np.array([5, 0, 3, 3, 17, 2, 40]), "batched"],
    ids=["none", "start", "(L,)", "(B, L)"],
)
def test_rope_on_positions(layout, positions, rng):
    """Eager (NumPy tables) and jitted (traced positions, float64): explicit rotations."""
    x = rng.standard_normal((B, H, L, 8))
    if isinstance(positions, str):
        positions = rng.integers(0, 1000, (B, L))
    want = np.stack([reference.rotate(x[b], 500.0, layout, _row(positions, b)) for b in range(B)])
    call = dict(base=500.0, interleaved=layout == "interleaved")
    _close(rope.apply_rope(x, positions=positions, **call), want)
    if positions is not None:
        traced = jax.jit(lambda x, p: rope.apply_rope(x, positions=p, **call))
        _close(traced(x, jnp.asarray(positions)), want)


def test_rope_without_positions_is_unchanged(rng):
    """``positions=None`` rotates by the float64 NumPy tables of ``rope_angles``, bit for bit."""
    x = jnp.asarray(rng.standard_normal((1, 2, 9, 8)), jnp.float32)
    angles = rope.rope_angles(9, 8, 10000.0)
    want = rope.rotate(x, np.cos(angles), np.sin(angles), interleaved=True)
    np.testing.assert_array_equal(np.asarray(rope.apply_rope(x)), np.asarray(want))


def test_rope_traced_positions_in_float32():
    """64-bit mode off: traced positions up to 2**31 - 1 give cos and sin within a few
    float32 ulps of float64 (``position * inv_freq`` in float32 is ~1e-3 rad off at 16k)."""
    positions = np.concatenate(
        [np.arange(0, 2**20, 997), np.arange(2**20 - 64, 2**20 + 1), [-(2**20), 2**31 - 1]]
    )
    d_head, base = 64, 10000.0
    inv_freq = base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    angles = positions[:, None].astype(np.float64) * inv_freq
    with jax.enable_x64(False):
        # pairs (1, 0) turn into (cos, sin) of the angle
        x = jnp.zeros((1, 1, positions.size, d_head), jnp.float32).at[..., 0::2].set(1.0)
        rotate = jax.jit(lambda x, p: rope.apply_rope(x, positions=p, base=base))
        out = np.asarray(rotate(x, jnp.asarray(positions, jnp.int32)), np.float64)[0, 0]
    error = max(
        np.abs(out[:, 0::2] - np.cos(angles)).max(), np.abs(out[:, 1::2] - np.sin(angles)).max()
    )
    assert error <= 8 * 2.0**-24, error

"""Queries and keys of their own in PyTorch (docs/semantics.md, "Positions"): queries at an
offset against a longer (or shorter) key sequence, or at explicit positions, for the core
and every mechanism's ``attend``, against the float64 reference of tests/reference.py.

Each case runs the weights path and the fast path (so fast == weights holds through the
reference) with no mask and with user masks ``(L, S)``, ``(B, L, S)``, ``(B, H, L, S)`` and
key padding ``(B, 1, 1, S)``, the random ones with a query that sees nothing. L = 7 and
S = 19 are multiples of none of the sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attentions_torch as at
from attentions_torch import functional, local, sparse
from tests import reference

B, H, D = 2, 4, 4
L, S = 7, 19
TOLERANCE = 1e-10
MASKS = ("none", "square", "batched", "per_head", "padding")

STARTS = [(12, 0), (5, 3), (0, 12), (0, 0)]
"""``(query_start, key_start)``: the queries at the end of the keys (a cache), inside them,
before them (causal hides every key from some queries), and both at 0 with S != L."""


def _mask(kind: str, rng, length: int = L, keys: int = S) -> np.ndarray | None:
    """A user keep-mask of one kind; the random ones hide query ``length // 3`` from every
    key (in the last sequence and the first head where it has those axes)."""
    blind = length // 3
    if kind == "none":
        return None
    if kind == "padding":
        lengths = np.array([keys, keys // 2 + 1])
        return (np.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    shape = {
        "square": (length, keys),
        "batched": (B, length, keys),
        "per_head": (B, H, length, keys),
    }
    keep = rng.random(shape[kind]) > 0.3
    keep[(..., blind, slice(None)) if kind == "square" else (-1, ..., blind, slice(None))] = False
    if kind == "per_head":
        keep[-1, 1:, blind] = True  # only the first head of the last sequence is blind
    return keep


def _rank4(mask: np.ndarray | None) -> torch.Tensor | None:
    """The mask as the layers hand it to ``attend``: a rank-4 bool tensor."""
    if mask is None:
        return None
    keep = torch.tensor(mask)
    return {2: keep[None, None], 3: keep[:, None], 4: keep}[keep.dim()]


def _qkv(rng, length: int = L, keys: int = S, kv_heads: int = H):
    q = rng.standard_normal((B, H, length, D))
    k = rng.standard_normal((B, kv_heads, keys, D))
    v = rng.standard_normal((B, kv_heads, keys, D))
    return q, k, v


def _reference(
    q,
    k,
    v,
    mask,
    *,
    is_causal,
    query_positions,
    key_positions,
    pattern="dense",
    size=0,
    alibi=False,
    scale=None,
):
    """Float64 ``(out, weights)``; positions may be ``(B, n)``: one sequence at a time."""
    outs, weights = [], []
    for b in range(q.shape[0]):
        qp, kp = _row(query_positions, b), _row(key_positions, b)
        user = mask
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
            user = mask[b : b + 1]
        length, keys = q.shape[2], k.shape[2]
        keep = reference.keep_mask(
            length, user, is_causal, pattern, size, keys=keys, query_positions=qp, key_positions=kp
        )
        bias = reference.alibi_bias(q.shape[1], length, keys, qp, kp) if alibi else None
        out, w = reference.softmax_attention(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], keep, bias, scale=scale
        )
        outs.append(out)
        weights.append(w)
    return np.concatenate(outs), np.concatenate(weights)


def _row(positions, b: int):
    """Sequence b's positions when they are given per sequence ``(B, n)``."""
    batched = isinstance(positions, np.ndarray) and positions.ndim == 2
    return positions[b] if batched else positions


def _as_torch(positions):
    return torch.tensor(positions) if isinstance(positions, np.ndarray) else positions


def _check(run, q, k, v, mask, **reference_call) -> None:
    """``run(q, k, v, mask, is_causal, need_weights)`` on both paths equals the reference."""
    for is_causal in (False, True):
        want_out, want_w = _reference(q, k, v, mask, is_causal=is_causal, **reference_call)
        for need_weights in (True, False):
            tq, tk, tv = (torch.tensor(a) for a in (q, k, v))
            out, weights = run(tq, tk, tv, _rank4(mask), is_causal, need_weights)
            np.testing.assert_allclose(out.numpy(), want_out, atol=TOLERANCE, rtol=0)
            if need_weights:
                np.testing.assert_allclose(weights.numpy(), want_w, atol=TOLERANCE, rtol=0)
            else:
                assert weights is None


# ---- the dense core ---------------------------------------------------------------------

CORE_POSITIONS = {
    "starts 12, 0": lambda rng: (12, 0),
    "starts 5, 3": lambda rng: (5, 3),
    "query start only": lambda rng: (4, None),
    "(L,) and (S,)": lambda rng: (np.arange(L) * 2 + 3, np.arange(S)),
    "(B, L) and (B, S)": lambda rng: (rng.integers(0, 30, (B, L)), rng.integers(0, 30, (B, S))),
    "(L,) and a start": lambda rng: (np.arange(L) + 20, 6),
    "0-dim tensor start": lambda rng: (torch.tensor(12), 0),
}
"""``(query_positions, key_positions)`` of the core: starts, explicit positions (unsorted
and repeated ones in the ``(B, n)`` case), a mix."""


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("positions", list(CORE_POSITIONS))
def test_core_matches_reference(rng, positions, kv_heads, alibi):
    query_positions, key_positions = CORE_POSITIONS[positions](rng)
    slopes = torch.tensor(reference.alibi_slopes(H)) if alibi else None
    reference_positions = {
        "query_positions": (
            int(query_positions) if isinstance(query_positions, torch.Tensor) else query_positions
        ),
        "key_positions": key_positions,
    }

    def run(q, k, v, mask, is_causal, need_weights):
        return functional.dot_product_attention(
            q,
            k,
            v,
            mask,
            alibi_slopes=slopes,
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=_as_torch(query_positions),
            key_positions=_as_torch(key_positions),
        )

    for kind in MASKS:
        q, k, v = _qkv(rng, kv_heads=kv_heads)
        _check(run, q, k, v, _mask(kind, rng), alibi=alibi, **reference_positions)


def test_core_chunks_with_positions(monkeypatch, rng):
    """Tensor positions and masks go ``QUERY_CHUNK`` queries at a time: a ragged last chunk
    must not shift the rules."""
    monkeypatch.setattr(functional, "QUERY_CHUNK", 3)
    slopes = torch.tensor(reference.alibi_slopes(H))
    query_positions = rng.integers(0, 30, (B, L))

    def run(q, k, v, mask, is_causal, need_weights):
        return functional.dot_product_attention(
            q,
            k,
            v,
            mask,
            alibi_slopes=slopes,
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=torch.tensor(query_positions),
            key_positions=3,
        )

    q, k, v = _qkv(rng)
    _check(
        run,
        q,
        k,
        v,
        _mask("batched", rng),
        alibi=True,
        query_positions=query_positions,
        key_positions=3,
    )


def test_offset_queries_equal_the_rows_of_a_full_call(rng):
    """The last L queries at their offset against all S keys give the last L rows of the
    causal self-attention over S tokens (what a cache relies on), ALiBi included."""
    q, k, v = (torch.tensor(a) for a in _qkv(rng, length=S))
    slopes = torch.tensor(reference.alibi_slopes(H))
    for need_weights in (True, False):
        full, _ = functional.dot_product_attention(
            q, k, v, alibi_slopes=slopes, is_causal=True, need_weights=need_weights
        )
        tail, _ = functional.dot_product_attention(
            q[:, :, S - L :],
            k,
            v,
            alibi_slopes=slopes,
            is_causal=True,
            need_weights=need_weights,
            query_positions=S - L,
        )
        torch.testing.assert_close(tail, full[:, :, S - L :], atol=1e-12, rtol=0)


# ---- the mechanisms' attend -------------------------------------------------------------

DENSE = {
    "vanilla": lambda: at.VanillaSelfAttention(D),
    "multi_head": lambda: at.MultiHeadSelfAttention(H * D, H),
    "grouped": lambda: at.GroupedSelfAttention(H * D, H, 2),
    "alibi": lambda: at.ALiBiSelfAttention(H * D, H),
}


@pytest.mark.parametrize("starts", STARTS, ids=str)
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_attend_matches_reference(rng, name, starts):
    layer = DENSE[name]().double()
    query_start, key_start = starts
    heads, kv_heads = layer.num_heads, layer.num_kv_heads

    def run(q, k, v, mask, is_causal, need_weights):
        return layer.attend(
            q,
            k,
            v,
            mask,
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=query_start,
            key_positions=key_start,
        )

    for kind in MASKS:
        q = rng.standard_normal((B, heads, L, layer.d_head))
        k, v = (rng.standard_normal((B, kv_heads, S, layer.d_head)) for _ in "kv")
        mask = _mask(kind, rng)
        if mask is not None and mask.ndim == 4 and mask.shape[1] == H:
            mask = mask[:, :heads]
        _check(
            run,
            q,
            k,
            v,
            mask,
            alibi=name == "alibi",
            scale=layer.scale,
            query_positions=query_start,
            key_positions=key_start,
        )


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("starts", STARTS[:2], ids=str)
def test_rotary_attend_matches_reference(rng, starts, interleaved):
    """RoPE by the positions (the caller rotates q and k), then the dense attend."""
    layer = at.RotarySelfAttention(H * D, H, rope_base=500.0, rope_interleaved=interleaved)
    layer = layer.double()
    query_start, key_start = starts
    layout = "interleaved" if interleaved else "half"

    def run(q, k, v, mask, is_causal, need_weights):
        rope = {"base": 500.0, "interleaved": interleaved}
        q = at.apply_rope(q, positions=query_start, **rope)
        k = at.apply_rope(k, positions=key_start, **rope)
        return layer.attend(
            q,
            k,
            v,
            mask,
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=query_start,
            key_positions=key_start,
        )

    q, k, v = _qkv(rng)
    mask = _mask("square", rng)
    for need_weights in (True, False):
        for is_causal in (False, True):
            tq, tk, tv = (torch.tensor(a) for a in (q, k, v))
            out, _ = run(tq, tk, tv, _rank4(mask), is_causal, need_weights)
            rq = reference.rotate(q, 500.0, layout, query_start)
            rk = reference.rotate(k, 500.0, layout, key_start)
            keep = reference.keep_mask(
                L, mask, is_causal, keys=S, query_positions=query_start, key_positions=key_start
            )
            want, _ = reference.softmax_attention(rq, rk, v, keep, scale=layer.scale)
            np.testing.assert_allclose(out.numpy(), want, atol=TOLERANCE, rtol=0)


SPARSE = {
    "local 5": ("local", 5),
    "local 1": ("local", 1),
    "local 40": ("local", 40),
    "dilated 3": ("dilated", 3),
    "dilated 25": ("dilated", 25),
    "block 4": ("block", 4),
    "block 25": ("block", 25),
}
SPARSE_CLASSES = {
    "local": at.LocalSelfAttention,
    "dilated": at.DilatedSelfAttention,
    "block": at.BlockSelfAttention,
}
SPARSE_SHAPES = [(L, S, 12, 0), (L, S, 5, 3), (L, S, 0, 12), (S, L, 3, 9), (9, 9, 4, 4)]
"""``(L, S, query_start, key_start)``; the last has the keys equal the queries (aligned
tiles) at a start that is not a block boundary."""


def _sparse_run(layer, query_start, key_start):
    def run(q, k, v, mask, is_causal, need_weights):
        return layer.attend(
            q,
            k,
            v,
            mask,
            is_causal=is_causal,
            need_weights=need_weights,
            query_positions=query_start,
            key_positions=key_start,
        )

    return run


@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=str)
@pytest.mark.parametrize("mechanism", list(SPARSE))
def test_sparse_attend_matches_reference(rng, mechanism, shape):
    pattern, size = SPARSE[mechanism]
    layer = SPARSE_CLASSES[pattern](H * D, size, H).double()
    length, keys, query_start, key_start = shape
    for kind in MASKS:
        q, k, v = _qkv(rng, length, keys)
        _check(
            _sparse_run(layer, query_start, key_start),
            q,
            k,
            v,
            _mask(kind, rng, length, keys),
            pattern=pattern,
            size=size,
            scale=layer.scale,
            query_positions=query_start,
            key_positions=key_start,
        )


@pytest.mark.parametrize("pattern", list(SPARSE_CLASSES))
def test_sparse_steps_with_interior_tiles(monkeypatch, rng, pattern):
    """Many small tiles with a caller's mask: the edge tiles, the interior ones (sharing one
    mask) and several masked steps, at offsets."""
    monkeypatch.setattr(local, "MIN_CHUNK", 2)
    monkeypatch.setattr(sparse, "MASKED_PAIRS_PER_STEP", 64)
    size = {"local": 5, "dilated": 3, "block": 4}[pattern]
    layer = SPARSE_CLASSES[pattern](H * D, size, H).double()
    for length, keys, query_start, key_start in [(37, 75, 38, 0), (37, 75, 1, 23)]:
        q, k, v = _qkv(rng, length, keys)
        _check(
            _sparse_run(layer, query_start, key_start),
            q,
            k,
            v,
            _mask("batched", rng, length, keys),
            pattern=pattern,
            size=size,
            scale=layer.scale,
            query_positions=query_start,
            key_positions=key_start,
        )


@pytest.mark.parametrize("pattern", list(SPARSE_CLASSES))
def test_sparse_offset_queries_equal_the_rows_of_a_full_call(rng, pattern):
    """The last L queries at their offset give the last rows of the full causal call."""
    size = {"local": 5, "dilated": 3, "block": 4}[pattern]
    layer = SPARSE_CLASSES[pattern](H * D, size, H).double()
    q, k, v = (torch.tensor(a) for a in _qkv(rng, length=S))
    for need_weights in (True, False):
        full, _ = layer.attend(q, k, v, None, is_causal=True, need_weights=need_weights)
        tail, _ = layer.attend(
            q[:, :, S - L :],
            k,
            v,
            None,
            is_causal=True,
            need_weights=need_weights,
            query_positions=S - L,
        )
        torch.testing.assert_close(tail, full[:, :, S - L :], atol=1e-12, rtol=0)


# ---- RoPE -------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_apply_rope_at_positions(rng, interleaved):
    """A start, positions ``(L,)`` and ``(B, L)`` (far apart, unsorted) against explicit
    rotations."""
    layout = "interleaved" if interleaved else "half"
    x = rng.standard_normal((B, H, L, 8))
    explicit = rng.integers(0, 5000, (B, L))
    for given, per_sequence in (
        (12, [12] * B),
        (torch.tensor(explicit[0]), [explicit[0]] * B),
        (torch.tensor(explicit), list(explicit)),
    ):
        got = at.apply_rope(torch.tensor(x), positions=given, base=500.0, interleaved=interleaved)
        want = [reference.rotate(x[b], 500.0, layout, per_sequence[b]) for b in range(B)]
        np.testing.assert_allclose(got.numpy(), np.stack(want), atol=1e-12, rtol=0)


def test_apply_rope_offset_is_a_slice_of_the_longer_sequence(rng):
    """A start offset gives bit for bit the rows of the sequence that starts at 0."""
    x = torch.tensor(rng.standard_normal((B, H, 3000, 8)), dtype=torch.float32)
    full = at.apply_rope(x)
    for start in (0, 1, 2991):
        part = at.apply_rope(x[:, :, start : start + 9], positions=start)
        assert torch.equal(part, full[:, :, start : start + 9])
        tensor_start = at.apply_rope(x[:, :, start : start + 9], positions=torch.tensor(start))
        assert torch.equal(tensor_start, part)


# ---- bad positions ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["local", "dilated", "block"])
def test_tiled_mechanisms_take_int_starts_only(rng, name):
    layer = SPARSE_CLASSES[name](H * D, 3, H)
    q, k, v = (torch.tensor(a, dtype=torch.float32) for a in _qkv(rng))
    for bad in (torch.arange(L), 2.0, True):
        for keyword in ("query_positions", "key_positions"):
            with pytest.raises(ValueError, match=f"{keyword} of a tiled mechanism"):
                layer.attend(q, k, v, None, is_causal=False, need_weights=False, **{keyword: bad})


@pytest.mark.parametrize(
    "bad",
    [
        torch.arange(L, dtype=torch.float32),
        torch.arange(L + 1),
        torch.zeros(3, L, dtype=torch.long),
        torch.ones(L, dtype=torch.bool),
        1.5,
    ],
    ids=["float", "wrong length", "wrong batch", "bool", "python float"],
)
def test_core_rejects_bad_positions(rng, bad):
    q, k, v = (torch.tensor(a) for a in _qkv(rng))
    for need_weights in (True, False):
        with pytest.raises(ValueError, match="query_positions must be None, a start offset"):
            functional.dot_product_attention(
                q, k, v, is_causal=True, need_weights=need_weights, query_positions=bad
            )
    with pytest.raises(ValueError, match="positions must be None, a start offset"):
        at.apply_rope(q, positions=bad)

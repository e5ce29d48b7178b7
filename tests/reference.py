"""Float64 NumPy references, written from docs/semantics.md without sharing library code.

Nothing here imports the packages or ``parity``: the patterns, the masks' meaning, the
ALiBi slopes, RoPE and both attention formulas are written out again, so a bug
planted identically in both packages still disagrees with them.
"""

from __future__ import annotations

import numpy as np

LINEAR_EPS = 1e-6
"""docs/semantics.md: the ``eps`` of linear attention's normalizer."""


def _positions(length: int, positions: np.ndarray | int | None) -> np.ndarray:
    """Positions of ``length`` tokens: ``0..length-1``, a start offset, or given ``(n,)``."""
    if positions is None:
        return np.arange(length)
    if np.ndim(positions) == 0:
        return int(positions) + np.arange(length)
    return np.asarray(positions)


def pattern_keep(
    pattern: str,
    size: int,
    length: int,
    keys: int | None = None,
    query_positions: np.ndarray | int | None = None,
    key_positions: np.ndarray | int | None = None,
) -> np.ndarray:
    """``(L, S)`` keep pattern of docs/semantics.md for a registry pattern name and its size,
    stated on the absolute positions of the queries ``p`` and the keys ``s`` (SPEC §9):
    ``0..L-1`` and ``0..S-1`` unless given (a start offset or the positions)."""
    keys = length if keys is None else keys
    i = _positions(length, query_positions)[:, None]
    j = _positions(keys, key_positions)[None, :]
    if pattern in ("dense", "alibi", "rope", "linear"):
        return np.ones((i.shape[0], j.shape[1]), bool)
    if pattern == "local":
        return np.abs(i - j) <= size // 2
    if pattern == "dilated":
        return (i - j) % size == 0
    if pattern == "block":
        return i // size == j // size
    raise ValueError(f"no reference pattern for {pattern!r}: write one in tests/reference.py")


def keep_mask(
    length: int,
    mask: np.ndarray | None = None,
    is_causal: bool = False,
    pattern: str = "dense",
    size: int = 0,
    keys: int | None = None,
    query_positions: np.ndarray | int | None = None,
    key_positions: np.ndarray | int | None = None,
) -> np.ndarray:
    """What each query may see, ``(B|1, H|1, L, S)``: pattern AND causal AND mask.

    ``mask`` is a user keep-mask of rank 2 ``(L, S)``, 3 ``(B, L, S)`` or 4; any non-zero
    number keeps. Causal is ``s_j <= p_i`` on the positions (see ``pattern_keep``).
    """
    keys = length if keys is None else keys
    p = _positions(length, query_positions)[:, None]
    s = _positions(keys, key_positions)[None, :]
    keep = pattern_keep(pattern, size, length, keys, query_positions, key_positions)[None, None]
    if is_causal:
        keep = keep & (s <= p)
    if mask is not None:
        mask = np.asarray(mask) != 0
        keep = keep & {2: mask[None, None], 3: mask[:, None], 4: mask}[mask.ndim]
    return keep


def alibi_slopes(heads: int) -> np.ndarray:
    """docs/semantics.md: ``2 ** (-8 h / H)`` for H a power of two; otherwise the P slopes of the
    largest power of two P below H, then ``2 ** (-4 k / P)`` for k = 1, 3, 5, ..."""
    power = 1
    while power * 2 <= heads:
        power *= 2
    slopes = [2.0 ** (-8.0 * h / power) for h in range(1, power + 1)]
    odd = 1
    while len(slopes) < heads:
        slopes.append(2.0 ** (-4.0 * odd / power))
        odd += 2
    return np.array(slopes)


def alibi_bias(
    heads: int,
    length: int,
    keys: int | None = None,
    query_positions: np.ndarray | int | None = None,
    key_positions: np.ndarray | int | None = None,
) -> np.ndarray:
    """``(1, H, L, S)`` ALiBi bias ``-m_h * abs(p_i - s_j)`` with the slopes above."""
    keys = length if keys is None else keys
    p = _positions(length, query_positions)[:, None]
    s = _positions(keys, key_positions)[None, :]
    distance = np.abs(p - s)
    return -alibi_slopes(heads)[None, :, None, None] * distance


def softmax_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    keep: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """q ``(B, H, L, D)``, k/v ``(B, K, S, D)``; keep/bias broadcastable to ``(B, H, L, S)``.

    Returns ``(out (B, H, L, D), weights (B, H, L, S))`` with zero rows where nothing is
    visible.
    """
    q, k, v = _grouped(q, k, v)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("bhld,bhsd->bhls", q, k) * scale
    if bias is not None:
        scores = scores + bias
    if keep is None:
        keep = np.ones(scores.shape, bool)
    keep = np.broadcast_to(np.asarray(keep, bool), scores.shape)
    scores = np.where(keep, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    exp = np.where(keep, np.exp(scores - row_max), 0.0)
    total = exp.sum(-1, keepdims=True)
    weights = np.divide(exp, total, out=np.zeros_like(exp), where=total > 0)
    return np.einsum("bhls,bhsd->bhld", weights, v), weights


def linear_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    keep: np.ndarray | None = None,
    feature_map: str = "elu",
) -> tuple[np.ndarray, np.ndarray]:
    """docs/semantics.md, quadratic form: ``A[i, j] = M[i, j] phi(q_i)·phi(k_j) /
    (sum_j' M[i, j'] phi(q_i)·phi(k_j') + eps)``, out ``A @ V``; shapes as above."""
    q, k, v = _grouped(q, k, v)
    if feature_map == "elu":
        phi = lambda t: np.where(t > 0, t + 1.0, np.exp(np.minimum(t, 0.0)))  # noqa: E731
    elif feature_map == "relu":
        phi = lambda t: np.maximum(t, 0.0)  # noqa: E731
    else:
        raise ValueError(f"no reference feature map {feature_map!r}")
    kernel = np.einsum("bhlf,bhsf->bhls", phi(q), phi(k))
    if keep is not None:
        kernel = kernel * np.broadcast_to(np.asarray(keep, bool), kernel.shape)
    weights = kernel / (kernel.sum(-1, keepdims=True) + LINEAR_EPS)
    return np.einsum("bhls,bhsd->bhld", weights, v), weights


def _grouped(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 q, k, v with each kv head repeated for its contiguous group of query heads
    (query head h reads kv head ``h // (H // K)``)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    return q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)


def self_attention(
    x: np.ndarray,
    state: dict[str, np.ndarray],
    num_heads: int,
    num_kv_heads: int,
    keep: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    temperature: float = 1.0,
    rope: str | None = None,
    rope_base: float = 10000.0,
    feature_map: str | None = None,
    context: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole layer from a PyTorch-layout state_dict (NumPy arrays), in float64.

    Softmax attention with scores ``q·k / (sqrt(d_head) * temperature) + bias``; with a
    ``feature_map`` (``"elu"`` or ``"relu"``) linear attention instead (no scaling, no
    bias). ``rope``: ``None``, ``"interleaved"`` or ``"half"``. With ``context``
    ``(B, S, C)`` the keys and values are projected from it (cross-attention).
    """
    x = np.asarray(x, np.float64)
    source = x if context is None else np.asarray(context, np.float64)

    def linear(name: str, inp: np.ndarray) -> np.ndarray:
        out = inp @ np.asarray(state[f"{name}.weight"], np.float64).T
        bias_ = state.get(f"{name}.bias")
        return out if bias_ is None else out + bias_

    def heads(t: np.ndarray, n: int) -> np.ndarray:
        b, length, width = t.shape
        return t.reshape(b, length, n, width // n).transpose(0, 2, 1, 3)

    q = heads(linear("w_q", x), num_heads)
    k = heads(linear("w_k", source), num_kv_heads)
    v = heads(linear("w_v", source), num_kv_heads)
    if rope is not None:
        q, k = rotate(q, rope_base, rope), rotate(k, rope_base, rope)
    if feature_map is not None:
        out, weights = linear_attention(q, k, v, keep, feature_map)
    else:
        scale = 1.0 / (np.sqrt(q.shape[-1]) * temperature)
        out, weights = softmax_attention(q, k, v, keep, bias, scale=scale)
    b, h, length, d = out.shape
    merged = out.transpose(0, 2, 1, 3).reshape(b, length, h * d)
    return linear("w_o", merged), weights


def rotate(
    x: np.ndarray, base: float, layout: str, positions: np.ndarray | int | None = None
) -> np.ndarray:
    """RoPE by explicit 2x2 rotations of the pairs the layout names, each row ``(..., L, D)``
    by the angle of its position (``0..L-1``, a start offset, or given)."""
    length, d_head = x.shape[-2], x.shape[-1]
    pos = _positions(length, positions)
    out = np.array(x, np.float64)
    for i in range(d_head // 2):
        a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + d_head // 2)
        theta = pos * base ** (-2.0 * i / d_head)
        cos, sin = np.cos(theta), np.sin(theta)
        out[..., a] = x[..., a] * cos - x[..., b] * sin
        out[..., b] = x[..., a] * sin + x[..., b] * cos
    return out

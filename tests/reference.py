"""Float64 NumPy references, written from the SPEC formulas without sharing library code."""

from __future__ import annotations

import numpy as np


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
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    heads, kv_heads = q.shape[1], k.shape[1]
    k = np.repeat(k, heads // kv_heads, axis=1)
    v = np.repeat(v, heads // kv_heads, axis=1)
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
) -> tuple[np.ndarray, np.ndarray]:
    """The whole layer from a PyTorch-layout state_dict (NumPy arrays), in float64.

    ``rope``: ``None``, ``"interleaved"`` or ``"half"``.
    """
    x = np.asarray(x, np.float64)

    def linear(name: str, inp: np.ndarray) -> np.ndarray:
        out = inp @ np.asarray(state[f"{name}.weight"], np.float64).T
        bias_ = state.get(f"{name}.bias")
        return out if bias_ is None else out + bias_

    def heads(t: np.ndarray, n: int) -> np.ndarray:
        b, length, width = t.shape
        return t.reshape(b, length, n, width // n).transpose(0, 2, 1, 3)

    q = heads(linear("w_q", x), num_heads)
    k = heads(linear("w_k", x), num_kv_heads)
    v = heads(linear("w_v", x), num_kv_heads)
    if rope is not None:
        q, k = rotate(q, rope_base, rope), rotate(k, rope_base, rope)
    d_head = q.shape[-1]
    out, weights = softmax_attention(
        q, k, v, keep, bias, scale=1.0 / (np.sqrt(d_head) * temperature)
    )
    b, h, length, d = out.shape
    merged = out.transpose(0, 2, 1, 3).reshape(b, length, h * d)
    return linear("w_o", merged), weights


def rotate(x: np.ndarray, base: float, layout: str) -> np.ndarray:
    """RoPE by explicit 2x2 rotations of the pairs the layout names."""
    length, d_head = x.shape[-2], x.shape[-1]
    out = np.array(x, np.float64)
    for i in range(d_head // 2):
        a, b = (2 * i, 2 * i + 1) if layout == "interleaved" else (i, i + d_head // 2)
        theta = np.arange(length) * base ** (-2.0 * i / d_head)
        cos, sin = np.cos(theta), np.sin(theta)
        out[..., a] = x[..., a] * cos - x[..., b] * sin
        out[..., b] = x[..., a] * sin + x[..., b] * cos
    return out

"""The pieces of a gpt-oss layer as pure NumPy functions, float32 in and out."""

from __future__ import annotations

import numpy as np

from mlx_oss.mxfp4 import SCALE_VALUES, decode_unscaled, dequantize

QUERY_CHUNK = 64  # queries scored at once: bounds the score matrix, and the keys a chunk scores past its diagonal
SCORE_BYTES = 256 << 20  # at most this much of one score matrix: fewer queries at once over long caches
DECODE_SCRATCH_BYTES = 1 << 20  # float32 bytes of one decoded slice of an expert weight (`mxfp4_linear`)
LATE_SCALE_ROWS = 4  # up to this many rows of x, `mxfp4_linear` scales each block's dot product, not its values


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # np.mean's own sum and division, without its Python wrapper (called twice a layer for every token decoded)
    mean_square = np.add.reduce(np.square(x), axis=-1, keepdims=True) / np.float32(x.shape[-1])
    scale = 1.0 / np.sqrt(mean_square + np.float32(eps))
    return x * scale * weight


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    sinks: np.ndarray,
    q_start: int,
    window: int | None,
    k_start: int = 0,
    softmax=None,
) -> np.ndarray:
    """Causal grouped-query attention with one learned sink logit per head.

    q `[T, H, D]` holds queries at positions `q_start .. q_start+T-1`; keys `k` and values `v`, both
    `[KV, D, S]` (positions last, as the cache stores them), are those of positions `k_start .. k_start+S-1`.
    Query head h reads kv head h // (H // KV). Key j is visible to query i iff j <= i and, on sliding layers,
    i - j < window. The sink joins the softmax's denominator as `exp(sink)` and contributes no value. Returns
    `[T, H * D]`.

    Each kv head's products are two matrix products (BLAS) over a chunk of queries and the keys the chunk sees,
    its query heads stacked as rows; `softmax` (default `softmax_in_spans`; the compiled kernels pass theirs)
    turns the scores into weights in place.
    """
    T, H, D = q.shape
    KV, _, S = v.shape
    group = H // KV
    softmax = softmax or softmax_in_spans
    scale = np.float32(1.0 / np.sqrt(D))
    out = np.empty((KV, group, T, D), dtype=np.float32)
    queries = (q * scale).reshape(T, KV, group, D).transpose(1, 2, 0, 3)  # [KV, group, T, D]
    sink = np.ascontiguousarray(sinks, dtype=np.float32).reshape(KV, group)
    chunk = max(1, min(QUERY_CHUNK, SCORE_BYTES // (H * S * 4)))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        k_lo, k_hi = max(k_start, first_visible_key(q_start + t0, window)), q_start + t1  # later: never visible
        first, last = visible_spans(q_start + t0, t1 - t0, k_lo, window)
        held = slice(k_lo - k_start, k_hi - k_start)
        for h in range(KV):
            rows = np.ascontiguousarray(queries[h, :, t0:t1]).reshape(group * (t1 - t0), D)
            scores = (rows @ k[h, :, held]).reshape(group, t1 - t0, k_hi - k_lo)
            denominators = softmax(scores, sink[h], first, last)
            mixed = scores.reshape(group * (t1 - t0), -1) @ v[h, :, held].T
            out[h, :, t0:t1] = mixed.reshape(group, t1 - t0, D) / denominators[..., None]
    return out.transpose(2, 0, 1, 3).reshape(T, H * D)


def first_visible_key(q_start: int, window: int | None) -> int:
    """The first key a query at position `q_start` (or any later one) can see."""
    return 0 if window is None else max(0, q_start - window + 1)


def visible_spans(q_start: int, queries: int, k_start: int, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The keys each of the queries at positions `q_start ..` sees, as `[first, last)` counted from the key at
    position `k_start` (int64 `[queries]` both): those up to its own position and, on sliding layers, less than
    `window` before it."""
    positions = np.arange(q_start, q_start + queries)
    first = np.zeros(queries, dtype=np.int64) if window is None else np.maximum(positions - window + 1 - k_start, 0)
    return first, positions + 1 - k_start


def softmax_in_spans(scores: np.ndarray, sink: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """`softmax_with_sink` of `scores [G, T, S]` in place, row (g, t) over its keys `first[t]:last[t]` only (the
    rest weigh 0), with sink `sink[g]`: returns the denominators `[G, T]`."""
    k_pos = np.arange(scores.shape[-1])
    hidden = (k_pos < first[:, None]) | (k_pos >= last[:, None])
    if hidden.any():
        np.copyto(scores, np.float32(-np.inf), where=hidden)
    _, denominators = softmax_with_sink(scores, sink[:, None])
    return denominators


def softmax_with_sink(scores: np.ndarray, sink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A softmax over the last axis whose denominator also holds `exp(sink)` (`sink` broadcast to
    `scores.shape[:-1]`): the unnormalised weights, computed in place of `scores`, and the denominator."""
    peak = np.maximum(scores.max(axis=-1), sink)
    weights = np.subtract(scores, peak[..., None], out=scores)
    np.exp(weights, out=weights)
    return weights, weights.sum(axis=-1) + np.exp(sink - peak)


def route(router_logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's `top_k` experts and their weights (`[T, top_k]` both): a softmax over the chosen logits only."""
    chosen = np.argpartition(-router_logits, top_k - 1, axis=-1)[..., :top_k]
    logits = np.take_along_axis(router_logits, chosen, axis=-1)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return chosen, weights.astype(np.float32)


def clamped_swiglu(gate: np.ndarray, up: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    """gpt-oss's SwiGLU: the gate clamped from above only, the linear half on both sides and shifted by +1 (so that
    a zero projection passes the gate through). Neither input is written to."""
    gate = np.minimum(gate, np.float32(limit))
    up = np.minimum(np.maximum(up, np.float32(-limit)), np.float32(limit))  # np.clip, minus its wrapper
    out = np.exp(np.float32(-alpha) * gate)
    out += 1.0
    np.divide(gate, out, out=out)
    up += 1.0
    out *= up
    return out


def mxfp4_linear(x, blocks, scales, bias) -> np.ndarray:
    """`x @ W.T + bias` for one expert's MXFP4 weight `W [out, in]`, decoding `DECODE_SCRATCH_BYTES` of it at a time.

    Only a slice of the weight is ever float32, so an expert costs a few MB of scratch, not its full
    decoded size. For a few rows of x (decoding) the blocks' scales are applied to each block's dot
    product instead of to each of its 32 values.
    """
    out_features, groups = scales.shape
    tokens = x.shape[0]
    rows = max(1, DECODE_SCRATCH_BYTES // (4 * groups * 32))
    y = np.empty((tokens, out_features), dtype=np.float32)
    scratch = np.empty((min(rows, out_features), groups * 32), dtype=np.float32)
    x_blocks = x.reshape(tokens, groups, 32)
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        w = scratch[: r1 - r0]
        if tokens <= LATE_SCALE_ROWS:
            decode_unscaled(blocks[r0:r1], w)
            dots = np.einsum("rgj,tgj->trg", w.reshape(r1 - r0, groups, 32), x_blocks)
            y[:, r0:r1] = np.einsum("trg,rg->tr", dots, SCALE_VALUES[scales[r0:r1]])
        else:
            dequantize(blocks[r0:r1], scales[r0:r1], w)
            np.matmul(x, w.T, out=y[:, r0:r1])
    y += bias
    return y

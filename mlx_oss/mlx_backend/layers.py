"""The pieces of a gpt-oss layer in MLX: lazy arrays in, lazy arrays out, float32 activations."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

SORT_THRESHOLD = 64  # token-expert pairs from which tokens are sorted by expert (prefill)


@dataclass
class Linear:
    """`x @ W.T + b` with W in float (as loaded) or MLX affine 8-bit (`scales` and `biases` set).

    8-bit scales and biases must be float32: `mx.dequantize` computes in their dtype, and BF16 would round.
    """

    weight: mx.array
    bias: mx.array | None = None
    scales: mx.array | None = None
    biases: mx.array | None = None
    group_size: int = 64
    bits: int = 8

    def __call__(self, x: mx.array) -> mx.array:
        if self.scales is None:
            y = x @ self.weight.T
        else:
            y = mx.quantized_matmul(
                x, self.weight, self.scales, self.biases, transpose=True, group_size=self.group_size, bits=self.bits
            )
        return y if self.bias is None else y + self.bias

    def rows(self, ids: mx.array) -> mx.array:
        """Rows `ids` of W as float32 (an embedding lookup)."""
        if self.scales is None:
            return self.weight[ids].astype(mx.float32)
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids],
            self.biases[ids],
            group_size=self.group_size,
            bits=self.bits,
            dtype=mx.float32,
        )


@dataclass
class ExpertLinear:
    """All experts' `x @ W_e.T + b_e` for one projection, W in MXFP4 (uint32 words, E8M0 scales)."""

    weight: mx.array  # [E, out, in / 8] uint32
    scales: mx.array  # [E, out, in / 32] uint8
    bias: mx.array  # [E, out] float32

    def __call__(self, x: mx.array, experts: mx.array, sorted_experts: bool) -> mx.array:
        y = mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            None,
            rhs_indices=experts,
            transpose=True,
            group_size=32,
            bits=4,
            mode="mxfp4",
            sorted_indices=sorted_experts,
        )
        return y + mx.expand_dims(self.bias[experts], -2)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def attention(q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """Grouped-query attention with one learned sink logit per head: q `[1, H, T, D]`, k, v `[1, KV, S, D]`.

    The sink joins the softmax's denominator and contributes no value; MLX's fused kernel takes it as is.
    `mask` (`[T, S]` booleans, True where visible) may be None when every key is visible to every query.
    """
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


def visibility(q_start: int, queries: int, k_start: int, keys: int, window: int | None) -> mx.array | None:
    """Which keys each query sees (`[queries, keys]`, True where visible), for queries at positions `q_start ..`
    and keys at `k_start ..`: key j at most query i and, on sliding layers, i - j < window. None for a decode
    step, which is given only the keys it sees."""
    if queries == 1 and (window is None or q_start - k_start < window):
        return None
    q_pos = mx.arange(q_start, q_start + queries)[:, None]
    k_pos = mx.arange(k_start, k_start + keys)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (q_pos - k_pos < window)
    return visible


def route(router_logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Each token's `top_k` experts and their weights (`[T, top_k]` both): a softmax over the chosen logits only."""
    chosen = mx.argpartition(-router_logits, top_k - 1, axis=-1)[..., :top_k]
    weights = mx.softmax(mx.take_along_axis(router_logits, chosen, axis=-1), axis=-1, precise=True)
    return chosen, weights


def clamped_swiglu(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    """gpt-oss's SwiGLU: the gate clamped from above only, the linear half on both sides and shifted by +1 (so that
    a zero projection passes the gate through)."""
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return gate * mx.sigmoid(alpha * gate) * (up + 1)


@dataclass
class Experts:
    """One layer's experts, MXFP4 as MLX's `gather_qmm` takes them, gate and up as separate projections."""

    gate_proj: ExpertLinear
    up_proj: ExpertLinear
    down_proj: ExpertLinear
    alpha: float  # the clamped SwiGLU's
    limit: float

    def __call__(self, x: mx.array, chosen: mx.array) -> mx.array:
        """Each token `x [T, hidden]` through its chosen experts `chosen [T, k]`: `[T, k, hidden]`.

        With many token-expert pairs (prefill) the pairs are sorted by expert first, so each expert's weights
        are read once for all its tokens.
        """
        T, k = chosen.shape
        x = mx.expand_dims(x, (-2, -3))  # [T, 1, 1, hidden]
        pairs = chosen
        order = None
        if chosen.size >= SORT_THRESHOLD:
            flat = chosen.flatten()
            order = mx.argsort(flat)
            x = x.flatten(0, -3)[order // k]  # [T*k, 1, hidden]
            pairs = flat[order]
        sorted_pairs = order is not None
        gate, up = self.gate_proj(x, pairs, sorted_pairs), self.up_proj(x, pairs, sorted_pairs)
        y = self.down_proj(clamped_swiglu(gate, up, self.alpha, self.limit), pairs, sorted_pairs)
        if order is not None:
            y = mx.unflatten(y[mx.argsort(order)], 0, (T, k))
        return y.squeeze(-2)

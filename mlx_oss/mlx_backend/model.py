"""gpt-oss in MLX: the model of `gpt_oss/torch/model.py` with the experts kept in MXFP4.

Weights come from any of our layouts through `layouts.mlx_specs`, so a Hugging Face snapshot and a converted
MLX directory load into the same arrays (the snapshot repacked on the way). Experts stay MXFP4 and run through
`mx.gather_qmm`; attention through `mx.fast.scaled_dot_product_attention` with its `sinks`. Activations are
float32, as in the reference; weight matrices stay as stored (BF16, or 8-bit with the lossy option), so the
model takes no more memory than its files, and MLX widens a BF16 operand exactly where it meets a float32 one.
Norms, sinks and biases are widened at load. The layers of a forward pass are built lazily and evaluated once;
the unembedding follows block by block (see `_unembed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_oss.backend import Model, checked_tokens
from mlx_oss.checkpoint import Checkpoint
from mlx_oss.config import ModelConfig
from mlx_oss.layouts import Q8, mlx_specs
from mlx_oss.rope import yarn_frequencies
from mlx_oss.safetensors_io import TensorSpec

from .kv_cache import KVCache
from .layers import ExpertLinear, Experts, Linear, attention, rms_norm, route, visibility
from .quantized_kv_cache import QuantizedKVCache

VOCAB_CHUNK = 16384  # unembedding rows widened to float32 at once


@dataclass
class Layer:
    input_norm: mx.array
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    sinks: mx.array
    post_attention_norm: mx.array
    router: Linear
    experts: Experts


def _to_mlx(spec: TensorSpec, widen: bool) -> mx.array:
    """One tensor as an MLX array: BF16 kept as bfloat16 (or widened to float32), the rest as stored."""
    parts = list(spec.chunks())  # a tensor kept as stored is one chunk: the mapped file itself, copied once here
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    array = mx.array(np.ascontiguousarray(data).reshape(spec.shape))
    if spec.dtype == "BF16":
        array = array.view(mx.bfloat16)
    if widen and spec.dtype in ("BF16", "F16"):
        array = array.astype(mx.float32)
    mx.eval(array)
    return array


class MlxModel(Model):
    backend = "mlx"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        c = self.config
        specs = {spec.name: spec for spec in mlx_specs(checkpoint)}

        def tensor(name: str, widen: bool = True) -> mx.array:
            return _to_mlx(specs[name], widen)

        def linear(name: str, bias: bool = True) -> Linear:
            base = name.removesuffix(".weight")
            b = tensor(base + ".bias") if bias else None
            if base + ".scales" in specs:
                return Linear(
                    tensor(name),
                    b,
                    tensor(base + ".scales"),
                    tensor(base + ".biases"),
                    group_size=Q8["group_size"],
                    bits=Q8["bits"],
                )
            return Linear(tensor(name, widen=False), b)

        def expert(prefix: str) -> ExpertLinear:
            return ExpertLinear(tensor(prefix + ".weight"), tensor(prefix + ".scales"), tensor(prefix + ".bias"))

        def experts(prefix: str) -> Experts:
            projections = [expert(prefix + name) for name in ("gate_proj", "up_proj", "down_proj")]
            return Experts(*projections, alpha=c.swiglu_alpha, limit=c.swiglu_limit)

        self.embed = linear("model.embed_tokens.weight", bias=False)
        self.unembed = self.embed if c.tie_word_embeddings else linear("lm_head.weight", bias=False)
        self.final_norm = tensor("model.norm.weight")
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                Layer(
                    input_norm=tensor(p + "input_layernorm.weight"),
                    q_proj=linear(p + "self_attn.q_proj.weight"),
                    k_proj=linear(p + "self_attn.k_proj.weight"),
                    v_proj=linear(p + "self_attn.v_proj.weight"),
                    o_proj=linear(p + "self_attn.o_proj.weight"),
                    sinks=tensor(p + "self_attn.sinks"),
                    post_attention_norm=tensor(p + "post_attention_layernorm.weight"),
                    router=linear(p + "mlp.router.weight"),
                    experts=experts(p + "mlp.experts."),
                )
            )
            checkpoint.release()  # the layer now lives in MLX's memory; its mapped pages need not stay resident
        inv_freq, concentration = yarn_frequencies(c.rope, c.head_dim)
        self.rope_freqs = mx.array(1.0 / inv_freq)
        # YaRN scales cos and sin by the concentration for q and k alike: every score by its square.
        self.score_scale = concentration**2 / c.head_dim**0.5

    kv_bits: int | None = None  # set to 8 for an int8 KV cache (`--kv-bits 8`)

    def new_cache(self, kv_bits: int | None = None) -> KVCache | QuantizedKVCache:
        """An empty cache: the model's float type (at `kv_bits` 16 too: BF16 for a BF16 checkpoint), or int8 with
        per-position scales at 8 (default: `self.kv_bits`)."""
        c = self.config
        windows = [c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)]
        bits = kv_bits if kv_bits is not None else self.kv_bits
        return QuantizedKVCache(windows, bits) if bits and bits != 16 else KVCache(windows)

    def restore_cache(self, state) -> KVCache:
        c = self.config
        windows = [c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)]
        return KVCache.from_state(state, windows, c.num_key_value_heads, c.head_dim)

    def forward(self, token_ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Run `token_ids` after whatever `cache` holds, extending it; return their logits (float32 NumPy).

        With `last_only` only the last position's logits are computed (`[1, vocab_size]`).
        """
        c = self.config
        tokens = checked_tokens(token_ids, c.vocab_size)
        cache = cache if cache is not None else self.new_cache()
        start = cache.length
        x = self.embed.rows(mx.array(tokens.astype(np.int32)))
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = x + self._attention(layer, rms_norm(x, layer.input_norm, c.rms_norm_eps), start, layer_cache)
            x = x + self._moe(layer, rms_norm(x, layer.post_attention_norm, c.rms_norm_eps))
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.final_norm, c.rms_norm_eps)
        mx.eval(x, *cache.arrays())
        cache.advance(tokens.size)
        return self._unembed(x)

    def _attention(self, layer: Layer, h: mx.array, start: int, cache) -> mx.array:
        c = self.config
        T = h.shape[0]

        def heads(x: mx.array, count: int) -> mx.array:
            x = x.reshape(1, T, count, c.head_dim).transpose(0, 2, 1, 3)
            return mx.fast.rope(
                x, c.head_dim, traditional=False, base=None, scale=1.0, offset=start, freqs=self.rope_freqs
            )

        q = heads(layer.q_proj(h), c.num_attention_heads)
        k = heads(layer.k_proj(h), c.num_key_value_heads)
        v = layer.v_proj(h).reshape(1, T, c.num_key_value_heads, c.head_dim).transpose(0, 2, 1, 3)
        k, v, first = cache.update(k, v, start)
        mask = visibility(start, T, first, k.shape[2], cache.window)
        mixed = attention(q, k, v, layer.sinks, self.score_scale, mask)
        return layer.o_proj(mixed.transpose(0, 2, 1, 3).reshape(T, c.q_size))

    def _moe(self, layer: Layer, h: mx.array) -> mx.array:
        """Each token through its top-k experts, their outputs weighted by the router."""
        chosen, weights = route(layer.router(h), self.config.num_experts_per_tok)
        y = layer.experts(h, chosen)  # [T, k, hidden]
        return (y * weights[..., None]).sum(axis=-2)

    def _unembed(self, x: mx.array) -> np.ndarray:
        """Logits as float32 NumPy. A BF16 unembedding is widened a block of rows at a time, each block evaluated
        on its own: in one lazy graph MLX would widen every block before multiplying any (2.2 GB for gpt-oss)."""
        if self.unembed.scales is not None:
            return np.asarray(self.unembed(x))
        w = self.unembed.weight
        logits = np.empty((x.shape[0], w.shape[0]), np.float32)
        for v0 in range(0, w.shape[0], VOCAB_CHUNK):
            logits[:, v0 : v0 + VOCAB_CHUNK] = x @ w[v0 : v0 + VOCAB_CHUNK].T
        return logits

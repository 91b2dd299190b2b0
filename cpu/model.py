"""gpt-oss in NumPy: the model of `gpt_oss/torch/model.py`, float32 over memory-mapped weights.

Memory: attention, router and norm weights are widened to float32 once (about 2.5 GB for 20b), or mapped as
they are from the converter's NumPy layout, which stores them fused and in float32;
the MXFP4 experts stay packed in the memory-mapped checkpoint and only the experts that tokens
choose are decoded, a few rows at a time; the embedding and unembedding stay in their stored
dtype and are widened row block by row block as they are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_oss.checkpoint import Checkpoint
from mlx_oss.config import ModelConfig
from mlx_oss.layouts import NUMPY
from mlx_oss.loading import Model, checked_tokens
from mlx_oss.rope import apply_rope, rope_tables
from mlx_oss.safetensors_io import as_float32

from .kv_cache import KVCache
from .layers import attention, clamped_swiglu, mxfp4_linear, rms_norm, route

DECODE_SCRATCH_BYTES = 1 << 20  # float32 bytes of one decoded slice of an expert weight
VOCAB_CHUNK = 16384  # unembedding rows widened at once


@dataclass
class AttentionWeights:
    qkv: np.ndarray  # [q_size + 2 * kv_size, hidden]: q, k and v projections stacked
    qkv_bias: np.ndarray
    out: np.ndarray  # [hidden, q_size]
    out_bias: np.ndarray
    sinks: np.ndarray  # [heads]


@dataclass
class ExpertWeights:
    """One layer's experts, MXFP4-packed and memory-mapped; biases in float32."""

    gate_up_blocks: np.ndarray  # [E, 2 * intermediate, hidden / 32, 16] uint8
    gate_up_scales: np.ndarray  # [E, 2 * intermediate, hidden / 32] uint8
    gate_up_bias: np.ndarray  # [E, 2 * intermediate]
    down_blocks: np.ndarray  # [E, hidden, intermediate / 32, 16] uint8
    down_scales: np.ndarray
    down_bias: np.ndarray  # [E, hidden]


@dataclass
class LayerWeights:
    input_norm: np.ndarray
    attention: AttentionWeights
    post_attention_norm: np.ndarray
    router: np.ndarray  # [E, hidden]
    router_bias: np.ndarray
    experts: ExpertWeights


class NumpyModel(Model):
    backend = "numpy"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        c = self.config
        self.embed = checkpoint.raw("model.embed_tokens.weight")
        self.embed_dtype = checkpoint.info("model.embed_tokens.weight").dtype
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        self.unembed = checkpoint.raw(head)
        self.unembed_dtype = checkpoint.info(head).dtype
        self.final_norm = checkpoint.float32("model.norm.weight")
        self.layers = [self._load_layer(i) for i in range(c.num_hidden_layers)]

    def _load_layer(self, i: int) -> LayerWeights:
        ck = self.checkpoint
        p = f"model.layers.{i}."
        f32 = ck.float32

        def attn(name: str) -> np.ndarray:
            return f32(p + f"self_attn.{name}")

        if ck.layout == NUMPY:  # fused and float32 on disk: mapped, not copied
            qkv, qkv_bias = attn("qkv_proj.weight"), attn("qkv_proj.bias")
        else:
            qkv = np.concatenate([attn("q_proj.weight"), attn("k_proj.weight"), attn("v_proj.weight")])
            qkv_bias = np.concatenate([attn("q_proj.bias"), attn("k_proj.bias"), attn("v_proj.bias")])
        return LayerWeights(
            input_norm=f32(p + "input_layernorm.weight"),
            attention=AttentionWeights(
                qkv=qkv,
                qkv_bias=qkv_bias,
                out=attn("o_proj.weight"),
                out_bias=attn("o_proj.bias"),
                sinks=attn("sinks"),
            ),
            post_attention_norm=f32(p + "post_attention_layernorm.weight"),
            router=f32(p + "mlp.router.weight"),
            router_bias=f32(p + "mlp.router.bias"),
            experts=ExpertWeights(
                gate_up_blocks=ck.raw(p + "mlp.experts.gate_up_proj_blocks"),
                gate_up_scales=ck.raw(p + "mlp.experts.gate_up_proj_scales"),
                gate_up_bias=f32(p + "mlp.experts.gate_up_proj_bias"),
                down_blocks=ck.raw(p + "mlp.experts.down_proj_blocks"),
                down_scales=ck.raw(p + "mlp.experts.down_proj_scales"),
                down_bias=f32(p + "mlp.experts.down_proj_bias"),
            ),
        )

    def new_cache(self) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)

    def forward(self, token_ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Run `token_ids` after whatever `cache` holds, extending it; return their logits.

        With `last_only` only the last position's logits are computed (`[1, vocab_size]`).
        """
        c = self.config
        tokens = checked_tokens(token_ids, c.vocab_size)
        start = cache.length if cache is not None else 0
        cos, sin = rope_tables(c.rope, c.head_dim, np.arange(start, start + tokens.size))
        x = as_float32(self.embed[tokens], self.embed_dtype)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, rms_norm(x, layer.input_norm, c.rms_norm_eps), cos, sin, start, cache)
            x = x + self._moe(layer, rms_norm(x, layer.post_attention_norm, c.rms_norm_eps))
        if cache is not None:
            cache.advance(tokens.size)
        if last_only:
            x = x[-1:]
        return self._unembed(rms_norm(x, self.final_norm, c.rms_norm_eps))

    def _attention(self, i, layer, h, cos, sin, start, cache) -> np.ndarray:
        c = self.config
        w = layer.attention
        T = h.shape[0]
        qkv = h @ w.qkv.T + w.qkv_bias
        q = apply_rope(qkv[:, : c.q_size].reshape(T, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(qkv[:, c.q_size : c.q_size + c.kv_size].reshape(T, c.num_key_value_heads, c.head_dim), cos, sin)
        v = qkv[:, c.q_size + c.kv_size :].reshape(T, c.num_key_value_heads, c.head_dim)
        if cache is not None:
            k, v = cache.append(i, k, v)
        window = c.sliding_window if c.is_sliding(i) else None
        mixed = attention(q, k, v, w.sinks, start, window)
        return mixed @ w.out.T + w.out_bias

    def _moe(self, layer: LayerWeights, h: np.ndarray) -> np.ndarray:
        """Each token's top-k experts, weighted; every chosen expert runs once on all its tokens."""
        c = self.config
        ex = layer.experts
        chosen, weights = route(h @ layer.router.T + layer.router_bias, c.num_experts_per_tok)
        out = np.zeros_like(h)
        up_rows = max(1, DECODE_SCRATCH_BYTES // (4 * c.hidden_size))
        down_rows = max(1, DECODE_SCRATCH_BYTES // (4 * c.intermediate_size))
        for e in np.unique(chosen):
            tokens, slot = np.nonzero(chosen == e)
            gate_up = mxfp4_linear(h[tokens], ex.gate_up_blocks[e], ex.gate_up_scales[e], ex.gate_up_bias[e], up_rows)
            act = clamped_swiglu(gate_up, c.swiglu_alpha, c.swiglu_limit)
            y = mxfp4_linear(act, ex.down_blocks[e], ex.down_scales[e], ex.down_bias[e], down_rows)
            out[tokens] += y * weights[tokens, slot][:, None]
        return out

    def _unembed(self, x: np.ndarray) -> np.ndarray:
        vocab = self.config.vocab_size
        logits = np.empty((x.shape[0], vocab), dtype=np.float32)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            v1 = min(vocab, v0 + VOCAB_CHUNK)
            np.matmul(x, as_float32(self.unembed[v0:v1], self.unembed_dtype).T, out=logits[:, v0:v1])
        return logits

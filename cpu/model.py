"""gpt-oss in NumPy: the model of `gpt_oss/torch/model.py`, float32 over memory-mapped weights.

Memory: every weight stays in the memory-mapped checkpoint as stored (MXFP4 experts, BF16 or float32
matrices), so the process owns little beyond its KV cache; the pages every token reads are mapped in at
load (`Checkpoint.prefault`), not at the first token that reads them. The embedding, of which a token reads one
row, is read from the file row by row instead, so it never counts in the process's resident memory.

Speed: with the compiled kernels (`kernels`), packed weights are multiplied where they lie; an expert chosen
by several tokens of a prompt decodes each block once for all of them. Plain NumPy decodes a few expert rows
at a time to float32 for BLAS (experts in parallel threads, each with a one-thread BLAS) and widens BF16 in
blocks. `Dense` and `Experts` each choose their own path, so that the model below reads as the architecture;
attention's choice is made in `_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_oss.backend import Model, checked_tokens
from mlx_oss.checkpoint import Checkpoint
from mlx_oss.config import ModelConfig
from mlx_oss.layouts import NUMPY
from mlx_oss.packed_bf16 import PARTS
from mlx_oss.rope import apply_rope, rope_tables
from mlx_oss.safetensors_io import as_float32

from . import kernels
from .allocator import keep_freed_memory
from .dense import Dense, side_by_side
from .experts import Experts
from .kv_cache import KVCache, as_stored
from .layers import attention, first_visible_key, rms_norm, route
from .quantized_kv_cache import QuantizedKVCache
from .workers import Workers


@dataclass
class AttentionWeights:
    qkv: list[Dense]  # q, k and v projections, fused into one in the NumPy layout
    out: Dense
    sinks: np.ndarray  # [heads]


@dataclass
class LayerWeights:
    input_norm: np.ndarray
    attention: AttentionWeights
    post_attention_norm: np.ndarray
    router: Dense  # [E, hidden]
    experts: Experts


EMBEDDING = "model.embed_tokens.weight"


class NumpyModel(Model):
    backend = "numpy"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.config: ModelConfig = checkpoint.config
        c = self.config
        self.uses_kernels = kernels.available()
        self.kernel_description = kernels.description()
        if self.uses_kernels:
            try:
                kernels.warm_up()
            except Exception as e:  # a numba or LLVM that cannot build them: run, slower, without
                self.uses_kernels = False
                self.kernel_description = f"plain NumPy (the compiled kernels failed to build: {e})"
        self._workers = Workers()
        keep_freed_memory()  # a prompt's scratch arrays fault in once, not at every layer
        self.mapped: list[str] = []  # tensors read in full at every token, straight from the map
        self.embed_dtype = checkpoint.info(EMBEDDING).dtype
        # Tied, the embedding is the unembedding too, mapped and read whole at every token; untied, a token reads
        # one row, from the file (`Checkpoint.read_rows`), which leaves nothing mapped.
        self._mapped_embedding = checkpoint.raw(EMBEDDING) if c.tie_word_embeddings else None
        self.unembed = self._dense(EMBEDDING if c.tie_word_embeddings else "lm_head.weight", None)
        self.final_norm = checkpoint.float32("model.norm.weight")
        self.layers = [self._load_layer(i) for i in range(c.num_hidden_layers)]
        if checkpoint.packed_names and not self.uses_kernels:
            self.kernel_description += (
                "; this checkpoint's packed matrices are unpacked at every token without the kernels, slower than "
                "its BF16 source would run"
            )
        self.map_in()

    def map_in(self) -> None:
        """Map every tensor a token reads in full (`mapped`) into the process now (`Checkpoint.prefault`)."""
        for name in self.mapped:
            self.checkpoint.prefault(name)

    def map_out(self) -> None:
        self.checkpoint.release()

    def _dense(self, weight: str, bias: str | None) -> Dense:
        """A checkpoint matrix, mapped as stored when float32, BF16 or packed BF16 (which `Dense` widens or unpacks
        as it goes)."""
        ck = self.checkpoint
        packed = ck.packed(weight)
        if packed is not None:
            w = packed
            self.mapped += [weight.removesuffix(".weight") + "." + part for part in PARTS]
        elif ck.info(weight).dtype in ("BF16", "F32"):
            w = ck.raw(weight)
            self.mapped.append(weight)
        else:
            w = ck.float32(weight)
        return Dense(w, ck.float32(bias) if bias else None, self.uses_kernels, self._workers)

    def _load_layer(self, i: int) -> LayerWeights:
        ck = self.checkpoint
        p = f"model.layers.{i}."
        f32 = ck.float32
        experts = p + "mlp.experts."
        self.mapped += [experts + f"{m}_proj_{part}" for m in ("gate_up", "down") for part in ("blocks", "scales")]

        def attn(name: str) -> Dense:
            return self._dense(p + f"self_attn.{name}.weight", p + f"self_attn.{name}.bias")

        projections = ["qkv_proj"] if ck.layout == NUMPY else ["q_proj", "k_proj", "v_proj"]
        return LayerWeights(
            input_norm=f32(p + "input_layernorm.weight"),
            attention=AttentionWeights(
                qkv=[attn(name) for name in projections],
                out=attn("o_proj"),
                sinks=f32(p + "self_attn.sinks"),
            ),
            post_attention_norm=f32(p + "post_attention_layernorm.weight"),
            router=self._dense(p + "mlp.router.weight", p + "mlp.router.bias"),
            experts=Experts(
                gate_up_blocks=ck.raw(experts + "gate_up_proj_blocks"),
                gate_up_scales=ck.raw(experts + "gate_up_proj_scales"),
                gate_up_bias=f32(experts + "gate_up_proj_bias"),
                down_blocks=ck.raw(experts + "down_proj_blocks"),
                down_scales=ck.raw(experts + "down_proj_scales"),
                down_bias=f32(experts + "down_proj_bias"),
                alpha=self.config.swiglu_alpha,
                limit=self.config.swiglu_limit,
                uses_kernels=self.uses_kernels,
                workers=self._workers,
            ),
        )

    kv_bits: int | None = None  # 8 for an int8 KV cache (`--kv-bits 8`), 16 for float16 (`--kv-bits 16`)

    def new_cache(self, kv_bits: int | None = None) -> KVCache | QuantizedKVCache:
        """An empty cache: float32, float16 at `kv_bits` 16, or int8 with per-position scales at 8 (default:
        `self.kv_bits`)."""
        c = self.config
        bits = kv_bits if kv_bits is not None else self.kv_bits
        if bits not in (None, 16):
            windows = [c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)]
            return QuantizedKVCache(windows, c.num_key_value_heads, c.head_dim, bits)
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, half=bits == 16)

    def restore_cache(self, state) -> KVCache:
        c = self.config
        return KVCache.from_state(state, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.kv_bits == 16)

    def forward(self, token_ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Run `token_ids` after whatever `cache` holds, extending it; return their logits.

        With `last_only` only the last position's logits are computed (`[1, vocab_size]`).
        """
        tokens = checked_tokens(token_ids, self.config.vocab_size)
        self.checkpoint.check_unchanged()  # a shard cut short since loading would end the process at its first read
        # The parallel work is the kernels' or the workers'; BLAS's own threads would only spin between calls.
        with self._workers.one_blas_thread():
            return self._forward(tokens, cache, last_only)

    def _embedding(self, tokens: np.ndarray) -> np.ndarray:
        if self._mapped_embedding is not None:
            return self._mapped_embedding[tokens]
        return self.checkpoint.read_rows(EMBEDDING, tokens)

    def _forward(self, tokens: np.ndarray, cache: KVCache | None, last_only: bool) -> np.ndarray:
        c = self.config
        start = cache.length if cache is not None else 0
        cos, sin = rope_tables(c.rope, c.head_dim, np.arange(start, start + tokens.size))
        x = as_float32(self._embedding(tokens), self.embed_dtype)
        for i, layer in enumerate(self.layers):
            x += self._attention(i, layer, rms_norm(x, layer.input_norm, c.rms_norm_eps), cos, sin, start, cache)
            x += self._moe(layer, rms_norm(x, layer.post_attention_norm, c.rms_norm_eps))
        if cache is not None:
            cache.advance(tokens.size)
        if last_only:
            x = x[-1:]
        return self.unembed(rms_norm(x, self.final_norm, c.rms_norm_eps))

    def _attention(self, i, layer, h, cos, sin, start, cache) -> np.ndarray:
        c = self.config
        w = layer.attention
        T = h.shape[0]
        qkv = side_by_side(w.qkv, h)  # one matrix in the NumPy layout, three in a checkpoint's own
        heads = c.num_attention_heads
        qk = apply_rope(qkv[:, : c.q_size + c.kv_size].reshape(T, heads + c.num_key_value_heads, c.head_dim), cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, c.q_size + c.kv_size :].reshape(T, c.num_key_value_heads, c.head_dim)
        window = c.sliding_window if c.is_sliding(i) else None
        k_start = 0  # the position of the first key: a quantized cache drops a sliding layer's oldest
        if cache is None:
            if self.kv_bits == 16:  # as a float16 cache would hold them, so that both routes agree
                k, v = as_stored(k, v)
            k, v = k.transpose(1, 2, 0), v.transpose(1, 2, 0)
        else:
            cache.append(i, k, v)
        if self.uses_kernels and T <= kernels.DECODE_ROWS:  # decoding: the kernels read the cache's whole buffers
            if cache is not None:
                (k, v), k_start = cache.buffers(i), cache.first_held(i)
            else:
                k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
            mixed = kernels.attention(q, k, v, w.sinks, start, window, k_start)
        else:
            if cache is not None:  # float32, from the first position the queries see
                widen = kernels.widened if self.uses_kernels else None
                k, v, k_start = cache.held(i, first_visible_key(start, window), widen)
            mixed = self._attention_in_threads(q, k, v, w.sinks, start, window, k_start)
        return w.out(mixed)

    def _attention_in_threads(self, q, k, v, sinks, start, window, k_start) -> np.ndarray:
        """`layers.attention` with the kv heads shared out among the workers (BLAS runs on one thread each; with the
        kernels, so does their softmax, which lets go of the GIL)."""
        kv_heads = k.shape[0]
        group = q.shape[1] // kv_heads
        shares = [s for s in np.array_split(np.arange(kv_heads), self._workers.count) if s.size]
        softmax = kernels.softmax_in_spans if self.uses_kernels else None

        def share(heads: np.ndarray) -> np.ndarray:
            first, last = heads[0], heads[-1] + 1
            queries = slice(first * group, last * group)
            keys, values = k[first:last], v[first:last]
            return attention(q[:, queries], keys, values, sinks[queries], start, window, k_start, softmax)

        return np.concatenate(self._workers.map(share, shares), axis=1)

    def _moe(self, layer: LayerWeights, h: np.ndarray) -> np.ndarray:
        """Each token through its top-k experts, their outputs weighted by the router."""
        chosen, weights = route(layer.router(h), self.config.num_experts_per_tok)
        y = layer.experts(h, chosen)  # [T, k, hidden]
        y *= weights[..., None]
        return y.sum(axis=-2)

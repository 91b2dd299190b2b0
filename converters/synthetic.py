"""Synthetic gpt-oss checkpoints: random weights in the exact Hugging Face layout, names and dtypes.

Real weights cannot be downloaded in tests or CI, so tests and benchmarks run on these. They are
written like the hub's: `model-0000i-of-0000N.safetensors` shards ("of" names the last index), a
`model.safetensors.index.json`, `config.json` and `generation_config.json`; BF16 everywhere but
the MXFP4 expert blocks and scales (uint8). Tensors are generated and written in chunks, so even
the 20b preset needs little RAM.

The weights are scaled so that every projection roughly preserves the size of its input: hidden
states stay finite through all layers and the logits spread over the vocabulary instead of
collapsing onto one token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_oss.atomic import atomic_directory, ensure_free_space
from mlx_oss.config import ModelConfig, RopeConfig, alternating_layer_types
from mlx_oss.layouts import UNQUANTIZED, expected_tensors
from mlx_oss.mxfp4 import dequantize
from mlx_oss.safetensors_io import SHARD_BYTES, TensorSpec, f32_to_bf16, write_shards

CHUNK_BYTES = 32 * 1024 * 1024
E2M1_RMS = math.sqrt(float(np.mean(np.square([0, 0.5, 1, 1.5, 2, 3, 4, 6]))))  # of a uniformly random nibble


_REAL = dict(
    vocab_size=201088,
    hidden_size=2880,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=2880,
    num_experts_per_tok=4,
    sliding_window=128,
    rope=RopeConfig(),
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=201088,  # the real vocabulary, so harmony's tokens are valid ids
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=4,
        sliding_window=16,
        layer_types=alternating_layer_types(4),
        rope=RopeConfig(),
    ),
    "20b": ModelConfig(num_hidden_layers=24, num_local_experts=32, layer_types=alternating_layer_types(24), **_REAL),
    "120b": ModelConfig(num_hidden_layers=36, num_local_experts=128, layer_types=alternating_layer_types(36), **_REAL),
}


@dataclass(frozen=True)
class SynthOptions:
    seed: int = 0
    expert_bias_std: float = 0.1  # large values (several units) push the SwiGLU clamp into play
    shard_bytes: int = SHARD_BYTES
    single_file: bool = False
    # experts as transformers saves a dequantized gpt-oss (the `unquantized` layout), with the values the MXFP4
    # checkpoint of the same seed decodes to
    unquantized: bool = False


def preset_config(name: str, **overrides) -> ModelConfig:
    """A preset's config with shape overrides (None means keep); layer types follow the layer count."""
    config = PRESETS[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    rope_changes = {k: changes.pop(k) for k in ("truncate",) if k in changes}
    if rope_changes:
        changes["rope"] = dataclasses.replace(config.rope, **rope_changes)
    if "num_hidden_layers" in changes and "layer_types" not in changes:
        changes["layer_types"] = alternating_layer_types(changes["num_hidden_layers"])
    config = dataclasses.replace(config, **changes)
    if config.pad_token_id is not None and config.pad_token_id >= config.vocab_size:
        config = dataclasses.replace(config, pad_token_id=None)  # a small test vocabulary has no real pad id
    return ModelConfig.from_dict(config.to_hf_dict(), source=f"preset {name!r} with overrides")


class _Generator:
    """Random tensors for one checkpoint, each from its own stream so that order does not matter."""

    def __init__(self, config: ModelConfig, options: SynthOptions):
        self.config = config
        self.options = options

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, zlib.crc32(name.encode())])

    def specs(self) -> list[TensorSpec]:
        if not self.options.unquantized:
            return [self.spec(name, want.shape, want.dtypes[0]) for name, want in expected_tensors(self.config).items()]
        quantized = expected_tensors(self.config)
        return [
            self.dequantized(name, quantized[name + "_blocks"].shape, want.shape)
            if name + "_blocks" in quantized
            else self.spec(name, want.shape, want.dtypes[0])
            for name, want in expected_tensors(self.config, UNQUANTIZED).items()
        ]

    def dequantized(self, name: str, blocks_shape: tuple[int, ...], shape: tuple[int, ...]) -> TensorSpec:
        """Expert matrix `name` `[E, in, out]` in BF16 (exact): the MXFP4 blocks and scales of the same seed, drawn
        whole as the MXFP4 writer draws them (a layer's: 0.27 GB for 20b), then decoded and transposed per expert."""

        def chunks() -> Iterator[np.ndarray]:
            blocks = np.concatenate(list(self.chunks(name + "_blocks", blocks_shape)))
            scales = np.concatenate(list(self.chunks(name + "_scales", blocks_shape[:-1])))
            for e in range(shape[0]):
                yield f32_to_bf16(np.ascontiguousarray(dequantize(blocks[e], scales[e]).T))[None]

        return TensorSpec(name, "BF16", shape, chunks)

    def spec(self, name: str, shape: tuple[int, ...], dtype: str) -> TensorSpec:
        return TensorSpec(name, dtype, shape, lambda: self.chunks(name, shape))

    def chunks(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        rng = self.rng(name)
        row_size = int(np.prod(shape[1:], dtype=np.int64))
        rows_per_chunk = max(1, CHUNK_BYTES // max(1, 4 * row_size))
        make = self.maker(name, shape)
        for r0 in range(0, shape[0], rows_per_chunk):
            r1 = min(shape[0], r0 + rows_per_chunk)
            yield make(rng, (r1 - r0, *shape[1:]))

    def maker(self, name: str, shape: tuple[int, ...]) -> Callable[[np.random.Generator, tuple], np.ndarray]:
        c, o = self.config, self.options

        def normal(std: float, mean: float = 0.0):
            return lambda rng, s: f32_to_bf16(rng.standard_normal(s, dtype=np.float32) * np.float32(std) + mean)

        if name.endswith("_blocks"):
            return lambda rng, s: rng.integers(0, 256, size=s, dtype=np.uint8)
        if name.endswith("_scales"):
            fan_in = shape[-1] * 32
            # a scale that gives the decoded weights a standard deviation near 1 / sqrt(fan_in)
            base = 127 + round(math.log2(1 / (math.sqrt(fan_in) * E2M1_RMS)))
            return lambda rng, s: (base + rng.integers(-1, 2, size=s)).astype(np.uint8)
        if name.endswith("gate_up_proj_bias"):
            return normal(o.expert_bias_std)
        if name.endswith("norm.weight"):
            return normal(0.1, mean=1.0)
        if name.endswith("sinks"):
            return normal(1.0)
        if name.endswith(".bias"):
            return normal(0.1)
        if name == "model.embed_tokens.weight":
            return normal(1.0)
        if name.endswith("o_proj.weight"):
            return normal(1 / math.sqrt(c.q_size))
        return normal(1 / math.sqrt(c.hidden_size))  # q, k, v, router, lm_head


def generation_config(config: ModelConfig) -> dict:
    return {
        "bos_token_id": 199998,
        "do_sample": True,
        "eos_token_id": [200002, 199999, 200012],
        "pad_token_id": config.pad_token_id,
    }


def write_synthetic(
    destination: str | Path,
    config: ModelConfig,
    options: SynthOptions = SynthOptions(),
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Write a synthetic checkpoint for `config` to `destination` (which must not exist yet)."""
    destination = Path(destination)
    specs = _Generator(config, options).specs()
    total = sum(s.nbytes for s in specs)
    ensure_free_space(destination.parent, total)
    hf_config = config.to_hf_dict()
    if options.unquantized:
        del hf_config["quantization_config"]  # as transformers saves a dequantized model
    with atomic_directory(destination) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        write_shards(tmp, specs, options.shard_bytes, options.single_file, on_bytes)
    return destination


def total_bytes(config: ModelConfig, options: SynthOptions = SynthOptions()) -> int:
    return sum(s.nbytes for s in _Generator(config, options).specs())

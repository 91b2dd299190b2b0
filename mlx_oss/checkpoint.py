"""A gpt-oss checkpoint on disk in the Hugging Face layout: config, shards, and checked tensors.

Opening a checkpoint reads only headers. Every tensor the model needs is checked against the
config (present, right shape, a dtype we can read) before any backend starts, so a broken download
fails at once with the file and tensor named, not halfway through a forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import MXFP4_BLOCK, ModelConfig
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, TensorInfo, as_float32

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def expected_tensors(config: ModelConfig) -> dict[str, Expected]:
    """Every tensor of the Hugging Face gpt-oss layout, with its shape and the dtypes we accept."""
    c = config
    fl = FLOAT_DTYPES
    groups_hidden = c.hidden_size // MXFP4_BLOCK
    groups_inter = c.intermediate_size // MXFP4_BLOCK
    E = c.num_local_experts
    out: dict[str, Expected] = {
        "model.embed_tokens.weight": Expected((c.vocab_size, c.hidden_size), fl),
        "model.norm.weight": Expected((c.hidden_size,), fl),
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = Expected((c.vocab_size, c.hidden_size), fl)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": Expected((c.hidden_size,), fl),
            p + "post_attention_layernorm.weight": Expected((c.hidden_size,), fl),
            p + "self_attn.q_proj.weight": Expected((c.q_size, c.hidden_size), fl),
            p + "self_attn.q_proj.bias": Expected((c.q_size,), fl),
            p + "self_attn.k_proj.weight": Expected((c.kv_size, c.hidden_size), fl),
            p + "self_attn.k_proj.bias": Expected((c.kv_size,), fl),
            p + "self_attn.v_proj.weight": Expected((c.kv_size, c.hidden_size), fl),
            p + "self_attn.v_proj.bias": Expected((c.kv_size,), fl),
            p + "self_attn.o_proj.weight": Expected((c.hidden_size, c.q_size), fl),
            p + "self_attn.o_proj.bias": Expected((c.hidden_size,), fl),
            p + "self_attn.sinks": Expected((c.num_attention_heads,), fl),
            p + "mlp.router.weight": Expected((E, c.hidden_size), fl),
            p + "mlp.router.bias": Expected((E,), fl),
            p + "mlp.experts.gate_up_proj_blocks": Expected((E, 2 * c.intermediate_size, groups_hidden, 16), ("U8",)),
            p + "mlp.experts.gate_up_proj_scales": Expected((E, 2 * c.intermediate_size, groups_hidden), ("U8",)),
            p + "mlp.experts.gate_up_proj_bias": Expected((E, 2 * c.intermediate_size), fl),
            p + "mlp.experts.down_proj_blocks": Expected((E, c.hidden_size, groups_inter, 16), ("U8",)),
            p + "mlp.experts.down_proj_scales": Expected((E, c.hidden_size, groups_inter), ("U8",)),
            p + "mlp.experts.down_proj_bias": Expected((E, c.hidden_size), fl),
        }
    return out


class Checkpoint:
    """A Hugging Face gpt-oss model directory: `config.json` plus one or more safetensors shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.exists():
            raise CheckpointError(f"{self.directory}: no such model directory")
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory; give the folder that holds config.json")
        self.config = ModelConfig.from_file(self.directory / "config.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.locations: dict[str, str] = {}  # tensor name -> shard file name
        self._open_shards()
        self._check_tensors()

    def _open_shards(self) -> None:
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{index_path}: not a valid index (expected a 'weight_map' object)") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise CheckpointError(f"{self.directory / shard}: shard listed in {INDEX_FILE} is missing")
                self.files[shard] = SafetensorsFile(self.directory / shard)
            for name, shard in weight_map.items():
                if name not in self.files[shard].tensors:
                    raise CheckpointError(
                        f"{self.directory / shard}: tensor '{name}' is listed in {INDEX_FILE} but not in the shard"
                    )
                self.locations[name] = shard
            return
        shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.directory}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")
        for shard in shards:
            self.files[shard] = SafetensorsFile(self.directory / shard)
            for name in self.files[shard].tensors:
                self.locations.setdefault(name, shard)

    def _check_tensors(self) -> None:
        expected = expected_tensors(self.config)
        if "model.layers.0.mlp.experts.gate_up_proj" in self.locations:
            raise CheckpointError(
                f"{self.directory}: expert weights are stored unquantized (mlp.experts.gate_up_proj); "
                "only the MXFP4 layout of the published gpt-oss checkpoints is supported"
            )
        for name, want in expected.items():
            if name not in self.locations:
                raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
            info = self.info(name)
            where = self.directory / self.locations[name]
            if info.shape != want.shape:
                raise CheckpointError(
                    f"{where}: tensor '{name}' has shape {list(info.shape)}, config.json implies {list(want.shape)}"
                )
            if info.dtype not in want.dtypes:
                raise CheckpointError(
                    f"{where}: tensor '{name}' has dtype {info.dtype}, expected {' or '.join(want.dtypes)}"
                )

    def info(self, name: str) -> TensorInfo:
        return self.files[self.locations[name]].tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored, memory-mapped (BF16 as uint16 bits)."""
        if name not in self.locations:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self.files[self.locations[name]].array(name)

    def float32(self, name: str) -> np.ndarray:
        """A float tensor widened to float32 (a copy: use `raw` for large tensors read in pieces)."""
        return as_float32(self.raw(name), self.info(name).dtype)

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

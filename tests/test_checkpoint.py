"""Checkpoint reading: real safetensors files, sharded or not, and clear errors for broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mlx_oss
from mlx_oss import CheckpointError
from mlx_oss.checkpoint import Checkpoint

SHAPE = dict(vocab_size=300, num_hidden_layers=2)
ROUTER_BIAS = "model.layers.1.mlp.router.bias"


@pytest.fixture
def sharded(synthetic_checkpoint, tmp_path) -> Path:
    """A private copy of a checkpoint split over several shards."""
    source = synthetic_checkpoint(shard_bytes=60_000, **SHAPE)
    return Path(shutil.copytree(source, tmp_path / "sharded"))


@pytest.fixture
def single(synthetic_checkpoint, tmp_path) -> Path:
    source = synthetic_checkpoint(single_file=True, **SHAPE)
    return Path(shutil.copytree(source, tmp_path / "single"))


def rewrite_with_torch(directory: Path, change) -> None:
    """Rewrite model.safetensors with the official safetensors writer after `change(tensors)`."""
    path = directory / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_and_single_file_give_the_same_model(sharded, single):
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    tokens = np.arange(0, 300, 17)
    np.testing.assert_array_equal(mlx_oss.load(sharded).logits(tokens), mlx_oss.load(single).logits(tokens))


def test_files_from_the_official_writer_load_and_float32_is_the_same_model(single):
    tokens = np.arange(0, 300, 23)
    before = mlx_oss.load(single).logits(tokens)

    def widen(tensors):
        for name, t in tensors.items():
            if t.dtype == torch.bfloat16:
                tensors[name] = t.float()

    rewrite_with_torch(single, widen)
    assert Checkpoint(single).info("lm_head.weight").dtype == "F32"
    np.testing.assert_array_equal(mlx_oss.load(single).logits(tokens), before)


def test_our_reader_agrees_with_the_safetensors_library(sharded):
    checkpoint = Checkpoint(sharded)
    for name in ["model.embed_tokens.weight", "model.layers.0.mlp.experts.down_proj_scales", ROUTER_BIAS]:
        with safe_open(sharded / checkpoint.locations[name], framework="pt") as f:
            theirs = f.get_tensor(name).float().numpy()
        np.testing.assert_array_equal(checkpoint.float32(name), theirs)


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: shard listed in model.safetensors.index.json is missing"):
        mlx_oss.load(sharded)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated: tensor '.*' ends at byte \d+ but the file has"):
        mlx_oss.load(sharded)


def test_not_a_safetensors_file(single):
    (single / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="header is not valid JSON; not a safetensors file"):
        mlx_oss.load(single)
    (single / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"truncated \(3 bytes\)"):
        mlx_oss.load(single)


def test_wrong_shape(single):
    rewrite_with_torch(single, lambda t: t.update({ROUTER_BIAS: t[ROUTER_BIAS][:5].clone()}))
    with pytest.raises(CheckpointError) as error:
        mlx_oss.load(single)
    assert str(error.value) == (
        f"{single / 'model.safetensors'}: tensor '{ROUTER_BIAS}' has shape [5], config.json implies [8]"
    )


def test_wrong_dtype(single):
    rewrite_with_torch(single, lambda t: t.update({ROUTER_BIAS: t[ROUTER_BIAS].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=f"tensor '{ROUTER_BIAS}' has dtype I32, expected BF16 or F16 or F32"):
        mlx_oss.load(single)


def test_missing_tensor(single):
    rewrite_with_torch(single, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.self_attn.sinks' is missing"):
        mlx_oss.load(single)


def test_index_naming_a_tensor_its_shard_lacks(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.extra"] = index["weight_map"][ROUTER_BIAS]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor 'model.layers.9.extra' is listed in .* but not in the shard"):
        mlx_oss.load(sharded)


def test_unquantized_experts_are_checked_and_refused_with_the_way_out(synthetic_checkpoint, tmp_path):
    source = synthetic_checkpoint(num_hidden_layers=2, vocab_size=300, unquantized=True, single_file=True)
    with pytest.raises(CheckpointError, match=r"stored unquantized .* python -m mlx_oss.converters mxfp4 "):
        mlx_oss.load(source)
    damaged = shutil.copytree(source, tmp_path / "damaged")
    rewrite_with_torch(damaged, lambda t: t.update({"model.layers.1.mlp.experts.down_proj": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.experts.down_proj' has shape \\[2, 2\\]"):
        mlx_oss.load(damaged)


def test_directory_problems(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        mlx_oss.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        mlx_oss.load(tmp_path / "file")
    with pytest.raises(mlx_oss.ConfigError, match="no config.json here"):
        mlx_oss.load(tmp_path)


def test_no_weights(single):
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        mlx_oss.load(single)


def test_unknown_backend(single):
    with pytest.raises(mlx_oss.MlxOssError, match="unknown backend 'cuda'"):
        mlx_oss.load(single, backend="cuda")

"""Synthetic checkpoints: the exact hub layout, sane activations, and a safe command line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mlx_oss
from mlx_oss.checkpoint import Checkpoint
from mlx_oss.config import ModelConfig
from mlx_oss.converters.synthetic import PRESETS, total_bytes
from mlx_oss.cpu import model as cpu_model
from mlx_oss.layouts import expected_tensors

HUB_20B_TENSORS = 459  # tensor count of openai/gpt-oss-20b's Hugging Face shards


def test_20b_preset_has_the_hub_layout():
    tensors = expected_tensors(PRESETS["20b"])
    assert len(tensors) == HUB_20B_TENSORS
    blocks = tensors["model.layers.23.mlp.experts.gate_up_proj_blocks"]
    assert blocks.shape == (32, 5760, 90, 16) and blocks.dtypes == ("U8",)
    assert tensors["model.layers.0.mlp.experts.down_proj_scales"].shape == (32, 2880, 90)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4096, 2880)
    assert tensors["model.layers.0.self_attn.sinks"].shape == (64,)
    assert tensors["lm_head.weight"].shape == (201088, 2880)
    assert 13.7e9 < total_bytes(PRESETS["20b"]) < 13.8e9  # 12.8 GiB, as the hub's shards


def test_written_files_have_hub_names_dtypes_and_index(synthetic_checkpoint):
    path = synthetic_checkpoint(shard_bytes=20_000_000)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors" for i in range(len(shards))]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == total_bytes(ModelConfig.from_file(path / "config.json"))
    checkpoint = Checkpoint(path)
    dtypes = {name: checkpoint.info(name).dtype for name in checkpoint.locations}
    assert {d for n, d in dtypes.items() if n.endswith(("_blocks", "_scales"))} == {"U8"}
    assert {d for n, d in dtypes.items() if not n.endswith(("_blocks", "_scales"))} == {"BF16"}
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [200002, 199999, 200012]


def test_same_seed_same_weights_other_seed_other_weights(synthetic_checkpoint):
    a = Checkpoint(synthetic_checkpoint(vocab_size=300, num_hidden_layers=1, seed=11))
    b = Checkpoint(synthetic_checkpoint(vocab_size=300, num_hidden_layers=1, seed=11, single_file=True))
    c = Checkpoint(synthetic_checkpoint(vocab_size=300, num_hidden_layers=1, seed=12))
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    np.testing.assert_array_equal(a.raw(name), b.raw(name))
    assert not np.array_equal(a.raw(name), c.raw(name))


def test_activations_stay_finite_and_logits_spread(synthetic_checkpoint, monkeypatch):
    """Through all 24 layers of the 20b depth (on narrow shapes), nothing blows up or collapses."""
    path = synthetic_checkpoint(num_hidden_layers=24, vocab_size=2000)
    model = mlx_oss.load(path)
    norms = []
    original = cpu_model.rms_norm

    def recording(x, weight, eps):
        norms.append(float(np.sqrt(np.mean(np.square(x)))))
        return original(x, weight, eps)

    monkeypatch.setattr(cpu_model, "rms_norm", recording)
    logits = model.logits(np.random.default_rng(0).integers(0, 2000, 32))
    assert len(norms) == 2 * 24 + 1 and np.isfinite(norms).all() and max(norms) < 100
    assert np.isfinite(logits).all()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs + 1e-30)).sum(-1)
    assert entropy.min() > 1.0  # nats: far from a one-hot answer
    assert len(set(logits.argmax(-1).tolist())) > 8  # and not the same token everywhere


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlx_oss.converters", *args], capture_output=True, text=True, **kwargs)


def test_cli_writes_a_loadable_checkpoint_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "m"
    done = run_cli("synth", str(out), "--preset", "tiny", "--layers", "1", "--vocab-size", "500")
    assert done.returncode == 0, done.stderr
    assert "wrote a synthetic tiny checkpoint" in done.stdout and "100%" in done.stderr
    assert mlx_oss.load(out).config.num_hidden_layers == 1
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    again = run_cli("synth", str(out))
    assert again.returncode == 1
    assert (
        again.stderr.strip() == f"python -m mlx_oss.converters: error: {out}: already exists; "
        "remove it or choose another destination"
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_cli_rejects_bad_shapes_in_one_line(tmp_path):
    done = run_cli("synth", str(tmp_path / "m"), "--heads", "3", "--kv-heads", "2")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "field 'num_key_value_heads' (2) must divide num_attention_heads (3)" in done.stderr
    assert not (tmp_path / "m").exists()


def test_cli_interrupted_leaves_nothing(tmp_path):
    out = tmp_path / "big"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_oss.converters",
            "synth",
            str(out),
            "--preset",
            "tiny",
            "--layers",
            "24",
            "--hidden-size",
            "512",
            "--intermediate-size",
            "512",
            "--experts",
            "32",
            "--vocab-size",
            "2000",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()  # the first progress line: writing has begun
    assert "writing" in line
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_not_enough_disk_space_is_refused_before_writing(tmp_path):
    from mlx_oss.converters.synthetic import write_synthetic

    huge = dataclasses.replace(PRESETS["120b"], num_local_experts=100_000)
    need = f"{total_bytes(huge) / 1e9:.2f}"
    with pytest.raises(mlx_oss.MlxOssError, match=f"not enough free disk space: need {need} GB, .* GB free"):
        write_synthetic(tmp_path / "huge", huge)
    assert os.listdir(tmp_path) == []

"""Checkpoint reading: real safetensors files, sharded or not, and clear errors for broken ones."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
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


def test_rows_read_from_the_file_are_the_mapped_rows_in_the_order_asked(single):
    checkpoint = Checkpoint(single)
    name = "model.embed_tokens.weight"
    rows = np.array([7, 0, 299, 7, 150])
    np.testing.assert_array_equal(checkpoint.read_rows(name, rows), checkpoint.raw(name)[rows])
    assert checkpoint.read_rows(name, np.array([], np.int64)).shape == (0, *checkpoint.info(name).shape[1:])


@pytest.mark.parametrize(
    ("rows", "message"),
    [([300], "has rows 0 to 299; asked for row 300"), ([3, -1], "asked for row -1"), ([1.0], "must be integers")],
)
def test_rows_outside_the_tensor_are_refused_naming_it(single, rows, message):
    with pytest.raises(IndexError, match=rf"model.safetensors: .*'model.embed_tokens.weight'.*{re.escape(message)}"):
        Checkpoint(single).read_rows("model.embed_tokens.weight", np.array(rows))


def test_rows_of_a_shard_cut_short_after_loading_are_a_checkpoint_error(single):
    checkpoint = Checkpoint(single)
    name = "model.embed_tokens.weight"
    info = checkpoint.info(name)
    os.truncate(single / "model.safetensors", info.begin + 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.read_rows(name, np.array([info.shape[0] - 1]))


def test_files_from_the_official_writer_load_and_float32_is_the_same_model(single, float32_activations):
    tokens = np.arange(0, 300, 23)
    before = mlx_oss.load(single).logits(tokens)

    def widen(tensors):
        for name, t in tensors.items():
            if t.dtype == torch.bfloat16:
                tensors[name] = t.float()

    rewrite_with_torch(single, widen)
    assert Checkpoint(single).info("lm_head.weight").dtype == "F32"
    # The same values; on AMX the BF16 matrices are summed on its tiles, float32 ones by BLAS, in another order.
    after = mlx_oss.load(single).logits(tokens)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


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
    with pytest.raises(CheckpointError, match=r"header is not valid JSON \(line 1.*\); not a safetensors file"):
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


# Issue 15: a hostile or broken checkpoint gives one clear error naming the file, never a traceback, a hang,
# a read outside the model directory or gigabytes allocated.


def chat_cli(model: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """The terminal chat on `model`, answering a piped question: it loads the model first."""
    return subprocess.run(
        [sys.executable, "-m", "mlx_oss.chat", "--model", str(model), "--backend", "numpy"],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mlx_oss.chat: error: "), result.stderr
    for part in parts:
        assert part in lines[0]


def set_index(directory: Path, change) -> Path:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    change(index["weight_map"])
    index_path.write_text(json.dumps(index))
    return index_path


@pytest.mark.parametrize(
    "shard, message",
    [
        ("/etc/passwd", "'/etc/passwd' is an absolute path; shards must lie inside the model directory"),
        ("../outside.safetensors", "'../outside.safetensors' steps outside the model directory"),
        ("sub/../../outside.safetensors", "steps outside the model directory"),
        (7, "is int 7, not a file name"),
        (["model-00000-of-00002.safetensors"], "is list"),
        (None, "is NoneType None, not a file name"),
    ],
)
def test_index_cannot_name_files_outside_the_directory(sharded, tmp_path, shard, message):
    (tmp_path / "outside.safetensors").write_bytes(sorted(sharded.glob("model-*"))[0].read_bytes())
    index_path = set_index(sharded, lambda weights: weights.update({ROUTER_BIAS: shard}))
    with pytest.raises(CheckpointError) as error:
        mlx_oss.load(sharded)
    assert str(error.value).startswith(f"{index_path}: the shard of tensor '{ROUTER_BIAS}' ")
    assert message in str(error.value)
    assert_one_line(chat_cli(sharded), str(index_path), message)


def test_hub_cache_links_into_blobs_still_load(sharded, tmp_path):
    """The hub cache's snapshot files are symlinks to ../../blobs/<hash>: names inside, targets outside."""
    repo = tmp_path / "models--openai--gpt-oss-20b"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(sharded.iterdir())):
        shutil.copy(path, repo / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    tokens = np.arange(0, 300, 29)
    np.testing.assert_array_equal(mlx_oss.load(snapshot).logits(tokens), mlx_oss.load(sharded).logits(tokens))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_is_refused_not_waited_on(single, name):
    """Opening a FIFO for reading waits for a writer forever; every file is checked to be a regular one."""
    (single / name).unlink()
    os.mkfifo(single / name)
    error = CheckpointError if name.endswith(".safetensors") else mlx_oss.ConfigError
    with pytest.raises(error, match=f"{single / name}: cannot read: a FIFO, not a regular file"):
        mlx_oss.load(single)
    assert_one_line(chat_cli(single, timeout=30), f"{single / name}: cannot read: a FIFO")


def test_a_fifo_shard_or_index_is_refused(sharded):
    shard = sorted(sharded.glob("model-*"))[1]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CheckpointError, match=f"{shard}: cannot read: a FIFO, not a regular file"):
        mlx_oss.load(sharded)
    index = sharded / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(CheckpointError, match=f"{index}: cannot read: a FIFO, not a regular file"):
        mlx_oss.load(sharded)
    index.unlink()
    index.symlink_to("/dev/zero")  # a device that never ends
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(index))}: cannot read: a device, not a regular file$"):
        mlx_oss.load(sharded)
    index.unlink()
    with socket.socket(socket.AF_UNIX) as listening:  # open() refuses it with the OS's "No such device or address"
        listening.bind(str(index))
        with pytest.raises(
            CheckpointError, match=f"^{re.escape(str(index))}: cannot read: a socket, not a regular file$"
        ):
            mlx_oss.load(sharded)


DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize(
    "index, message",
    [
        (DEEP, "not valid JSON: nested too deeply"),
        (b'{"weight_map": {"a": "\xff"}}', "not UTF-8 text"),
        (b'{"weight_map": {"model.norm.weight": {"file": "x"}}}', "is dict {'file': 'x'}, not a file name"),
        (b'{"weight_map": ["model.safetensors"]}', "not a valid index (expected a 'weight_map' object)"),
        (b"[]", "not a valid index"),
        (b'{"weight_map": {}, "total": ' + b"1" * 5000 + b"}", "not valid JSON (Exceeds the limit (4300 digits)"),
    ],
)
def test_malformed_index_is_one_clear_error(sharded, index, message):
    index_path = sharded / "model.safetensors.index.json"
    index_path.write_bytes(index)
    with pytest.raises(CheckpointError) as error:
        mlx_oss.load(sharded)
    assert str(error.value).startswith(f"{index_path}: ") and message in str(error.value)
    assert_one_line(chat_cli(sharded), message)


def write_header(path: Path, header: bytes | dict, data_bytes: int = 64) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))


def entry(dtype="U8", shape=(4,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, message",
    [
        (DEEP, "header is not valid JSON: nested too deeply"),
        (b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "\xff": 1}', "header is not UTF-8 text"),
        ({"t": entry(offsets=("0", "4"))}, "tensor 't' has malformed data_offsets ['0', '4']"),
        ({"t": entry(offsets=(0,))}, "tensor 't' has malformed data_offsets [0]"),
        ({"t": entry(offsets=(4, 0), shape=())}, "tensor 't' spans -4 bytes but U8[] needs 1"),
        ({"t": entry(shape=(2**64, 1))}, "tensor 't' has a malformed shape [18446744073709551616, 1]"),
        ({"t": entry(shape=(-4,))}, "tensor 't' has a malformed shape [-4]"),
        ({"t": entry(shape=(True, 4))}, "tensor 't' has a malformed shape [True, 4]"),
        ({"t": entry(shape=(4.0,))}, "tensor 't' has a malformed shape [4.0]"),
        ({"t": entry(shape=[1] * 9)}, "has a malformed shape"),
        ({"t": entry(shape=(2**40, 2**40))}, "spans 4 bytes but U8[1099511627776, 1099511627776] needs"),
        ({"t": entry(dtype=["U8"])}, "tensor 't' has unsupported dtype ['U8']"),
        ({"t": entry(dtype="F8_E4M3")}, "tensor 't' has unsupported dtype 'F8_E4M3'"),
        ({"t": "U8"}, "tensor 't' has a malformed header entry (not an object)"),
        ({"t": entry(offsets=(60, 64)), "u": entry(offsets=(60, 64))}, "tensors 't' and 'u' overlap in the file"),
        ({"t": entry(shape=(8,), offsets=(0, 8)), "u": entry(offsets=(4, 8))}, "tensors 't' and 'u' overlap"),
        ({"t": entry(shape=(8,), offsets=(60, 68))}, "truncated: tensor 't' ends at byte"),
        ({"__metadata__": [1], "t": entry()}, "header's __metadata__ is not a JSON object"),
        (b"[1, 2]", "header is not a JSON object"),
        (b'{"t": {"dtype": "U8", "shape": [' + b"1" * 5000 + b"]}}", "header is not valid JSON (Exceeds the limit"),
    ],
)
def test_hostile_headers_are_one_clear_error(single, header, message):
    path = single / "model.safetensors"
    write_header(path, header)
    with pytest.raises(CheckpointError) as error:
        mlx_oss.load(single)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_hostile_header_through_the_cli_is_one_line(single):
    write_header(single / "model.safetensors", {"t": entry(shape=(2**64,))})
    assert_one_line(chat_cli(single), "tensor 't' has a malformed shape [18446744073709551616]")
    write_header(single / "model.safetensors", DEEP)
    assert_one_line(chat_cli(single), "header is not valid JSON: nested too deeply")


def test_a_header_too_large_to_parse_cheaply_is_refused_unread(single):
    path = single / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 50 * 1024 * 1024))
        f.truncate(8 + 50 * 1024 * 1024)  # sparse: the length fits the file
    with pytest.raises(CheckpointError, match=f"{path}: header length 52428800 does not fit .* or exceeds"):
        mlx_oss.load(single)


LOAD_UNDER_A_MEMORY_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))  # 2 GB of address space
import mlx_oss
try:
    mlx_oss.load(sys.argv[1], backend="numpy")
except mlx_oss.MlxOssError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hidden_layers": 10**9}, "ConfigError .* field 'num_hidden_layers' \\(1000000000\\) is beyond"),
        ({"num_hidden_layers": 1024}, "CheckpointError .* tensor 'model.layers.2.input_layernorm.weight' is missing"),
        (
            {"hidden_size": 65536, "vocab_size": 2**24, "num_local_experts": 4096, "intermediate_size": 262144},
            "CheckpointError .* tensor 'model.embed_tokens.weight' has shape \\[300, 64\\], config.json implies",
        ),
    ],
)
def test_huge_config_is_checked_against_the_tensors_before_anything_is_allocated(single, change, message):
    raw = json.loads((single / "config.json").read_text())
    raw.pop("layer_types")
    (single / "config.json").write_text(json.dumps(raw | change))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_UNDER_A_MEMORY_LIMIT, str(single)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.match(message, result.stdout) and result.stdout.count("\n") == 1, result.stdout


TRUNCATE_THEN = """
import sys
import numpy as np
import mlx_oss
model = mlx_oss.load(sys.argv[1], backend="numpy")
shard = model.checkpoint.directory / "model.safetensors"
model.logits([1, 2, 3])
with open(shard, "r+b") as f:
    f.truncate(4096)
if sys.argv[2] == "forward":
    model.logits([1, 2, 3])
else:  # a read of the mapped pages in the middle of a pass, past the file's new end
    print(int(np.asarray(model.checkpoint.raw("lm_head.weight")).sum()))
"""


def test_a_shard_cut_short_after_loading_is_named_before_the_next_pass(single):
    original = (single / "model.safetensors").stat().st_size
    script = TRUNCATE_THEN.replace(
        "    model.logits([1, 2, 3])\n",
        "    try:\n        model.logits([1, 2, 3])\n    except mlx_oss.CheckpointError as e:\n        print(e)\n",
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(single), "forward"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == (
        f"{single / 'model.safetensors'}: changed on disk since it was loaded (was {original} bytes, now 4096); "
        "load the model again\n"
    )


@pytest.mark.parametrize(
    ("flags", "cause"),
    [
        ([], "was stopped (bus error)"),
        # faulthandler is the user's: the watcher cannot learn the signal, and does not guess it
        (["-X", "faulthandler"], "ended abruptly"),
    ],
)
def test_a_shard_cut_short_during_a_pass_is_named_when_the_process_dies(single, flags, cause):
    original = (single / "model.safetensors").stat().st_size
    result = subprocess.run(
        [sys.executable, *flags, "-c", TRUNCATE_THEN, str(single), "read"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == -signal.SIGBUS, result.stderr[-2000:]
    shard = single / "model.safetensors"
    assert (
        f"mlx_oss: the process reading the model {cause}: "
        f"{shard}: changed on disk since it was loaded (was {original} bytes, now 4096); load the model again\n"
        in result.stderr
    ), result.stderr[-2000:]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_process_stopped_otherwise_after_its_shard_changed_is_not_said_to_have_had_a_bus_error(single, stop):
    """Killed, not faulted: the changed file did not end it (the watcher said "bus error" for any death)."""
    script = TRUNCATE_THEN.replace(
        'if sys.argv[2] == "forward":', f"import os\nos.kill(os.getpid(), {int(stop)})\nif False:"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(single), "-"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == -stop, result.stderr[-2000:]
    assert result.stderr == ""  # read to its end: the watcher shares the pipe, so it had its say too


@pytest.mark.parametrize(
    "config, message",
    [
        (b'{"rope_theta": NaN}', "field 'rope_theta' must be a finite number above 1, not nan"),
        (b'{"rope_scaling": [1, 2]}', "field 'rope_scaling' must be an object of rotary embedding parameters"),
        (b'{"layer_types": [[], {}]}', "field 'layer_types' has unknown layer type []"),
        (b'{"tie_word_embeddings": "no"}', "field 'tie_word_embeddings' must be true or false, not 'no'"),
        (b'{"model_type": "gpt_oss\xff"}', "config.json: not UTF-8 text"),
        (b"[" * 200_000 + b"]" * 200_000, "config.json: not valid JSON: nested too deeply"),
    ],
)
def test_a_bad_config_is_one_line_from_the_cli(single, config, message):
    raw = json.loads((single / "config.json").read_text())
    raw.pop("layer_types")
    if config.startswith(b"{"):
        try:
            change = json.loads(config)
        except UnicodeDecodeError:
            change = None
        if change is not None:
            raw = raw | change
            config = json.dumps(raw).encode()
    (single / "config.json").write_bytes(config)
    with pytest.raises(mlx_oss.ConfigError) as error:
        mlx_oss.load(single)
    assert str(error.value).startswith(f"{single / 'config.json'}: ") and message in str(error.value)
    assert_one_line(chat_cli(single), message)


def test_a_tensor_read_from_a_shard_cut_short_names_it(single):
    checkpoint = Checkpoint(single)
    shard = single / "model.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(4096)
    message = f"{shard}: changed on disk since it was loaded (was {size} bytes, now 4096); load the model again"
    with pytest.raises(CheckpointError) as error:
        checkpoint.float32("model.embed_tokens.weight")  # read, not mapped: no bus error to fear
    assert str(error.value) == message


def test_names_from_a_file_are_shown_on_one_short_line(single, sharded):
    write_header(single / "model.safetensors", {"a\nb" * 50_000: entry(dtype="X" * 100_000)})
    with pytest.raises(CheckpointError) as error:
        mlx_oss.load(single)
    message = str(error.value)
    assert "\n" not in message and len(message) < 500
    assert f"{single / 'model.safetensors'}: tensor 'a\\nba\\nb" in message and "has unsupported dtype 'XXX" in message
    set_index(sharded, lambda weights: weights.update({"t\n" * 50_000: "../x\n" * 50_000}))
    with pytest.raises(CheckpointError) as error:
        mlx_oss.load(sharded)
    assert "\n" not in str(error.value) and len(str(error.value)) < 500 and "steps outside" in str(error.value)

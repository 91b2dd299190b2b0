"""The MLX and NumPy layout converters: lossless, loadable by mlx-lm, safe to interrupt, clear on bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need_backend

import mlx_oss
from mlx_oss.checkpoint import Checkpoint
from mlx_oss.converters.layout import convert
from mlx_oss.cpu import kernels
from mlx_oss.layouts import HF, MLX, NUMPY, PACKED, Q8, packable
from mlx_oss.packed_bf16 import PackedMatrix
from mlx_oss.rope import yarn_frequencies

SHAPE = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, sliding_window=6)
TOKENS = np.random.default_rng(4).integers(0, 1000, 30)


def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_oss.converters", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def source(synthetic_checkpoint) -> Path:
    return synthetic_checkpoint(**SHAPE, seed=2)


def test_numpy_layout_gives_the_numpy_backends_logits(source, converted, float32_activations):
    target = converted(source, NUMPY)
    assert Checkpoint(target).layout == NUMPY
    model = mlx_oss.load(target)
    assert model.backend == "numpy" and "numpy layout" in model.backend_reason
    # q, k and v are mapped from the file as they are, not copied
    (qkv,) = model.layers[0].attention.qkv
    assert not qkv.weight.flags.owndata
    original = Checkpoint(source)
    parts = [original.float32(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    np.testing.assert_array_equal(qkv.weight, np.concatenate(parts))  # widened exactly, fused in order
    # float32 and BF16 weights take different (equally exact) routes through the kernels: same logits to rounding
    ours, theirs = model.logits(TOKENS), mlx_oss.load(source, backend="numpy").logits(TOKENS)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_mlx_layout_is_a_lossless_repack(source, converted):
    need_backend("mlx")
    target = converted(source, MLX)
    assert Checkpoint(target).layout == MLX
    model = mlx_oss.load(target)
    assert model.backend == "mlx" and "mlx layout" in model.backend_reason
    np.testing.assert_array_equal(model.logits(TOKENS), mlx_oss.load(source, backend="mlx").logits(TOKENS))
    config = json.loads((target / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert config["mlx_oss"] == {"layout": "mlx", "lossy": False}


def test_packed_layout_is_a_lossless_repack_that_decodes_alike(source, converted, tmp_path):
    target = converted(source, PACKED)
    packed, original = Checkpoint(target), Checkpoint(source)
    assert packed.layout == HF  # to every reader but the CPU's decoding kernels, a Hugging Face checkpoint
    names = packable(original.config)
    for name in names:
        matrix = packed.packed(name)
        assert matrix is not None and name not in packed.locations
        np.testing.assert_array_equal(matrix.rows(0, matrix.shape[0]), original.raw(name))
        assert matrix.packed.nbytes == original.info(name).nbytes * 3 // 4  # and 16 bytes a row of table
    assert tree_size(target) < tree_size(source)
    assert json.loads((target / "config.json").read_text())["mlx_oss"] == {"layout": "packed", "lossy": False}
    model, reference = mlx_oss.load(target, backend="numpy"), mlx_oss.load(source, backend="numpy")
    assert isinstance(model.unembed.weight, PackedMatrix)
    ours, theirs = model.logits(TOKENS), reference.logits(TOKENS)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    caches = model.new_cache(), reference.new_cache()
    for m, cache in zip((model, reference), caches, strict=True):
        m.forward(TOKENS[:10], cache)
    for token in TOKENS[10:14]:  # decoding steps: the packed rows through `packed_matvec`
        ours, theirs = (m.forward([token], cache) for m, cache in zip((model, reference), caches, strict=True))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    # every other reader unpacks: the NumPy layout made from the packed one is the one made from the original
    from_packed = convert(target, tmp_path / "numpy", NUMPY)
    weights = {k: v for k, v in tree_hash(from_packed).items() if k.endswith(".safetensors")}
    assert weights == {k: v for k, v in tree_hash(converted(source, NUMPY)).items() if k.endswith(".safetensors")}


def test_plain_numpy_on_the_packed_layout_says_it_is_slower(source, converted, monkeypatch):
    target = converted(source, PACKED)
    if kernels.available():
        assert "packed matrices are unpacked" not in mlx_oss.load(target, backend="numpy").backend_reason
    monkeypatch.setenv("MLX_OSS_KERNELS", "off")
    reason = mlx_oss.load(target, backend="numpy").backend_reason
    assert "plain NumPy" in reason and "packed matrices are unpacked at every token" in reason
    assert "packed matrices" not in mlx_oss.load(source, backend="numpy").backend_reason


def overwrite(directory: Path, name: str, array: np.ndarray) -> None:
    """Write `array` over tensor `name`'s bytes in its shard (same size)."""
    ck = Checkpoint(directory)
    info, shard = ck.info(name), directory / ck.locations[name]
    assert info.nbytes == array.nbytes
    del ck
    with open(shard, "r+b") as f:
        f.seek(info.begin)
        f.write(np.ascontiguousarray(array).tobytes())


def test_a_damaged_packed_matrix_is_refused_by_name(source, tmp_path):
    original = Path(shutil.copytree(source, tmp_path / "src"))
    name = "model.layers.1.self_attn.o_proj"
    weight = Checkpoint(original).raw(name + ".weight").copy()
    weight[0, :20] = np.ldexp(np.ones(20, np.float32), np.arange(20) * 5 - 50).view(np.uint32) >> 16  # outliers
    overwrite(original, name + ".weight", weight)
    packed = convert(original, tmp_path / "packed", PACKED)
    exceptions = Checkpoint(packed).raw(name + ".exceptions").copy()
    assert len(exceptions) >= 4  # more distinct high bytes than a row's table holds
    np.testing.assert_array_equal(Checkpoint(packed).packed(name + ".weight").rows(0, 1), weight[:1])
    exceptions[0, 0] = 1 << 40  # past the matrix
    overwrite(packed, name + ".exceptions", exceptions)
    problem = "lists indices out of order or outside the matrix"
    with pytest.raises(mlx_oss.CheckpointError, match=f"tensor '{name}.exceptions' {problem}"):
        mlx_oss.load(packed, backend="numpy")


def test_a_matrix_with_many_exceptions_stays_bf16_beside_packed_ones(source, tmp_path):
    """Packing a matrix whose weights span far more octaves than a row's table holds would cost more than it saves:
    it stays BF16, its neighbours are packed, and decoding over the mix gives the original's logits."""
    original = Path(shutil.copytree(source, tmp_path / "src"))
    name = "model.layers.0.self_attn.q_proj.weight"
    shape = Checkpoint(original).info(name).shape
    rng = np.random.default_rng(3)
    spread = rng.standard_normal(shape) * np.ldexp(0.05, rng.integers(-60, 1, shape))  # 60 octaves
    overwrite(original, name, (spread.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
    target = convert(original, tmp_path / "packed", PACKED)
    packed = Checkpoint(target)
    assert packed.packed(name) is None
    np.testing.assert_array_equal(packed.raw(name), Checkpoint(original).raw(name))
    assert packed.packed(name.replace("q_proj", "k_proj")) is not None
    model, reference = mlx_oss.load(target, backend="numpy"), mlx_oss.load(original, backend="numpy")
    caches = model.new_cache(), reference.new_cache()
    for m, cache in zip((model, reference), caches, strict=True):
        m.forward(TOKENS[:10], cache)
    for token in TOKENS[10:13]:
        ours, theirs = (m.forward([token], cache) for m, cache in zip((model, reference), caches, strict=True))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def with_extra_tensors(directory: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
    """Add `tensors` to a sharded checkpoint, in a shard of their own listed in its index."""
    from mlx_oss.safetensors_io import INDEX_FILE, TensorSpec, write_safetensors

    shard = "model-extra.safetensors"
    specs = [TensorSpec(n, dtypes[n], a.shape, lambda a=a: [a]) for n, a in tensors.items()]
    write_safetensors(directory / shard, specs)
    index = json.loads((directory / INDEX_FILE).read_text())
    index["weight_map"] |= {name: shard for name in tensors}
    (directory / INDEX_FILE).write_text(json.dumps(index))


def test_packed_tensors_where_the_layout_packs_nothing_are_never_read(synthetic_checkpoint, tmp_path):
    """A `.packed` tensor beside a matrix the layout does not pack (the router) goes unread, however it is shaped;
    one for a matrix whose width cannot be packed is refused at opening, by name."""
    source = Path(shutil.copytree(synthetic_checkpoint(**SHAPE, shard_bytes=300_000), tmp_path / "src"))
    reference = mlx_oss.load(source, backend="numpy").logits(TOKENS[:6])
    crafted = {"packed": np.zeros((200_000, 96), np.uint8), "tables": np.zeros((1, 16), np.uint8)}
    crafted["exceptions"] = np.zeros((0, 2), np.int64)
    dtypes = {"packed": "U8", "tables": "U8", "exceptions": "I64"}
    base = "model.layers.0.mlp.router"
    with_extra_tensors(
        source, {f"{base}.{k}": v for k, v in crafted.items()}, {f"{base}.{k}": d for k, d in dtypes.items()}
    )
    assert Checkpoint(source).packed(base + ".weight") is None
    np.testing.assert_array_equal(mlx_oss.load(source, backend="numpy").logits(TOKENS[:6]), reference)

    narrow = Path(shutil.copytree(synthetic_checkpoint(**{**SHAPE, "hidden_size": 96}), tmp_path / "narrow"))
    base = "model.layers.0.self_attn.q_proj"
    rows = Checkpoint(narrow).info(base + ".weight").shape[0]
    parts = {"packed": np.zeros((rows, 96), np.uint8), "tables": np.zeros((rows, 16), np.uint8)}
    parts["exceptions"] = np.zeros((0, 2), np.int64)
    with_extra_tensors(
        narrow, {f"{base}.{k}": v for k, v in parts.items()}, {f"{base}.{k}": d for k, d in dtypes.items()}
    )
    with pytest.raises(mlx_oss.CheckpointError, match=f"tensor '{base}.packed' packs a matrix of 96 columns"):
        Checkpoint(narrow)


def mlx_lm_logits(directory: Path, tokens) -> np.ndarray:
    """mlx-lm's own gpt-oss model on `directory`, its BF16 parameters widened to float32 as ours are."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    model, _ = load_model(directory)
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.bfloat16 else p, model.parameters()))
    return np.array(model(mx.array(np.asarray(tokens))[None]).astype(mx.float32))[0]


def test_mlx_lm_runs_our_mlx_layout_and_agrees_where_its_yarn_does(synthetic_checkpoint, converted):
    need_backend("mlx")
    source = synthetic_checkpoint(**SHAPE, seed=2, truncate=True)
    target = converted(source, MLX)
    ours = mlx_oss.load(target, backend="mlx").logits(TOKENS)
    theirs = mlx_lm_logits(target, TOKENS)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * np.abs(ours).max())


def test_mlx_lm_rounds_the_yarn_ramp_that_gpt_oss_does_not(source, converted):
    """gpt-oss says `truncate: false`; mlx-lm floors and ceils YaRN's correction range anyway, so on the real
    config its rotary frequencies, and so its logits, differ from the reference's (and ours)."""
    need_backend("mlx")
    from mlx_lm.models.rope_utils import initialize_rope

    config = Checkpoint(source).config
    assert config.rope.truncate is False
    raw = json.loads((source / "config.json").read_text())
    theirs = 1 / np.array(initialize_rope(config.head_dim, config.rope.theta, False, raw["rope_scaling"])._freqs)
    rounded, _ = yarn_frequencies(dataclasses.replace(config.rope, truncate=True), config.head_dim)
    exact, _ = yarn_frequencies(config.rope, config.head_dim)
    np.testing.assert_allclose(theirs, rounded, rtol=1e-6)
    assert (np.abs(theirs - exact) / exact).max() > 0.1  # the ramp's ends move: some frequencies change by 10 %+
    ours = mlx_oss.load(converted(source, MLX), backend="mlx").logits(TOKENS)
    assert np.abs(mlx_lm_logits(converted(source, MLX), TOKENS) - ours).max() > 1e-3 * np.abs(ours).max()


def test_q8_option_stores_attention_and_embeddings_in_8_bits(synthetic_checkpoint, converted):
    need_backend("mlx")
    import mlx.core as mx

    source = synthetic_checkpoint(**SHAPE, seed=2, truncate=True)  # a rotary mlx-lm agrees with
    lossless, lossy = converted(source, MLX), converted(source, MLX, q8=True)
    assert tree_size(lossy) < tree_size(lossless)
    config = json.loads((lossy / "config.json").read_text())
    assert config["mlx_oss"]["lossy"] is True
    exact, q8 = mlx_oss.load(lossless, backend="mlx"), mlx_oss.load(lossy, backend="mlx")
    for name in ("q_proj", "o_proj"):
        w8 = getattr(q8.layers[1], name)
        assert w8.scales is not None
        widened = mx.dequantize(w8.weight, w8.scales, w8.biases, **Q8, dtype=mx.float32)
        original = getattr(exact.layers[1], name).weight
        # a step of 8-bit affine is 1/255 of a group's range, plus BF16 rounding of its scale and bias
        assert float(mx.abs(widened - original).max()) <= 0.02 * float(mx.abs(original).max())
    ours = q8.logits(TOKENS)
    assert np.isfinite(ours).all()
    theirs = mlx_lm_logits(lossy, TOKENS)  # mlx-lm reads the 8-bit tensors as we do
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * np.abs(ours).max())


def tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def test_tokenizer_files_are_copied_and_extra_folders_left_out(synthetic_checkpoint, tmp_path):
    source = Path(shutil.copytree(synthetic_checkpoint(**SHAPE), tmp_path / "src"))
    (source / "tokenizer.json").write_text('{"fake": true}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "original").mkdir()
    (source / "original" / "model.safetensors").write_bytes(b"not read")
    out = convert(source, tmp_path / "out", NUMPY, shard_bytes=300_000)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "generation_config.json").exists() and not (out / "original").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ours, theirs = mlx_oss.load(out).logits(TOKENS[:5]), mlx_oss.load(source).logits(TOKENS[:5])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_cli_converts_and_reports(source, tmp_path):
    before = tree_hash(source)
    done = run_cli("numpy", str(source), str(tmp_path / "np"))
    assert done.returncode == 0, done.stderr
    assert f"wrote the numpy layout of {source} to {tmp_path / 'np'}" in done.stdout
    assert "converting" in done.stderr and "100%" in done.stderr
    assert tree_hash(source) == before


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("not-gpt-oss", "field 'model_type' is 'llama'; this is not a gpt-oss checkpoint"),
        ("missing-shard", "shard listed in model.safetensors.index.json is missing"),
        ("no-directory", "no such model directory"),
        ("destination-exists", "already exists; remove it or choose another destination"),
        ("already-converted", "already in the numpy layout; convert from the Hugging Face checkpoint"),
        ("already-packed", "is packed already; convert from the checkpoint it came from"),
        ("q8-numpy", "--q8) is an option of the MLX layout only"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(breakage, message, synthetic_checkpoint, converted, tmp_path):
    source = Path(shutil.copytree(synthetic_checkpoint(**SHAPE, shard_bytes=300_000), tmp_path / "src"))
    destination = tmp_path / "out"
    target = ["numpy"]
    if breakage == "not-gpt-oss":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif breakage == "missing-shard":
        next(source.glob("model-00001-*.safetensors")).unlink()
    elif breakage == "no-directory":
        source = tmp_path / "nowhere"
    elif breakage == "destination-exists":
        destination.mkdir()
        (destination / "keep.txt").write_text("mine")
    elif breakage == "already-converted":
        source = converted(synthetic_checkpoint(**SHAPE, shard_bytes=300_000), NUMPY)
    elif breakage == "already-packed":
        source, target = converted(synthetic_checkpoint(**SHAPE, shard_bytes=300_000), PACKED), ["packed"]
    elif breakage == "q8-numpy":
        target = ["numpy", "--q8"]
    before = tree_hash(source) if source.exists() else {}
    done = run_cli(target[0], str(source), str(destination), *target[1:])
    if breakage == "q8-numpy":  # an option the numpy command does not have: argparse's own usage error
        assert done.returncode == 2 and "unrecognized arguments: --q8" in done.stderr
        return
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert message in done.stderr
    assert (tree_hash(source) if source.exists() else {}) == before
    if breakage == "destination-exists":
        assert os.listdir(destination) == ["keep.txt"]
    else:
        assert not destination.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_q8_for_numpy_is_refused_by_the_api(source, tmp_path):
    with pytest.raises(mlx_oss.MlxOssError, match=r"--q8\) is an option of the MLX layout only"):
        convert(source, tmp_path / "out", NUMPY, q8=True)


def test_not_enough_disk_space_is_refused_before_writing(source, tmp_path, monkeypatch):
    import mlx_oss.atomic

    real = shutil.disk_usage
    monkeypatch.setattr(mlx_oss.atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    with pytest.raises(mlx_oss.MlxOssError, match="not enough free disk space: need 0.00 GB, 0.00 GB free"):
        convert(source, tmp_path / "out", MLX)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("target", [NUMPY, MLX])
def test_interrupted_conversion_leaves_nothing_and_the_source_intact(target, synthetic_checkpoint, tmp_path):
    """A real conversion process receives SIGINT halfway: no destination, no temporary folder, same source."""
    # A small vocabulary keeps the disk use down (0.3 GB); 24 layers of 32 experts keep the conversion long enough.
    source = synthetic_checkpoint(
        num_hidden_layers=24, num_local_experts=32, hidden_size=512, intermediate_size=512, vocab_size=2000
    )
    before = tree_hash(source)
    destination = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_oss.converters", target, str(source), str(destination), "--shard-size", "20MB"],
        stderr=subprocess.PIPE,
        text=True,
    )
    while "%" not in (line := proc.stderr.readline()) or " 0%" in line:
        assert line, "the converter ended before it showed progress"
    proc.send_signal(signal.SIGINT)  # some shards are written, others not yet
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []
    assert tree_hash(source) == before


def test_auto_backend_follows_the_layout_and_says_why(source, converted):
    from mlx_oss.backend import is_apple_silicon

    hf = mlx_oss.load(source)
    assert hf.backend == ("mlx" if is_apple_silicon() else "numpy")
    assert hf.backend_reason.startswith("auto: ")
    assert mlx_oss.load(source, backend="numpy").backend_reason.startswith("as asked; ")  # and the NumPy path used


def test_a_layout_the_backend_cannot_read_is_refused_by_name(source, converted):
    need_backend("mlx")
    mlx_dir, numpy_dir = converted(source, MLX), converted(source, NUMPY)
    with pytest.raises(mlx_oss.CheckpointError, match="is in the mlx layout, which the numpy backend does not read"):
        mlx_oss.load(mlx_dir, backend="numpy")
    with pytest.raises(mlx_oss.CheckpointError, match="is in the numpy layout, which the mlx backend does not read"):
        mlx_oss.load(numpy_dir, backend="mlx")


def test_a_converted_directory_missing_a_tensor_is_refused_by_name(source, converted, tmp_path):
    need_backend("mlx")
    broken = Path(shutil.copytree(converted(source, MLX), tmp_path / "broken"))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.up_proj.scales"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mlx_oss.CheckpointError, match="tensor 'model.layers.1.mlp.experts.up_proj.scales' is missing"):
        mlx_oss.load(broken, backend="mlx")


def test_cancel_stops_a_conversion_and_leaves_nothing(synthetic_checkpoint, tmp_path):
    from mlx_oss.cancel import CancelToken

    source = synthetic_checkpoint(preset="tiny")
    cancel, written = CancelToken(), []

    def progress(count):
        written.append(count)
        if sum(written) > 5_000_000:
            cancel.cancel()

    with pytest.raises(mlx_oss.MlxOssError, match="cancelled; nothing was written"):
        convert(source, tmp_path / "out", NUMPY, on_bytes=progress, cancel=cancel)
    assert os.listdir(tmp_path) == []


def test_unquantized_experts_quantize_back_to_the_same_model(synthetic_checkpoint, tmp_path):
    """A checkpoint as transformers saves a dequantized gpt-oss: transformers reads its BF16 experts, our CLI
    quantizes them back to MXFP4, and the result is the MXFP4 model of the same seed, logit for logit."""
    import torch
    from transformers import GptOssForCausalLM

    from reference import assert_logits_match

    source = synthetic_checkpoint(**SHAPE, seed=5, unquantized=True)
    assert Checkpoint(source).layout == "unquantized"
    out = run_cli("mxfp4", str(source), str(tmp_path / "m"))
    assert out.returncode == 0 and "wrote the mxfp4 layout" in out.stdout, out.stderr
    result = mlx_oss.load(tmp_path / "m", backend="numpy")
    assert Checkpoint(tmp_path / "m").layout == "hf"
    original = mlx_oss.load(synthetic_checkpoint(**SHAPE, seed=5), backend="numpy")
    np.testing.assert_array_equal(result.logits(TOKENS), original.logits(TOKENS))
    reference = GptOssForCausalLM.from_pretrained(str(source), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = reference.eval()(torch.tensor(TOKENS)[None]).logits[0].numpy()
    assert_logits_match(result.logits(TOKENS), theirs)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"


def test_mxfp4_conversion_refuses_what_it_cannot_do(synthetic_checkpoint, source, tmp_path):
    unquantized = synthetic_checkpoint(**SHAPE, seed=5, unquantized=True)
    already = run_cli("mxfp4", str(source), str(tmp_path / "a"))
    assert already.returncode == 1 and "experts are MXFP4 already (the hf layout)" in already.stderr
    skipped = run_cli("numpy", str(unquantized), str(tmp_path / "b"))
    assert skipped.returncode == 1 and "quantize them first (python -m mlx_oss.converters mxfp4" in skipped.stderr
    assert "Traceback" not in already.stderr + skipped.stderr and os.listdir(tmp_path) == []


def test_a_nan_in_unquantized_experts_is_named_not_quantized(synthetic_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    source = Path(shutil.copytree(synthetic_checkpoint(**SHAPE, unquantized=True, single_file=True), tmp_path / "s"))
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.2.mlp.experts.down_proj"][3, 5, 7] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = run_cli("mxfp4", str(source), str(tmp_path / "out"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "'model.layers.2.mlp.experts.down_proj', expert 3: holds NaN or infinite weights" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["s"]


BIG_SYNTH = ["--layers", "24", "--hidden-size", "512", "--intermediate-size", "512", "--experts", "32"]


@pytest.mark.parametrize("command", ["synth", "numpy"])
def test_a_killed_converter_leaves_a_folder_the_next_run_removes(command, synthetic_checkpoint, tmp_path):
    """SIGKILL gives no chance to clean up: the hidden `.NAME.partial-PID` folder stays until the next conversion
    into the same folder, which finds its lock free and removes it."""
    destination = tmp_path / "out"
    if command == "synth":
        args = ["synth", str(destination), "--vocab-size", "2000", *BIG_SYNTH]
    else:
        source = synthetic_checkpoint(
            num_hidden_layers=24, num_local_experts=32, hidden_size=512, intermediate_size=512, vocab_size=2000
        )
        args = ["numpy", str(source), str(destination), "--shard-size", "20MB"]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_oss.converters", *args], stderr=subprocess.PIPE, text=True)
    leftover = tmp_path / f".out.partial-{proc.pid}"
    while "%" not in (line := proc.stderr.readline()) or " 0%" in line:
        assert line, "the converter ended before it showed progress"
    proc.kill()  # mid-write: some bytes are out, the rest not
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert leftover.is_dir() and any(leftover.iterdir())
    assert not destination.exists()

    if command == "synth":
        done = run_cli("synth", str(destination), "--vocab-size", "300", "--layers", "2")
    else:
        done = run_cli("numpy", str(synthetic_checkpoint(**SHAPE, seed=2)), str(destination))
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path) == ["out"]
    assert mlx_oss.load(destination, backend="numpy").logits([1, 2, 3]).shape[0] == 3


KEEP_WRITING = """
import sys, time
from mlx_oss.atomic import atomic_directory
with atomic_directory(sys.argv[1]) as folder:
    print(folder, flush=True)
    time.sleep(60)
"""


def test_leftovers_are_told_from_folders_in_use(tmp_path):
    """Only folders whose writer is gone are removed: a live writer holds its folder's lock; a folder just made
    by a live PID is not yet locked; links and files with such names are not ours."""
    from mlx_oss.atomic import atomic_directory

    writer = subprocess.Popen([sys.executable, "-c", KEEP_WRITING, str(tmp_path / "busy")], stdout=subprocess.PIPE)
    try:
        in_use = Path(writer.stdout.readline().decode().strip())
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = tmp_path / f".old.partial-{dead.stdout.strip()}"  # a PID that no longer runs
        (gone / "sub").mkdir(parents=True)
        (gone / "sub" / "model-00000-of-00001.safetensors").write_bytes(b"x" * 1000)
        reused = tmp_path / f".reused.partial-{writer.pid}"  # a live PID, its folder unlocked and old: reused PID
        reused.mkdir()
        os.utime(reused, (0, 0))
        fresh = tmp_path / f".fresh.partial-{writer.pid}"  # a live PID's folder, not locked yet
        fresh.mkdir()
        outside = tmp_path / "outside"
        outside.mkdir()
        (tmp_path / ".link.partial-1").symlink_to(outside)
        (tmp_path / ".file.partial-1").write_text("not a folder")

        with atomic_directory(tmp_path / "new") as folder:
            (folder / "config.json").write_text("{}")
        assert not gone.exists() and not reused.exists()
        assert in_use.is_dir() and fresh.is_dir() and outside.is_dir()
        assert (tmp_path / ".link.partial-1").is_symlink() and (tmp_path / ".file.partial-1").is_file()
        assert (tmp_path / "new" / "config.json").is_file()
    finally:
        writer.kill()
        writer.wait()

"""The memory estimate before a load: figures derived here from the architecture, the refusal and `--context auto`
of the real commands, and the app's fits / tight / does not fit."""

from __future__ import annotations

import math
import mmap
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.synthetic import preset_config, total_bytes
from mlx_oss import memory_estimate as me
from mlx_oss.layouts import expected_tensors

GiB = 1 << 30
SCREENS = Path("/work/helpers/screens")


@pytest.mark.parametrize("preset", ["20b", "120b"])
def test_kv_cache_of_the_real_shapes(preset):
    c = preset_config(preset)
    layers, full = c.num_hidden_layers, c.num_hidden_layers // 2  # gpt-oss alternates sliding and full layers
    kv_heads, head_dim = 8, 64
    float_position = 2 * kv_heads * head_dim * 4  # keys and values, float32: 4 KiB a layer
    q8_position = 2 * kv_heads * (head_dim + 4)  # int8 values and a float32 scale per head
    n = 131072
    # NumPy's float cache keeps every position of every layer; its int8 one bounds sliding layers to
    # window - 1 + 2048 rewind + up to 256 before it drops
    assert me.kv_cache_bytes(c, "numpy", n) == layers * n * float_position
    assert me.kv_cache_bytes(c, "numpy", n, kv_bits=16) == layers * n * float_position // 2  # float16
    assert me.kv_cache_bytes(c, "numpy", n, kv_bits=8) == (full * n + (layers - full) * 2431) * q8_position
    # MLX: full layers grow with the context, sliding ones hold window - 1 + 2048 rewind, in whole 256-steps
    sliding_held = math.ceil((128 - 1 + 2048 + 256) / 256) * 256
    assert me.kv_cache_bytes(c, "mlx", n, kv_bits=8) == (full * n + (layers - full) * sliding_held) * q8_position
    assert me.kv_cache_bytes(c, "mlx", n) == (full * n + (layers - full) * sliding_held) * float_position
    # the figure: the full-attention layers grow by about 49 KB a token in float32 (6.4 GB at 131k)
    if preset == "20b":
        assert full * float_position == 49152 and round(full * float_position * n / 1e9, 1) == 6.4


@pytest.mark.parametrize("preset", ["20b", "120b"])
def test_weights_mapped_and_private(preset):
    c = preset_config(preset)
    files = total_bytes(c)
    vectors = sum(
        math.prod(e.shape)
        for name, e in expected_tensors(c).items()
        if len(e.shape) == 1 or name.endswith("_bias")  # norms, sinks, biases (the experts' are [E, out])
    )
    embedding = 201088 * 2880 * 2  # BF16 rows, read only for the tokens seen: not resident on NumPy
    assert me.weight_bytes(c, "numpy", "hf", files) == (files - embedding, 4 * vectors)
    assert me.weight_bytes(c, "numpy", "numpy", files) == (files - embedding, 0)  # float32 vectors, mapped as is
    assert me.weight_bytes(c, "mlx", "hf", files) == (0, files + 4 * vectors)


def test_verdicts_of_the_20b_on_a_16_gib_machine():
    c = preset_config("20b")
    files = total_bytes(c)
    machine = me.MachineMemory(total=16 * GiB, available=15 * GiB)

    def status(backend, context, kv_bits=None):
        return me.verdict(me.estimate(c, backend, "hf", files, context, kv_bits), machine).status

    assert status("numpy", 4096) in (me.FITS, me.TIGHT)  # 12.8 GiB of weights: at best tight on 16 GiB
    assert status("numpy", 131072) == me.DOES_NOT_FIT  # 12 GiB of float32 cache on top
    assert status("mlx", 131072) == me.DOES_NOT_FIT
    longest = me.largest_context(c, "numpy", "hf", files, machine, accept=(me.FITS, me.TIGHT))
    assert 4096 <= longest < 131072 and longest % 1024 == 0
    assert status("numpy", longest) != me.DOES_NOT_FIT and status("numpy", longest + 1024) == me.DOES_NOT_FIT
    assert me.verdict(me.estimate(c, "numpy", "hf", files, 4096), me.MachineMemory(None, None)).status == me.UNKNOWN


def test_an_unreadable_memory_loads_with_a_caveat(tiny_checkpoint):
    files = me.read_model_files(tiny_checkpoint)
    check = me.check_context(files, "numpy", 4096, machine=me.MachineMemory(None, None))
    assert check.refusal is None and check.context == 4096 and "could not be read" in check.note


def run(module: str, *args: str, memory: str | None = None, stdin: str = "hi") -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop(me.MEMORY_ENV, None)
    if memory:
        env[me.MEMORY_ENV] = memory
    return subprocess.run(
        [sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("command", ["mlx_oss.chat", "mlx_oss.serve"])
def test_a_context_that_cannot_fit_is_one_line_before_loading(tiny_checkpoint, command):
    done = run(command, "--model", str(tiny_checkpoint), "--backend", "numpy", "--context", "100000", memory="250M")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "loading" not in done.stderr, done.stderr
    assert "--context 100000" in lines[0] and "does not fit in memory" in lines[0] and "250 MiB" in lines[0]
    fitting = int(lines[0].split("; --context ")[1].split()[0])
    files = me.read_model_files(tiny_checkpoint)
    machine = me.MachineMemory(250 << 20, 250 << 20)
    assert me.verdict(me.estimate(*files_args(files), fitting), machine).status != me.DOES_NOT_FIT
    assert me.verdict(me.estimate(*files_args(files), fitting + 1024), machine).status == me.DOES_NOT_FIT


def files_args(files):
    return files.config, "numpy", files.layout, files.file_bytes


def test_a_context_past_the_model_s_own_is_refused(tiny_checkpoint):
    done = run("mlx_oss.chat", "--model", str(tiny_checkpoint), "--context", "131073")
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "--context 131073 is longer than this model's 131072 tokens (max_position_embeddings)"
    )


def test_context_auto_takes_the_longest_that_fits(tiny_checkpoint):
    done = run("mlx_oss.models", "info", str(tiny_checkpoint), "--context", "auto", memory="250M")
    assert done.returncode == 0, done.stderr
    chosen = int(done.stdout.split("memory at ")[1].split()[0])
    files = me.read_model_files(tiny_checkpoint)
    machine = me.MachineMemory(250 << 20, 250 << 20)
    assert me.verdict(me.estimate(*files_args(files), chosen), machine).status == me.FITS
    assert me.verdict(me.estimate(*files_args(files), chosen + 1024), machine).status != me.FITS
    assert f"longest context that fits: {chosen}" in done.stdout
    answered = run(
        "mlx_oss.chat", "--model", str(tiny_checkpoint), "--backend", "numpy", "--context", "auto",
        "--temperature", "0", "--max-tokens", "2", memory="250M",
    )  # fmt: skip
    assert answered.returncode == 0, answered.stderr


def test_a_bad_memory_setting_is_named(tiny_checkpoint):
    done = run("mlx_oss.models", "info", str(tiny_checkpoint), memory="lots")
    assert done.returncode == 1 and "MLX_OSS_MEMORY='lots' is not an amount of memory" in done.stderr


# -- the app ------------------------------------------------------------------------------------------------------


def store_with(root: Path, name: str, checkpoint: Path) -> None:
    """A model as another Hugging Face tool leaves it in the hub cache: a snapshot that `refs/main` names."""
    folder = root / ("models--" + name.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(checkpoint, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_the_app_says_whether_a_model_fits(qtbot, tmp_path, monkeypatch, tiny_checkpoint):
    pytest.importorskip("PySide6")
    from mlx_oss.app.models_view import MEMORY_COLUMN, ModelsView
    from mlx_oss.app.settings import AppSettings
    from mlx_oss.app.settings_view import SettingsView
    from mlx_oss.store import ModelStore

    monkeypatch.setenv("MLX_OSS_APP_DIR", str(tmp_path / "app"))
    monkeypatch.setenv("MLX_OSS_MODELS", str(tmp_path / "store"))
    monkeypatch.setenv(me.MEMORY_ENV, "250M")
    store_with(tmp_path / "store", "openai/gpt-oss-tiny", tiny_checkpoint)
    models = ModelsView(ModelStore())
    qtbot.addWidget(models)
    models.resize(900, 300)
    models.set_context(8192, "numpy")
    assert models.table.item(0, MEMORY_COLUMN).text() == "fits at 8k"
    models.set_context(131072, "numpy")
    assert models.table.item(0, MEMORY_COLUMN).text() == "does not fit at 128k"
    assert "tokens fit" in models.table.item(0, MEMORY_COLUMN).toolTip()

    settings = SettingsView(AppSettings(model="openai/gpt-oss-tiny", backend="numpy"), ["openai/gpt-oss-tiny"])
    qtbot.addWidget(settings)
    settings.resize(900, 700)
    assert settings.context_fit.text().startswith("fits: needs about")
    settings.context.setValue(131072)
    assert settings.context_fit.text().startswith("does not fit: needs") and "of this computer's 250 MiB" in (
        settings.context_fit.text()
    )
    settings.model.setCurrentText(str(tmp_path / "nowhere"))
    assert settings.context_fit.text() == ""
    settings.model.setCurrentText("openai/gpt-oss-tiny")
    if SCREENS.is_dir() and os.environ.get("MLX_OSS_SCREENS"):  # the pictures for the report, when asked for
        models.set_context(65536, "numpy")
        models.table.selectRow(0)
        models.grab().save(str(SCREENS / "memory-models.png"))
        settings.context.setValue(100000)
        settings.grab().save(str(SCREENS / "memory-settings.png"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the mapping's resident size is read from /proc")
def test_map_out_lets_go_of_the_weights_and_map_in_brings_them_back(tiny_checkpoint):
    """The benchmark maps the weights out for llama-bench's turn (so that their pages may leave the page cache) and
    back in before its next round: a prompt would otherwise read the experts its untimed warm-up did not from the
    disk."""
    import psutil

    import mlx_oss

    model = mlx_oss.load(tiny_checkpoint, backend="numpy")

    def resident() -> int:
        return sum(m.rss for m in psutil.Process().memory_maps() if m.path.endswith(".safetensors"))

    loaded = resident()
    model.map_out()
    assert resident() < loaded / 4
    model.map_in()
    assert resident() >= 0.9 * loaded


def _mapping_flags(path: Path) -> list[tuple[int, int, set[str]]]:
    """(file offset, length, VmFlags) of each of this process's mappings of `path`, from /proc/self/smaps."""
    found, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            start, end = (int(a, 16) for a in fields[0].split("-"))
            current = (int(fields[2], 16), end - start) if fields[-1] == str(path) else None
        elif fields[0] == "VmFlags:" and current is not None:
            found.append((*current, set(fields[1:])))
    return found


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(), reason="no transparent huge pages (Linux)"
)
def test_the_weights_are_mapped_for_huge_pages(tiny_checkpoint):
    """Streamed weights read faster from 2 MB pages."""
    import mlx_oss

    checkpoint = mlx_oss.load(tiny_checkpoint, backend="numpy").checkpoint
    for shard in {file.path.resolve() for file in checkpoint.files.values()}:
        mappings = _mapping_flags(shard)
        assert mappings, f"{shard} is not mapped"
        assert all("hg" in flags for _, _, flags in mappings)


def _present_pages(start: int, end: int) -> int:
    """How many of this process's pages from address `start` to `end` are in memory (/proc/self/pagemap)."""
    first, last = start // mmap.PAGESIZE, (end - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux's /proc/self/pagemap")
def test_tokens_read_their_embedding_rows_without_mapping_them(tiny_checkpoint):
    """A token reads one row of the embedding: mapped, each row would stay resident with the pages around it, and
    a long session would end up with most of the table (1.16 GB in the 20b) counted in the process's memory."""
    import mlx_oss

    model = mlx_oss.load(tiny_checkpoint, backend="numpy")
    name = "model.embed_tokens.weight"
    embedding = model.checkpoint.raw(name)  # a view of the map: it touches no page
    vocab = embedding.shape[0]
    tokens = np.arange(0, vocab, vocab // 300)[:300]
    model.forward(tokens, model.new_cache())
    margin = 4 << 20  # the huge pages of the weights mapped on either side may reach into the table's ends
    start, end = embedding.ctypes.data + margin, embedding.ctypes.data + embedding.nbytes - margin
    assert end - start > 16 << 20
    assert _present_pages(start, end) == 0
    np.testing.assert_array_equal(model.checkpoint.read_rows(name, tokens), embedding[tokens])


ALLOCATIONS = """
import resource, sys
import numpy as np
from mlx_oss.cpu.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
np.ones(8 << 18, np.float32)  # 8 MB, once, so that the heap has grown to it
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(8 << 18, np.float32)  # allocated, touched and freed, as a prompt's scratch arrays are
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator is what is tuned"
)
def test_freed_scratch_memory_is_served_again_without_page_faults():
    """20 allocations of 8 MB in turn: without the tuning each maps fresh pages and faults them all in (2048 pages
    of 4 KB, fewer with huge pages, still more than a few); with it, they come back from the heap already there."""

    def faults(mode: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", ALLOCATIONS, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        kept, count = done.stdout.split()
        return kept, int(count)

    kept, count = faults("keep")
    assert kept == "True" and count < 100
    kept, count = faults("default")
    assert kept == "None" and count >= 20 * 4  # at least a few pages for each 8 MB allocation

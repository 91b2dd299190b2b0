"""The prompt cache: reuse across interleaved conversations gives what a fresh prefill gives, on both backends;
states saved on disk survive a restart (a real new process) and are never trusted when damaged, foreign or of a
changed model; budgets evict the least recently used; a disk that refuses writes costs a cold prefill at most."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_variant
from harmony_helpers import TokenCache

import mlx_oss.engine as engine_module
from mlx_oss.engine import Done, Engine, SamplingParams
from mlx_oss.harmony import Conversation, Message, render_prompt
from mlx_oss.prompt_cache import MemoryPromptCache, PromptCacheSettings
from mlx_oss.prompt_cache_disk import DiskPromptCache, model_identity

GREEDY = SamplingParams(temperature=0, max_tokens=4)
SYSTEM = "You are a coding agent. " + " ".join(f"Rule {i}: read file {i} before editing it." for i in range(12))


def prompt(user: str, *earlier: Message, system: str = SYSTEM) -> list[int]:
    messages = [*earlier, Message.user(user)]
    return render_prompt(Conversation(messages, instructions=system, current_date="2026-11-25"))


def turn(engine: Engine, tokens: list[int]) -> Done:
    events = list(engine.generate(tokens, GREEDY))
    assert isinstance(events[-1], Done)
    return events[-1]


@pytest.fixture(scope="module", params=["numpy", "mlx"])
def tiny(request, tiny_checkpoint):
    return load_variant(tiny_checkpoint, request.param)


def fresh(model, tokens: list[int]) -> Done:
    """The turn from an engine that has nothing cached."""
    return turn(Engine(model, prompt_cache=PromptCacheSettings(memory_bytes=0, disk_bytes=0)), tokens)


def test_interleaved_conversations_reuse_their_prefixes_and_give_a_fresh_prefill_s_tokens(tiny):
    engine = Engine(tiny)  # memory only: the engine's default
    a1 = prompt("List the files.")
    b1 = prompt("What does main.py do?")
    title = prompt("Write a title for: list the files.", system="You write titles.")
    first_a = turn(engine, a1)
    a2 = prompt("And the tests?", Message.user("List the files."), *first_a.messages)
    calls = [(a1, first_a), (b1, turn(engine, b1)), (title, turn(engine, title)), (a2, turn(engine, a2))]
    calls.append((b1, turn(engine, b1)))
    for tokens, done in calls:
        expected = fresh(tiny, tokens)
        assert done.tokens == expected.tokens
    shared_system = next(i for i, (x, y) in enumerate(zip(a1, b1, strict=False)) if x != y)
    _, b_again = calls[-1]
    assert b_again.stats.reused_tokens == len(b1) - 1 > shared_system  # B's own prefix, kept while A ran
    assert b_again.stats.reused_from == "memory"
    _, a_second = calls[3]
    assert a_second.stats.reused_tokens > len(a1) - 5  # A's first turn, kept while B and the title ran
    assert len(engine.memory) >= 2


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_8_bit_caches_are_reused_in_memory_and_never_written_to_disk(backend, tiny_checkpoint, tmp_path):
    """`--kv-bits 8` caches offer no state to save: the engine keeps them in memory only, reuse still gives a fresh
    prefill's tokens, and a disk cache asked for stays empty (no error, no warning per turn)."""
    model = load_variant(tiny_checkpoint, backend)
    model.kv_bits = 8
    folder = tmp_path / "prompt-cache"
    engine = Engine(model, prompt_cache=PromptCacheSettings(disk_bytes=1 << 30, disk_dir=folder))
    a, b = prompt("List the files. " * 80), prompt("What does main.py do?")
    first_a, _, again_a = turn(engine, a), turn(engine, b), turn(engine, a)
    fresh_a = turn(Engine(model, prompt_cache=PromptCacheSettings(memory_bytes=0, disk_bytes=0)), a)
    assert first_a.tokens == again_a.tokens == fresh_a.tokens
    assert again_a.stats.reused_tokens == len(a) - 1 and again_a.stats.reused_from == "memory"
    assert engine.disk is None and not any(folder.rglob("*.safetensors"))


def test_reused_logits_are_those_of_a_fresh_prefill(tiny):
    engine = Engine(tiny)
    a, b = prompt("One."), prompt("Two.")
    turn(engine, a)
    turn(engine, b)
    done = turn(engine, a)
    assert done.stats.reused_tokens == len(a) - 1
    decoder_logits = tiny.forward(a, engine.model.new_cache(), last_only=True)[-1]
    kept = engine.memory.lookup(a, len(a) - 1)
    assert kept is not None
    cache = kept[1].copy()
    cache.truncate(len(a) - 1)
    reused_logits = tiny.forward(a[-1:], cache, last_only=True)[-1]
    np.testing.assert_allclose(reused_logits, decoder_logits, rtol=1e-4, atol=1e-4 * np.abs(decoder_logits).max())


def test_an_mlx_cache_that_keeps_less_than_the_shared_prefix_still_gives_a_fresh_prefill_s_tokens(tiny_checkpoint):
    pytest.importorskip("mlx.core")
    from mlx_oss.mlx_backend.kv_cache import KVCache

    model = load_variant(tiny_checkpoint, "mlx")
    c = model.config
    windows = [c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)]
    model.new_cache = lambda: KVCache(windows, rewind=3, step=4)  # sliding layers drop what is 3 past the window
    engine = Engine(model)
    a, b, a2 = prompt("One."), prompt("Two, and a longer question."), prompt("One, and then a few more words.")
    calls = (a, b, a2, b)
    dones = [turn(engine, tokens) for tokens in calls]
    for tokens, done in zip(calls, dones, strict=True):
        assert done.tokens == fresh(model, tokens).tokens
    shared = next(i for i, (x, y) in enumerate(zip(a, a2, strict=False)) if x != y)
    assert dones[2].stats.reused_tokens < shared  # a's kept copy could not go back that far: run from what it kept


def test_the_memory_budget_evicts_the_least_recently_used():
    def cache(n):
        c = TokenCache()
        c.tokens = list(range(n))
        return c

    memory = MemoryPromptCache(budget=8 * 25)
    memory.put([1] * 10, cache(10))
    memory.put([2] * 10, cache(10))
    assert memory.lookup([1] * 10 + [5], 10)[2] == 10  # used: [2]*10 is now the least recent
    memory.put([3] * 10, cache(10))
    assert memory.lookup([2] * 5, 5) is None and len(memory) == 2 and memory.nbytes() <= memory.budget
    assert memory.lookup([1, 1], 2) and memory.lookup([3, 3], 2)
    assert not memory.put([4] * 30, cache(30))  # larger than the whole budget
    memory.put([1] * 12, cache(12))  # serves every prompt [1]*10 served
    assert len(memory) == 2 and memory.lookup([1] * 20, 19)[2] == 12
    assert not memory.put([1] * 5, cache(5))


# On disk


@pytest.fixture()
def model_dir(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint that a test may change."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


def disk_engine(model, folder: Path, **settings) -> Engine:
    return Engine(model, prompt_cache=PromptCacheSettings(disk_dir=folder, **settings))


def long_prompt(user: str = "Start.") -> list[int]:
    system = SYSTEM + " ".join(f"Note {i}: keep line {i} short." for i in range(140))
    tokens = prompt(user, system=system)
    assert len(tokens) > engine_module.DISK_PREFILLED
    return tokens


RUN = """
import json, sys
from pathlib import Path
import mlx_oss
from mlx_oss.engine import Engine, SamplingParams
from mlx_oss.prompt_cache import PromptCacheSettings
model = mlx_oss.load(sys.argv[1], backend=sys.argv[2])
engine = Engine(model, prompt_cache=PromptCacheSettings(disk_dir=Path(sys.argv[3])))
tokens = json.loads(sys.stdin.read())
done = list(engine.generate(tokens, SamplingParams(temperature=0, max_tokens=4)))[-1]
engine.flush()
print(json.dumps([done.tokens, done.stats.reused_tokens, done.stats.reused_from]))
"""


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_a_saved_prompt_is_loaded_by_a_new_process(backend, tiny_checkpoint, tmp_path):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    tokens = long_prompt()
    folder = tmp_path / "prompt-cache"

    def run() -> tuple[list[int], int, str]:
        out = subprocess.run(
            [sys.executable, "-c", RUN, str(tiny_checkpoint), backend, str(folder)],
            input=json.dumps(tokens),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    cold, reused, _ = run()
    assert reused == 0 and list(folder.glob("*/*.safetensors"))
    warm, reused, source = run()
    assert warm == cold and reused == len(tokens) - 1 and source == "disk"


def saved_entry(model, folder: Path) -> tuple[list[int], Done, Path]:
    engine = disk_engine(model, folder)
    tokens = long_prompt()
    done = turn(engine, tokens)
    engine.flush()
    (entry,) = folder.glob("*/*.safetensors")
    return tokens, done, entry


def damage_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))


def damage_the_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b"mlx-oss-prompt-cache/1", b"mlx-oss-prompt-cache/9"))


def damage_the_tokens_file(path: Path) -> None:
    tokens_file = path.with_suffix(".tokens")
    raw = bytearray(tokens_file.read_bytes())
    raw[8] ^= 1
    tokens_file.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [damage_truncated, damage_a_data_byte, damage_the_header, damage_the_tokens_file])
def test_a_damaged_entry_is_removed_and_the_prompt_prefilled(damage, model_dir, tmp_path, caplog):
    import mlx_oss

    model = mlx_oss.load(model_dir, backend="numpy")
    folder = tmp_path / "prompt-cache"
    tokens, cold, entry = saved_entry(model, folder)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="mlx_oss"):
        done = turn(disk_engine(model, folder), tokens)
    assert done.tokens == cold.tokens and done.stats.reused_tokens == 0
    assert not entry.exists() and not entry.with_suffix(".tokens").exists()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "prompt cache" in warnings[0].getMessage() and not warnings[0].exc_info


def test_a_model_changed_under_the_same_folder_does_not_use_the_old_states(model_dir, tmp_path, caplog):
    import mlx_oss

    folder = tmp_path / "prompt-cache"
    model = mlx_oss.load(model_dir, backend="numpy")
    before = model_identity(model)
    tokens, _, entry = saved_entry(model, folder)
    shard = next(model_dir.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())  # other weights, same name and size
    data[-64:] = bytes(64)
    shard.write_bytes(bytes(data))
    changed = mlx_oss.load(model_dir, backend="numpy")
    assert model_identity(changed) != before
    expected = fresh(changed, tokens)
    # the old model's entry, moved where the changed model looks: its header names the other model
    new_folder = folder / model_identity(changed)[:32]
    new_folder.mkdir()
    key = DiskPromptCache(folder, model_identity(changed), 1 << 30).key(tokens)
    shutil.copy(entry, new_folder / f"{key}.safetensors")
    (new_folder / f"{key}.tokens").write_bytes(np.asarray(tokens, "<i4").tobytes())
    with caplog.at_level(logging.WARNING, logger="mlx_oss"):
        done = turn(disk_engine(changed, folder), tokens)
    assert done.tokens == expected.tokens and done.stats.reused_tokens == 0
    assert not (new_folder / f"{key}.safetensors").exists()
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1


def test_a_failing_write_warns_once_and_generation_goes_on(model_dir, tmp_path, caplog, monkeypatch):
    import mlx_oss.prompt_cache_disk as disk_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_module, "write_safetensors", full)
    import mlx_oss

    model = mlx_oss.load(model_dir, backend="numpy")
    folder = tmp_path / "prompt-cache"
    engine = disk_engine(model, folder)
    with caplog.at_level(logging.WARNING, logger="mlx_oss"):
        first = turn(engine, long_prompt())
        engine.flush()
        second = turn(engine, long_prompt("Again."))
        engine.flush()
    assert first.tokens == fresh(model, long_prompt()).tokens and second.stop_reason
    assert not engine.disk.writable and not list(folder.glob("*/*.safetensors"))
    assert not list(folder.glob("*/.*.tmp"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0]


def test_a_read_only_folder_warns_once(model_dir, tmp_path, caplog):
    import mlx_oss

    model = mlx_oss.load(model_dir, backend="numpy")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    engine = disk_engine(model, blocker / "prompt-cache")  # cannot be made, as in a read-only parent
    with caplog.at_level(logging.WARNING, logger="mlx_oss"):
        done = turn(engine, long_prompt())
        engine.flush()
    assert done.stop_reason and not engine.disk.writable
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1


def test_a_folder_that_is_not_ours_is_left_alone(model_dir, tmp_path, caplog):
    import mlx_oss

    model = mlx_oss.load(model_dir, backend="numpy")
    folder = tmp_path / "someone-elses"
    folder.mkdir()
    (folder / "thesis.txt").write_text("keep me")
    engine = disk_engine(model, folder)
    with caplog.at_level(logging.WARNING, logger="mlx_oss"):
        turn(engine, long_prompt())
        engine.flush()
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1


def test_a_state_larger_than_the_disk_budget_is_not_written(model_dir, tmp_path, caplog):
    import mlx_oss

    model = mlx_oss.load(model_dir, backend="numpy")
    folder = tmp_path / "prompt-cache"
    engine = disk_engine(model, folder, disk_bytes=1000)
    with caplog.at_level(logging.WARNING, logger="mlx_oss"):
        turn(engine, long_prompt())
        engine.flush()
    assert not list(folder.glob("*/*.safetensors")) and engine.disk.writable
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def states(model, count: int) -> list[tuple[list[int], object]]:
    out = []
    for i in range(count):
        tokens = [int(t) for t in np.random.default_rng(i).integers(0, 1000, 40)]
        cache = model.new_cache()
        model.forward(tokens, cache)
        out.append((tokens, cache.state()))
    return out


def test_the_disk_budget_evicts_the_least_recently_used(model_dir, tmp_path):
    import mlx_oss

    model = mlx_oss.load(model_dir, backend="numpy")
    (a, sa), (b, sb), (c, sc) = states(model, 3)
    one = sa.nbytes() + 40 * 4 + 4096  # a state, its tokens and the file's header
    disk = DiskPromptCache(tmp_path / "pc", model_identity(model), budget=2 * one)
    assert disk.save(a, sa) and disk.save(b, sb)
    os.utime(disk.folder / f"{disk.key(a)}.tokens", (1, 1))
    os.utime(disk.folder / f"{disk.key(b)}.tokens", (2, 2))
    assert disk.load(disk.key(a), a) is not None  # a used last: b goes first
    assert disk.save(c, sc)
    assert disk.lookup(b, len(b)) is None or disk.lookup(b, len(b))[2] < len(b)
    assert disk.lookup(a, len(a))[1] == tuple(a) and disk.lookup(c, len(c))[1] == tuple(c)
    restored = model.restore_cache(disk.load(disk.key(c), c))
    assert restored.length == len(c)


WRITER = """
import sys
from pathlib import Path
import numpy as np
from mlx_oss.backend import CacheState
from mlx_oss.prompt_cache_disk import TOKENS, DiskPromptCache
rng = np.random.default_rng(5)
arrays = {n: rng.standard_normal((2, 16, 300)).astype(np.float32) for n in ("k.0", "v.0")}
state = CacheState("numpy-f32/1", 300, arrays)
tokens = tuple(range(300))
disk = DiskPromptCache(Path(sys.argv[1]), "ab" * 32, 1 << 30)
disk.save(tokens, state)
for _ in range(int(sys.argv[2])):  # the write itself, again and again, as two processes finishing the same prompt
    disk._write(tokens, {**arrays, TOKENS: np.asarray(tokens, np.int32)}, state)
"""


MODEL_X = "ab" * 32


def test_two_processes_writing_the_same_entry_leave_one_whole_file(tmp_path):
    root = tmp_path / "pc"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), "8"]) for _ in range(2)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    reader = DiskPromptCache(root, MODEL_X, 1 << 30)
    tokens = list(range(300))
    loaded = reader.load(reader.key(tokens), tokens)
    rng = np.random.default_rng(5)
    assert loaded is not None and loaded.length == 300
    for name in ("k.0", "v.0"):
        np.testing.assert_array_equal(loaded.arrays[name], rng.standard_normal((2, 16, 300)).astype(np.float32))
    assert [p.name for p in reader.folder.iterdir() if p.suffix == ".safetensors"] == [
        f"{reader.key(tokens)}.safetensors"
    ]
    assert not list(reader.folder.glob(".*.tmp"))


def test_the_command_lines_take_the_budgets_and_refuse_a_negative_one(capsys):
    from mlx_oss import chat, serve
    from mlx_oss.prompt_cache import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES, GIB

    for parser in (chat.build_parser(), serve.build_parser()):
        default = PromptCacheSettings.from_args(parser.parse_args(["--model", "m"]))
        assert (default.memory_bytes, default.disk_bytes) == (DEFAULT_MEMORY_BYTES, DEFAULT_DISK_BYTES)
        args = parser.parse_args(["--model", "m", "--prompt-cache-gb", "0.5", "--disk-cache-gb", "3"])
        settings = PromptCacheSettings.from_args(args)
        assert (settings.memory_bytes, settings.disk_bytes) == (GIB // 2, 3 * GIB)
        off = PromptCacheSettings.from_args(parser.parse_args(["--model", "m", "--no-disk-cache"]))
        assert off.disk_folder() is None
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--disk-cache-gb", "-1"])
        assert "--disk-cache-gb" in capsys.readouterr().err

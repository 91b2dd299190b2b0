"""The model store and downloads, against a real HTTP server on 127.0.0.1 standing in for the hub."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import kernels_switched_off
from fakehub import FakeHub

import mlx_oss
from mlx_oss import hub
from mlx_oss.cancel import CancelToken
from mlx_oss.engine import Engine, SamplingParams
from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import Conversation, Message, render_prompt
from mlx_oss.hub import DownloadCancelled, HubError, download
from mlx_oss.store import ModelStore, resolve_model

NAME = "openai/gpt-oss-tiny"
BIG = "model-00000-of-00002.safetensors"  # the embedding's shard: the largest file


@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model as the hub holds gpt-oss: shards and index at the top, tokenizer and chat template files,
    and the `original/` and `metal/` copies that must not be fetched."""
    from mlx_oss.converters.synthetic import SynthOptions, preset_config, write_synthetic

    folder = tmp_path_factory.mktemp("hub") / "repo"
    write_synthetic(folder, preset_config("tiny"), SynthOptions(shard_bytes=26_000_000))
    (folder / "tokenizer.json").write_text('{"model": "stand-in"}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "original").mkdir()
    shutil.copy(folder / "config.json", folder / "original" / "config.json")
    (folder / "original" / "model.safetensors").write_bytes(os.urandom(1_000_000))
    (folder / "metal").mkdir()
    (folder / "metal" / "model.bin").write_bytes(os.urandom(1_000_000))
    assert (folder / BIG).stat().st_size > 20_000_000
    return folder


@pytest.fixture
def fake_hub(repo, monkeypatch):
    with FakeHub() as server:
        server.add_repo(NAME, repo)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(hub, "RETRY_DELAY_S", 0.0)
        yield server


@pytest.fixture
def store(tmp_path, monkeypatch) -> ModelStore:
    monkeypatch.setenv("MLX_OSS_MODELS", str(tmp_path / "store"))
    return ModelStore()


def fetched(server: FakeHub) -> list[str]:
    return [r.path for r in server.requests if r.method == "GET" and "/resolve/" in r.path]


def greedy_tokens(model_dir: Path, count: int = 4) -> list[int]:
    engine = Engine(mlx_oss.load(model_dir, backend="numpy"))
    prompt = render_prompt(Conversation([Message.user("Hello")], current_date="2026-11-25"))
    *_, done = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=count))
    return done.tokens


def test_download_loads_and_generates_like_the_source(fake_hub, store, repo):
    seen = []
    path = download(NAME, store, on_progress=seen.append)
    assert path == store.folder(NAME) / "snapshots" / fake_hub.repo(NAME).commit
    names = sorted(p.name for p in path.iterdir())
    assert "tokenizer.json" in names and "chat_template.jinja" in names and BIG in names
    assert not (path / "original").exists() and not (path / "metal").exists()
    assert not any("/original/" in p or "/metal/" in p for p in fetched(fake_hub))
    assert (path / BIG).is_symlink()  # the hub cache's own layout: snapshot links into blobs/
    total = sum(p.stat().st_size for p in path.iterdir())
    assert seen and seen[-1].done_bytes == seen[-1].total_bytes == total and seen[-1].bytes_per_s > 0
    assert store.get(NAME).downloaded
    assert resolve_model(NAME) == path
    assert greedy_tokens(path) == greedy_tokens(repo)

    fake_hub.reset_stats()
    assert download(NAME, store) == path  # already here: one metadata request, no file
    assert fetched(fake_hub) == [] and len(fake_hub.requests) == 1


def test_a_dropped_connection_is_resumed_within_the_run(fake_hub, store):
    size = (fake_hub.repo(NAME).folder / BIG).stat().st_size
    cut = size // 3
    fake_hub.cut(NAME, BIG, at_byte=cut, times=1)
    path = download(NAME, store)
    first, second = [r for r in fake_hub.requests if r.path.endswith(BIG) and r.method == "GET"]
    assert first.range is None and first.body_bytes == cut
    kept = int(second.range.removeprefix("bytes=").removesuffix("-"))  # what arrived before the drop
    assert 0 < kept <= cut and second.body_bytes == size - kept  # only the rest was asked for
    assert (path / BIG).read_bytes() == (fake_hub.repo(NAME).folder / BIG).read_bytes()


def test_an_interrupted_download_resumes_in_the_next_run(fake_hub, store, monkeypatch):
    monkeypatch.setattr(hub, "RETRIES", 1)
    size = (fake_hub.repo(NAME).folder / BIG).stat().st_size
    fake_hub.cut(NAME, BIG, at_byte=size // 2, times=None)
    with pytest.raises(HubError, match=f"{BIG}: the connection dropped mid-file .*run the download again to resume"):
        download(NAME, store)
    assert not store.get(NAME).downloaded and store.get(NAME).partial
    kept = (store.folder(NAME) / "blobs" / f"{fake_hub.repo(NAME).files[BIG].sha256}.incomplete").stat().st_size
    assert 0 < kept <= size // 2
    fake_hub.clear_faults()
    fake_hub.reset_stats()
    path = download(NAME, store)
    assert fake_hub.bytes_sent(NAME, BIG) == size - kept  # fewer bytes the second time
    assert (path / BIG).read_bytes() == (fake_hub.repo(NAME).folder / BIG).read_bytes()


def test_cancel_keeps_what_arrived_for_the_next_run(fake_hub, store):
    cancel = CancelToken()
    fake_hub.throttle(0.002)

    def stop_midway(p):
        if p.done_bytes > 5_000_000:
            cancel.cancel()

    with pytest.raises(DownloadCancelled, match="run it again to resume"):
        download(NAME, store, on_progress=stop_midway, cancel=cancel)
    sent = sum(fake_hub.bytes_sent(NAME, f) for f in fake_hub.repo(NAME).files)
    fake_hub.clear_faults()
    fake_hub.reset_stats()
    download(NAME, store)
    total = sum(f.size for f in fake_hub.repo(NAME).files.values() if hub.wanted(f.path))
    again = sum(fake_hub.bytes_sent(NAME, f) for f in fake_hub.repo(NAME).files)
    assert again < total and again + sent >= total


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (dict(path_glob="/api/models/*", status=404), "no such model on the hub"),
        (dict(path_glob="/api/models/*", status=500), "the hub answered 500 Internal Server Error"),
        (dict(path_glob=f"*/resolve/*/{BIG}", status=500, methods={"GET"}), f"{BIG}: the hub answered 500"),
        (dict(path_glob=f"*/resolve/*/{BIG}", status=404, methods={"GET"}), "lists this file but does not serve"),
    ],
)
def test_hub_errors_are_named(fault, message, fake_hub, store):
    fake_hub.fail(**fault)
    with pytest.raises(HubError, match=message):
        download(NAME, store)
    assert not store.get(NAME).downloaded


def test_a_corrupted_file_is_detected_and_removed(fake_hub, store, tmp_path):
    served = fake_hub.repo(NAME).folder / BIG
    original = served.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0xFF  # same size, one byte flipped in transit
        served.write_bytes(bytes(corrupted))
        with pytest.raises(HubError, match=f"{BIG} arrived corrupted .*it was removed: run the download again"):
            download(NAME, store)
    finally:
        served.write_bytes(original)
    blobs = store.folder(NAME) / "blobs"
    assert not any(p.name.startswith(fake_hub.repo(NAME).files[BIG].sha256) for p in blobs.iterdir())
    assert not store.get(NAME).downloaded
    download(NAME, store)
    assert store.get(NAME).downloaded


def test_not_enough_disk_space_is_refused_before_the_first_byte(fake_hub, store, monkeypatch):
    import mlx_oss.atomic

    real = shutil.disk_usage
    monkeypatch.setattr(mlx_oss.atomic.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000_000))
    with pytest.raises(MlxOssError, match=r"not enough free disk space: need 0\.05 GB, 0\.01 GB free"):
        download(NAME, store)
    assert fetched(fake_hub) == []


def test_a_small_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from mlx_oss.atomic import write_atomically

    path = tmp_path / "record.json"
    write_atomically(path, "old\n")
    write_atomically(path, b"new\n")
    assert path.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["record.json"]

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, "newer\n")
    assert path.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["record.json"]


def test_an_unreachable_hub_is_one_clear_message(store, monkeypatch):
    with FakeHub() as server:
        url = server.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
    with pytest.raises(HubError, match=f"cannot reach the hub at {url} .*models already on this computer need none"):
        download(NAME, store)


def test_offline_a_downloaded_model_loads_without_the_hub(fake_hub, store, monkeypatch):
    path = download(NAME, store)
    fake_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download(NAME, store) == path
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    chat = [sys.executable, "-m", "mlx_oss.chat", "--model", NAME, "--max-tokens", "3", "--temperature", "0"]
    out = subprocess.run(chat, input="Hi\n", capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "3 tokens" in out.stderr
    with pytest.raises(HubError, match="not on this computer and HF_HUB_OFFLINE is set"):
        download("openai/other", store)


def run_models(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_oss.models", *args], capture_output=True, text=True, timeout=300, **kwargs
    )


def test_models_command_line(fake_hub, store):
    out = run_models("list")
    assert out.returncode == 0 and "no models in" in out.stdout and "download openai/gpt-oss-20b" in out.stdout

    out = run_models("download", NAME)
    assert out.returncode == 0, out.stderr
    total = sum(f.size for f in fake_hub.repo(NAME).files.values() if hub.wanted(f.path))
    assert f"downloading {NAME}: 100% ({total / 1e6:.1f} MB of {total / 1e6:.1f} MB, " in out.stderr
    assert out.stderr.rstrip().endswith("MB/s)")
    assert f"{NAME} is in {store.folder(NAME)}" in out.stdout

    out = run_models("convert", NAME, "--to", "numpy")
    assert out.returncode == 0, out.stderr
    assert (store.converted(NAME, "numpy") / "config.json").is_file()
    # the layout the backend reads fastest: BF16 as downloaded for the kernels, float32 for plain NumPy
    from mlx_oss.cpu import kernels

    fastest = store.get(NAME).layouts["hf"] if kernels.available() else store.converted(NAME, "numpy")
    assert resolve_model(NAME, "numpy") == fastest
    with kernels_switched_off():
        assert resolve_model(NAME, "numpy") == store.converted(NAME, "numpy")
    assert resolve_model(NAME, "mlx") == store.get(NAME).layouts["hf"]

    # with the kernels, the packed layout once there is one (a decoded token reads less), else still the download
    out = run_models("convert", NAME, "--to", "packed")
    assert out.returncode == 0, out.stderr
    assert resolve_model(NAME, "numpy") == (store.converted(NAME, "packed") if kernels.available() else fastest)
    with kernels_switched_off():
        assert resolve_model(NAME, "numpy") == store.converted(NAME, "numpy")
    out = run_models("delete", NAME, "--layout", "packed", "--yes")
    assert out.returncode == 0 and "packed" not in store.get(NAME).layouts

    out = run_models("list")
    assert out.returncode == 0
    row = next(line for line in out.stdout.splitlines() if line.startswith(NAME))
    assert "hf, numpy" in row and "GB" in row

    out = run_models("info", NAME)
    assert out.returncode == 0 and "parameters, 4 layers, 8 experts (4 per token)" in out.stdout
    assert str(store.converted(NAME, "numpy")) in out.stdout

    out = run_models("delete", NAME, "--layout", "numpy", stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "needs --yes" in out.stderr
    assert store.converted(NAME, "numpy").exists()
    out = run_models("delete", NAME, "--layout", "numpy", "--yes")
    assert out.returncode == 0 and not store.converted(NAME, "numpy").exists() and store.get(NAME).downloaded
    out = run_models("delete", NAME, "--yes")
    assert out.returncode == 0 and not store.folder(NAME).exists()

    out = run_models("info", "openai/nothing")
    assert (
        out.returncode == 1 and "is not on this computer; get it with" in out.stderr and "Traceback" not in out.stderr
    )
    out = run_models("download", "openai/nothing")
    assert out.returncode == 1 and out.stderr.strip().endswith(
        "no such model on the hub (" + fake_hub.url + "), or it is private or gated"
    )


def test_ctrl_c_stops_a_download_and_the_same_command_resumes(fake_hub, store):
    fake_hub.throttle(0.004)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_oss.models", "download", NAME], stderr=subprocess.PIPE, text=True
    )
    while "%" not in (line := proc.stderr.readline()) or " 0%" in line:
        assert line, "the download ended before it showed progress"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"download of {NAME} interrupted; run the same command to resume" in err and "Traceback" not in err
    first = sum(fake_hub.bytes_sent(NAME, f) for f in fake_hub.repo(NAME).files)
    fake_hub.clear_faults()
    fake_hub.reset_stats()
    out = run_models("download", NAME)
    assert out.returncode == 0, out.stderr
    total = sum(f.size for f in fake_hub.repo(NAME).files.values() if hub.wanted(f.path))
    assert sum(fake_hub.bytes_sent(NAME, f) for f in fake_hub.repo(NAME).files) < total <= first + total
    assert json.loads((store.folder(NAME) / "mlx-oss" / "verified.json").read_text())["revision"] == (
        fake_hub.repo(NAME).commit
    )
    np.testing.assert_array_equal(
        mlx_oss.load(resolve_model(NAME)).logits([1, 2, 3]), mlx_oss.load(fake_hub.repo(NAME).folder).logits([1, 2, 3])
    )


def test_chat_offers_to_download_a_missing_model(fake_hub, store):
    import pexpect

    chat = [sys.executable, "-m", "mlx_oss.chat", "--model", NAME, "--max-tokens", "2"]
    child = pexpect.spawn(chat[0], chat[1:], env=dict(os.environ), encoding="utf-8", timeout=120)
    try:
        child.expect_exact(f"{NAME} is not on this computer. Download it from the hub now? [y/N] ")
        child.sendline("y")
        child.expect(f"downloading {NAME}: 100%")
        child.expect(r"mlx-oss chat: \S+ \(")
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and store.get(NAME).downloaded

    child = pexpect.spawn(chat[0], [*chat[1:4], "openai/absent"], env=dict(os.environ), encoding="utf-8", timeout=60)
    try:
        child.expect_exact("Download it from the hub now? [y/N] ")
        child.sendline("n")
        child.expect_exact("openai/absent is not on this computer; get it with: python -m mlx_oss.models download")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1


def test_a_model_fetched_by_huggingface_hub_itself_is_found(fake_hub, store, monkeypatch):
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        NAME, cache_dir=store.root, endpoint=fake_hub.url, allow_patterns=["*.json", "*.safetensors"]
    )
    stored = store.get(NAME)
    assert stored.downloaded and stored.layouts["hf"] == Path(path)
    assert resolve_model(NAME) == Path(path)
    fetched_before = len(fetched(fake_hub))
    missing = {f for f in fake_hub.repo(NAME).files if hub.wanted(f) and not (Path(path) / f).exists()}
    assert download(NAME, store) == Path(path)  # only what that tool left out is fetched
    assert {p.rsplit("/", 1)[1] for p in fetched(fake_hub)[fetched_before:]} == missing
    assert store.get(NAME).revision == fake_hub.repo(NAME).commit  # and now it is verified


def test_a_downloaded_fine_tune_with_unquantized_experts_is_quantized_in_the_store(store, synthetic_checkpoint):
    """A hub repo whose experts transformers saved as BF16: nothing runs it until `convert --to mxfp4`, which then
    stands in for the download everywhere (loading, further conversions)."""
    shape = dict(vocab_size=1000, num_hidden_layers=2, seed=9)
    name = "someone/gpt-oss-tiny-finetune"
    with FakeHub() as server:
        server.add_repo(name, synthetic_checkpoint(**shape, unquantized=True))
        out = run_models("download", name, env={**os.environ, "HF_ENDPOINT": server.url})
    assert out.returncode == 0, out.stderr
    assert store.get(name).needs_quantizing
    listed = run_models("list")
    assert "nothing yet: its experts are unquantized; python -m mlx_oss.models convert" in listed.stdout
    refused = run_models("convert", name, "--to", "numpy")
    assert refused.returncode == 1
    assert f"first run: python -m mlx_oss.models convert {name} --to mxfp4" in refused.stderr
    with pytest.raises(MlxOssError, match="stored unquantized"):
        mlx_oss.load(resolve_model(name))

    out = run_models("convert", name, "--to", "mxfp4")
    assert out.returncode == 0, out.stderr
    model = store.get(name)
    assert not model.needs_quantizing and resolve_model(name) == store.converted(name, "mxfp4")
    out = run_models("convert", name, "--to", "numpy")  # from the quantized copy
    assert out.returncode == 0, out.stderr
    tokens = [1, 2, 3, 4, 5]
    expected = mlx_oss.load(synthetic_checkpoint(**shape), backend="numpy").logits(tokens)
    for layout in ("mxfp4", "numpy"):
        got = mlx_oss.load(store.converted(name, layout), backend="numpy").logits(tokens)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# -- a hostile mirror (HF_ENDPOINT) and a damaged store ---------------------------------------------------------------


def listing(server: FakeHub, change) -> bytes:
    """The model-info answer of the fake hub with `change(info)` applied (it edits the dict in place)."""
    info = server.repo(NAME).model_info(with_metadata=True)
    change(info)
    return json.dumps(info).encode()


def sibling(info: dict, path: str) -> dict:
    return next(s for s in info["siblings"] if s["rfilename"] == path)


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda i: sibling(i, BIG)["lfs"].update(sha256="../../../escaped"),
            rf"siblings\[\d+\] \('{BIG}'\): .*lfs.sha256",
        ),
        (lambda i: sibling(i, BIG)["lfs"].update(sha256="A" * 64), "'lfs.sha256' is not 64 lowercase hex digits"),
        (lambda i: sibling(i, "config.json").update(blobId="../../../escaped"), r"\('config.json'\): field 'blobId'"),
        (lambda i: sibling(i, "config.json").update(blobId="/tmp/escaped"), "'blobId' is not a git blob id"),
        (lambda i: i.update(sha="../../../escaped"), "field 'sha' is not a commit hash"),
        (lambda i: sibling(i, "config.json").update(rfilename="..\\..\\escaped.json"), "not a plain file name"),
        (lambda i: i["siblings"].append({**sibling(i, "config.json")}), "'config.json' is not a plain file name"),
        (lambda i: sibling(i, "config.json").update(rfilename="x\x1b[2J.json"), r"'x\\x1b\[2J.json' is not a plain"),
    ],
)
def test_a_listing_naming_files_outside_the_cache_is_refused(change, message, fake_hub, store, tmp_path):
    """Checksums name files in blobs/, the commit a folder in snapshots/: `../` in them reached outside the cache."""
    fake_hub.answer("/api/models/*", listing(fake_hub, change), headers={"Content-Type": "application/json"})
    before = tree(tmp_path)
    with pytest.raises(HubError, match=f"{fake_hub.url}/api/models/{NAME}/revision/main.*{message}"):
        download(NAME, store)
    assert tree(tmp_path) == before and fetched(fake_hub) == []  # nothing written, nothing fetched


def test_a_revision_is_a_name_under_refs_not_a_path(fake_hub, store):
    with pytest.raises(MlxOssError, match="'../../../escaped' is not a branch, tag or commit name"):
        download(NAME, store, revision="../../../escaped")
    assert fake_hub.requests == []


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"[1, 2]", {}, "expected a JSON object describing the model, got list"),
        (b'{"sha": "' + b"a" * 40 + b'", "siblings": {"a": 1}}', {}, "field 'siblings' is not a list of files"),
        (b'{"sha": "' + b"a" * 40 + b'", "siblings": ["config.json"]}', {}, r"siblings\[0\] is not a file entry"),
        ("size", {}, r"\('config.json'\): field 'size' is not a number of bytes: '12'"),
        ("negative", {}, "field 'size' is not a number of bytes: '-1'"),
        (b"[" * 200_000 + b"]" * 200_000, {}, "not valid JSON: nested too deeply"),
        (b'{"sha": "\xff"}', {}, r"not UTF-8 text \(byte 9\)"),
        (b'{"sha": ' + b"1" * 5000 + b"}", {}, "Exceeds the limit"),
        (b"", {"Content-Encoding": "br"}, "sent in an encoding we did not ask for"),
        ("bomb", {"Content-Encoding": "gzip"}, "the answer is more than 33554432 bytes"),
        ("endless", {}, "the answer is more than 33554432 bytes"),
        ("many", {}, "lists more than 1000 files to download"),
    ],
)
def test_a_malformed_listing_is_one_line_naming_it(body, headers, message, fake_hub, store):
    if body == "size":
        body = listing(fake_hub, lambda i: sibling(i, "config.json").update(size="12"))
    elif body == "negative":
        body = listing(fake_hub, lambda i: sibling(i, "config.json").update(size=-1))
    elif body == "bomb":
        from fakehub import gzip_bomb

        body = gzip_bomb(1 << 30)  # 1 GB of spaces in 1 MB
    elif body == "endless":
        from fakehub import endless

        body = endless(b'{"sha": "' + b"a" * 40 + b'", "siblings": [', b'{"rfilename": "x"}, ' * 1000)
    elif body == "many":
        body = listing(
            fake_hub,
            lambda i: i["siblings"].extend(
                {**sibling(i, "config.json"), "rfilename": f"{n}.json"} for n in range(1001)
            ),
        )
    rule = fake_hub.answer("/api/models/*", body, headers=headers)
    with pytest.raises(HubError, match=f"^{fake_hub.url}/api/models/{NAME}/revision/main.*: .*{message}") as error:
        download(NAME, store)
    assert "\n" not in str(error.value) and len(str(error.value)) < 400
    assert rule.sent < 100 << 20  # an endless listing is not read to the end


def test_a_malformed_listing_on_the_command_line_is_one_line(fake_hub, store):
    fake_hub.answer("/api/models/*", b"[" * 200_000)
    out = run_models("download", NAME)
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert "not valid JSON: nested too deeply" in out.stderr


def test_a_body_that_never_ends_is_read_only_to_the_listed_size(fake_hub, store):
    from fakehub import endless

    served = (fake_hub.repo(NAME).folder / BIG).read_bytes()
    rule = fake_hub.answer(f"*/resolve/*/{BIG}", endless(served))  # the file, then zeros until the client stops
    with pytest.raises(HubError, match=f"{BIG}: the hub sent more than the listed {len(served)} bytes"):
        download(NAME, store)
    assert rule.sent < len(served) + (32 << 20)  # read no further than the file (plus what the sockets buffer)
    fake_hub.clear_faults()
    fake_hub.reset_stats()
    path = download(NAME, store)  # the bytes kept were the file: checked, not fetched again
    assert fake_hub.bytes_sent(NAME, BIG) == 0 and (path / BIG).read_bytes() == served


def test_a_body_announced_longer_than_listed_is_refused_before_reading(fake_hub, store):
    served = (fake_hub.repo(NAME).folder / BIG).read_bytes()
    length = {"Content-Length": str(len(served) + 1)}
    fake_hub.answer(f"*/resolve/*/{BIG}", served + b"\0", headers=length)
    with pytest.raises(HubError, match=f"{BIG}: the hub sent more than the listed {len(served)} bytes"):
        download(NAME, store)
    assert store.get(NAME).partial


def test_a_body_that_ends_short_is_asked_again_a_few_times_then_resumed_by_the_next_run(fake_hub, store):
    served = (fake_hub.repo(NAME).folder / BIG).read_bytes()
    half = len(served) // 2
    fake_hub.answer(f"*/resolve/*/{BIG}", served[:half], headers={"Content-Length": str(half)}, times=20)
    with pytest.raises(HubError, match=f"{BIG}: the hub sent {half} of the listed {len(served)} bytes and no more"):
        download(NAME, store)
    assert len([r for r in fake_hub.requests if r.path.endswith(BIG)]) == hub.RETRIES + 1
    fake_hub.clear_faults()
    fake_hub.reset_stats()
    path = download(NAME, store)
    assert fake_hub.bytes_sent(NAME, BIG) == len(served) - half and (path / BIG).read_bytes() == served


def test_a_resume_answered_with_other_bytes_is_refused_and_keeps_the_partial(fake_hub, store, monkeypatch):
    monkeypatch.setattr(hub, "RETRIES", 0)
    served = (fake_hub.repo(NAME).folder / BIG).read_bytes()
    fake_hub.cut(NAME, BIG, at_byte=len(served) // 2, times=None)
    with pytest.raises(HubError, match="connection dropped"):
        download(NAME, store)
    (partial,) = (store.folder(NAME) / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    fake_hub.clear_faults()
    whole = {"Content-Range": f"bytes 0-{len(served) - 1}/{len(served)}", "Content-Length": str(len(served))}
    fake_hub.answer(f"*/resolve/*/{BIG}", served, status=206, headers=whole)
    with pytest.raises(HubError, match=f"asked for the bytes from {kept} on, the hub sent 'bytes 0-"):
        download(NAME, store)
    assert partial.stat().st_size == kept


def test_a_file_sent_compressed_is_refused(fake_hub, store):
    import gzip

    served = (fake_hub.repo(NAME).folder / "config.json").read_bytes()
    fake_hub.answer("*/resolve/*/config.json", gzip.compress(served), headers={"Content-Encoding": "gzip"})
    with pytest.raises(HubError, match=r"config.json: the hub sent it encoded \('gzip'\) though asked for the file"):
        download(NAME, store)


def test_redirects_to_another_host_are_followed_without_the_token_and_bounded(fake_hub, store, monkeypatch):
    """The hub sends large files from a CDN on another host: followed, but the token stays with the hub."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)  # conftest sets it
    with FakeHub() as cdn:
        cdn.add_repo(NAME, fake_hub.repo(NAME).folder)
        location = f"{cdn.url}/{NAME}/resolve/{fake_hub.repo(NAME).commit}/{BIG}"
        fake_hub.answer(f"*/resolve/*/{BIG}", status=302, headers={"Location": location, "Content-Length": "0"})
        path = download(NAME, store)
        assert [r.authorization for r in cdn.requests] == [False] and cdn.bytes_sent(NAME, BIG) > 0
    assert [r.path for r in fake_hub.requests if not r.authorization] == []
    assert store.get(NAME).downloaded and (path / BIG).is_file()

    fake_hub.clear_faults()
    fake_hub.reset_stats()
    loop = f"{fake_hub.url}/loop/resolve/main/x"
    fake_hub.answer("/api/models/*", status=302, headers={"Location": loop, "Content-Length": "0"})
    fake_hub.answer("/loop/*", status=302, headers={"Location": loop, "Content-Length": "0"})
    with pytest.raises(HubError, match="TooManyRedirects"):
        download(NAME, ModelStore(store.root / "other"))
    assert len(fake_hub.requests) <= 21  # the request and at most 20 redirects


@pytest.mark.parametrize("path", ["/api/models/*", f"*/resolve/*/{BIG}"])
@pytest.mark.parametrize("body", ["endless", "junk", "nul", "bomb", "utf-32"])
def test_an_error_answer_is_read_only_for_its_message(path, body, fake_hub, store):
    """huggingface_hub reads an error's whole body and decodes it: an endless, compressed or mislabelled one, or one
    whose first bytes `json.loads` takes for UTF-16 (zeros, as random junk has one time in a hundred)."""
    from fakehub import endless, gzip_bomb

    headers = {"Content-Encoding": "gzip"} if body in ("junk", "bomb") else {}
    if body == "utf-32":
        headers = {"Content-Type": "application/json; charset=utf-32"}
    if body == "nul":
        headers = {"Content-Type": "application/json"}
    content = {
        "endless": endless(b"<html>"),
        "junk": os.urandom(5000),
        "nul": b"\0\xbd" + os.urandom(5000),
        "bomb": gzip_bomb(1 << 30),
    }
    content = content.get(body, b"\0\xff" * 99)  # utf-32: not text in that encoding either
    rule = fake_hub.answer(path, content, status=500, headers=headers)
    with pytest.raises(HubError, match="the hub answered 500 Internal Server Error; try again later"):
        download(NAME, store)
    assert rule.sent < 32 << 20


def test_huge_headers_are_refused(fake_hub, store):
    fake_hub.answer("/api/models/*", b"{}", headers={"X-Junk": "a" * 1_000_000, "Content-Length": "2"})
    with pytest.raises(HubError, match=f"{NAME}: the hub closed the connection or sent an answer that is not HTTP"):
        download(NAME, store)


def test_model_names_longer_than_the_hub_allows_are_one_short_line(store):
    long = "openai/" + "x" * 100_000
    for command in ("download", "info", "delete"):
        out = run_models(command, long, "--yes") if command == "delete" else run_models(command, long)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and len(out.stderr) < 300, out.stderr
        assert "(100007 characters) is not a hub model name" in out.stderr and "at most 96" in out.stderr
    for name in ("openai/" + "x" * 97, "a--b/c", "a/b--c", "a/.b", "a/b.git", "a/b c", "a/b/c", "-a/b"):
        with pytest.raises(MlxOssError, match="is not a hub model name"):
            store.get(name)
    assert store.get("openai/" + "x" * 96).layouts == {}
    with pytest.raises(MlxOssError, match=r"\(100007 characters\) is not a hub model name"):
        resolve_model(long)


def test_stray_entries_in_the_store_do_not_break_list(fake_hub, store):
    download(NAME, store)
    root = store.root
    (root / "models--foo").mkdir()  # a one-part name (another tool's): not ours, not mentioned
    (root / "models--x--y" / "refs").mkdir(parents=True)
    (root / "models--x--y" / "refs" / "main").write_bytes(b"../../../etc\xff")
    (root / "models--x--y" / "snapshots").mkdir()
    (root / "models--a--b").write_text("a file named like a model folder")
    (root / "models--bad name--z").mkdir()
    record = root / "models--c--d" / "mlx-oss" / "verified.json"
    record.parent.mkdir(parents=True)
    record.write_text("[" * 200_000)
    (root / "models--c--d" / "blobs").mkdir()
    (root / "models--c--d" / "blobs" / "x.incomplete").write_bytes(b"1")
    traversal = root / "models--e--f" / "mlx-oss" / "verified.json"
    traversal.parent.mkdir(parents=True)
    traversal.write_text(json.dumps({"revision": "../../../..", "files": {}}))
    index = root / "models--g--h" / "snapshots" / ("a" * 40) / "model.safetensors.index.json"
    index.parent.mkdir(parents=True)
    index.write_text('{"weight_map": {"w": "/etc/passwd"}}')
    (index.parent / "config.json").write_text("{}")
    (root / "models--g--h" / "refs").mkdir()
    (root / "models--g--h" / "refs" / "main").write_text("a" * 40)

    names = [m.name for m in store.list()]
    assert names == ["c/d", NAME]  # c/d: a partial download, its unreadable record ignored
    assert list(store.skipped) == ["models--a--b", "models--bad name--z"]
    assert (
        store.skipped["models--a--b"] == "not a folder"
        and "not a hub model name" in store.skipped["models--bad name--z"]
    )
    out = run_models("list")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert NAME in out.stdout and "partial download" in out.stdout
    assert "skipped 2 entries that are not model folders: 'models--a--b', 'models--bad name--z'" in out.stdout


def test_an_index_that_is_not_one_is_named(tmp_path):
    from mlx_oss.store import _weight_map

    for text, message in (
        ("[" * 200_000, "not valid JSON: nested too deeply"),
        ("[]", 'no "weight_map" object'),
        ('{"weight_map": {"w": "../x.safetensors"}}', "tensor 'w' lies in '../x.safetensors', not a file in this"),
    ):
        (tmp_path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(MlxOssError, match=f"model.safetensors.index.json: {message}"):
            _weight_map(tmp_path)
    with open(tmp_path / "model.safetensors.index.json", "r+b") as index:
        index.truncate(65 << 20)  # sparse: costs no disk
    with pytest.raises(MlxOssError, match="index.json: 68157440 bytes, more than an index of tensor names can be"):
        _weight_map(tmp_path)


def test_a_store_that_cannot_be_written_is_one_clear_line(fake_hub, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_OSS_MODELS", str(blocker / "models"))
    with pytest.raises(MlxOssError, match=f"cannot write {blocker}/models/.*: Not a directory; what arrived is kept"):
        download(NAME)
    out = run_models("download", NAME)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Not a directory" in out.stderr

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)]).returncode:
            pytest.skip("cannot mount a read-only file system here")
    else:
        read_only.chmod(0o555)
    try:
        monkeypatch.setenv("MLX_OSS_MODELS", str(read_only))
        with pytest.raises(MlxOssError, match="cannot write .*: (Read-only file system|Permission denied)"):
            download(NAME)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)])


def test_a_full_disk_mid_file_keeps_what_arrived_and_the_next_run_resumes(fake_hub, store):
    """A file size limit (RLIMIT_FSIZE) makes writes past 8 MB fail as a full disk does, with no root needed."""
    import resource

    limit = 8 << 20

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = subprocess.run(
        [sys.executable, "-m", "mlx_oss.models", "download", NAME],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limited,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert "cannot write " in error and ".incomplete: File too large; the " in error
    kept = int(error.split("; the ")[1].split(" bytes")[0])
    (partial,) = (store.folder(NAME) / "blobs").glob("*.incomplete")
    assert 0 < kept == partial.stat().st_size <= limit  # cut back to what was checksummed
    fake_hub.reset_stats()
    path = download(NAME, store)
    total = sum(f.size for f in fake_hub.repo(NAME).files.values() if hub.wanted(f.path))
    assert sum(fake_hub.bytes_sent(NAME, f) for f in fake_hub.repo(NAME).files) < total
    assert store.get(NAME).downloaded and greedy_tokens(path, 2) == greedy_tokens(fake_hub.repo(NAME).folder, 2)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a small file system (root)")
def test_a_disk_filling_up_mid_download_is_one_line_and_damages_nothing(fake_hub, tmp_path, monkeypatch):
    """A real ENOSPC: the store on a 128 MB tmpfs that another program fills while a download runs."""
    import mlx_oss.atomic

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(mlx_oss.atomic, "SPACE_MARGIN", 0)
        store = ModelStore(disk / "store")
        other = "openai/already-here"
        fake_hub.add_repo(other, fake_hub.repo(NAME).folder)
        download(other, store)
        before = {p: p.read_bytes() for p in store.folder(other).rglob("*") if p.is_file()}

        def fill_the_disk(p):
            if p.done_bytes > 5_000_000 and not (disk / "filler").exists():
                with open(disk / "filler", "wb") as filler, contextlib.suppress(OSError):
                    while True:
                        filler.write(b"\0" * (1 << 20))
                        filler.flush()

        with pytest.raises(MlxOssError, match=r"cannot write .*\.incomplete: No space left on device; the \d+ bytes"):
            download(NAME, store, on_progress=fill_the_disk)
        assert {p: p.read_bytes() for p in store.folder(other).rglob("*") if p.is_file()} == before
        assert store.get(other).downloaded and not store.get(NAME).downloaded and store.get(NAME).partial
        (disk / "filler").unlink()
        fake_hub.reset_stats()
        path = download(NAME, store)
        total = sum(f.size for f in fake_hub.repo(NAME).files.values() if hub.wanted(f.path))
        assert sum(fake_hub.bytes_sent(NAME, f) for f in fake_hub.repo(NAME).files) < total
        assert (path / BIG).read_bytes() == (fake_hub.repo(NAME).folder / BIG).read_bytes()
    finally:
        subprocess.run(["umount", str(disk)])

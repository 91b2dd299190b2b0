"""Downloading a model from the Hugging Face hub into the model store: resumable, verified, cancellable.

huggingface_hub supplies the pieces: the repository's file list with sizes and checksums (`HfApi.model_info`),
file URLs, its HTTP session and its error types. The transfer itself is ours because the library (2.x) starts a
file over after any interruption it could not recover within one call, and a gpt-oss shard is 5 GB: here the bytes
that arrived stay in `blobs/<etag>.incomplete` and the next run asks for the rest with an HTTP `Range`. Files land
in the hub cache's own layout (`blobs/`, `snapshots/<commit>/`, `refs/`), so other Hugging Face tools see them.

Every file is checked as it arrives: its size, and its checksum (the sha256 the hub lists for large files, the git
blob id for small ones). The download is recorded in the store only when all files passed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .atomic import ensure_free_space
from .cancel import CancelToken
from .errors import MlxOssError
from .store import ModelStore

# What the product loads: top-level config, weights, tokenizer and template files. The hub repos of gpt-oss also
# carry `original/` (OpenAI's own format) and `metal/` copies, which are left out with every other folder.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.md", "LICENSE*", "USAGE_POLICY*", "tokenizer*")
CHUNK_BYTES = 1 << 20
RETRIES = 4  # transfers resumed after a dropped connection before giving up (the next run resumes again)
RETRY_DELAY_S = 1.0  # doubled after each failure in a row, at most 8 s
TIMEOUT_S = 30.0


class HubError(MlxOssError):
    """The hub could not be reached, refused the request, or sent something that failed verification."""


class DownloadCancelled(MlxOssError):
    """The download was cancelled; what arrived is kept and the next download resumes it."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # large (LFS) files
    blob_id: str  # git blob sha1: the checksum of small files

    @property
    def etag(self) -> str:
        """The name the hub cache gives its blob: the sha256 of large files, the git blob id of the others."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class DownloadProgress:
    name: str
    file: str
    done_bytes: int
    total_bytes: int
    bytes_per_s: float  # over this run, counting only bytes fetched (not what a previous run left)


def wanted(path: str) -> bool:
    return "/" not in path and any(fnmatch.fnmatch(path, pattern) for pattern in ALLOW_PATTERNS)


def offline() -> bool:
    import huggingface_hub.constants as constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    import huggingface_hub.constants as constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def remote_files(name: str, revision: str = "main") -> tuple[str, list[RemoteFile]]:
    """The commit `revision` points at and the files of `name` the product needs, as the hub lists them."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint()).model_info(name, revision=revision, files_metadata=True, timeout=TIMEOUT_S)
    except Exception as e:
        raise hub_error(e, name) from None
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id or "")
        for s in info.siblings or []
        if wanted(s.rfilename)
    ]
    if not any(f.path == "config.json" for f in files) or not any(f.path.endswith(".safetensors") for f in files):
        raise HubError(f"{name} on the hub has no config.json and safetensors weights; is it a gpt-oss model?")
    return info.sha, files


def hub_error(error: Exception, name: str, path: str | None = None) -> MlxOssError:
    """One clear sentence for what went wrong talking to the hub."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{name}/{path}" if path else name
    if isinstance(error, OfflineModeIsEnabled):
        return HubError(f"{name} is not on this computer and HF_HUB_OFFLINE is set: nothing can be downloaded")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"{name}: no such model on the hub ({endpoint()}), or it is private or gated")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{name}: the hub has no such revision")
    if isinstance(error, RemoteEntryNotFoundError):
        return HubError(f"{what}: the hub lists this file but does not serve it (404)")
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        return hub_error(error.__cause__, name, path)  # type: ignore[arg-type]
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        return HubError(
            f"{what}: the hub answered {status} {error.response.reason_phrase}; try again later "
            "(the download resumes where it stopped)"
        )
    if _is_dropped_transfer(error):
        return HubError(
            f"{what}: the connection dropped mid-file ({type(error).__name__}); run the download again to resume"
        )
    if _is_network_error(error):
        return HubError(
            f"cannot reach the hub at {endpoint()} ({type(error).__name__}: {error}); check the connection "
            "(models already on this computer need none)"
        )
    return HubError(f"{what}: {type(error).__name__}: {error}")


def _http():
    """The HTTP library under huggingface_hub: `httpx2` since 2.0, `httpx` before."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def _is_network_error(error: BaseException) -> bool:
    return isinstance(error, _http().TransportError)


def _is_dropped_transfer(error: BaseException) -> bool:
    http = _http()
    return isinstance(error, http.RemoteProtocolError | http.ReadError | http.ReadTimeout)


class _Transfer:
    """Progress of one download run, reported at most ten times a second."""

    def __init__(self, name: str, total: int, done: int, on_progress: Callable[[DownloadProgress], None] | None):
        self.name, self.total, self.done = name, total, done
        self.fetched = 0
        self.start = time.monotonic()
        self.last_report = 0.0
        self.on_progress = on_progress

    def add(self, file: str, count: int, force: bool = False) -> None:
        self.done += count
        self.fetched += count
        now = time.monotonic()
        if self.on_progress and (force or now - self.last_report >= 0.1):
            self.last_report = now
            rate = self.fetched / max(now - self.start, 1e-6)
            self.on_progress(DownloadProgress(self.name, file, self.done, self.total, rate))


def download(
    name: str,
    store: ModelStore | None = None,
    revision: str = "main",
    on_progress: Callable[[DownloadProgress], None] | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Fetch what the product needs of hub model `name` into the store and return its snapshot directory.

    A model already downloaded and verified at the same commit costs one metadata request; offline
    (`HF_HUB_OFFLINE=1`) it costs none. Raises `HubError` (unreachable, refused, corrupted: named) or
    `DownloadCancelled`; in both cases what arrived intact is kept for the next run.
    """
    store = store or ModelStore()
    cancel = cancel or CancelToken()
    stored = store.get(name)
    if offline():
        if stored.downloaded:
            return stored.layouts["hf"]
        raise HubError(f"{name} is not on this computer and HF_HUB_OFFLINE is set: nothing can be downloaded")
    commit, files = remote_files(name, revision)
    if stored.downloaded and stored.revision == commit:
        return stored.layouts["hf"]

    folder = store.folder(name)
    blobs, snapshot = folder / "blobs", folder / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    have = {f.path: _present(blobs, f) for f in files}
    total = sum(f.size for f in files)
    ensure_free_space(blobs, total - sum(have.values()))
    transfer = _Transfer(name, total, sum(have.values()), on_progress)
    for f in files:
        if cancel.cancelled:
            raise _cancelled(name)
        _fetch(name, commit, f, blobs, transfer, cancel)
        _link(snapshot / f.path, blobs / f.etag)
    transfer.add("", 0, force=True)
    refs = folder / "refs"
    refs.mkdir(exist_ok=True)
    if revision != commit:
        (refs / revision).write_text(commit)
    store.record_download(name, commit, {f.path: f.size for f in files})
    return snapshot


def _cancelled(name: str) -> DownloadCancelled:
    return DownloadCancelled(f"download of {name} cancelled; run it again to resume")


def _complete(blobs: Path, f: RemoteFile) -> bool:
    blob = blobs / f.etag
    return blob.is_file() and blob.stat().st_size == f.size


def _present(blobs: Path, f: RemoteFile) -> int:
    """Bytes of `f` already here: a finished blob, or what an earlier run left in its `.incomplete` file."""
    if _complete(blobs, f):
        return f.size
    partial = blobs / f"{f.etag}.incomplete"
    return min(partial.stat().st_size, f.size) if partial.is_file() else 0


def _hasher(f: RemoteFile):
    if f.sha256:
        return hashlib.sha256()
    return hashlib.sha1(b"blob %d\0" % f.size)  # git's blob id


def _fetch(name: str, commit: str, f: RemoteFile, blobs: Path, transfer: _Transfer, cancel: CancelToken) -> None:
    """Download `f` into `blobs/<etag>` unless it is there, under the hub cache's own lock for that blob (so
    huggingface_hub's tools and a second mlx-oss never write the same file at once)."""
    from huggingface_hub.utils import WeakFileLock

    lock = blobs.parent.parent / ".locks" / blobs.parent.name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not _complete(blobs, f):  # checked under the lock: another process may just have finished it
            _transfer(name, commit, f, blobs, transfer, cancel)


def _transfer(name: str, commit: str, f: RemoteFile, blobs: Path, transfer: _Transfer, cancel: CancelToken) -> None:
    """Fetch `f`, resuming its `.incomplete` file; verify size and checksum on the way."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    partial = blobs / f"{f.etag}.incomplete"
    partial.touch()
    hasher = _hasher(f)
    with open(partial, "rb") as existing:  # what an earlier run fetched counts towards the checksum
        while chunk := existing.read(CHUNK_BYTES):
            hasher.update(chunk)
    url = hf_hub_url(name, f.path, revision=commit, endpoint=endpoint())
    failures = 0
    while (have := partial.stat().st_size) < f.size:
        if cancel.cancelled:
            raise _cancelled(name)
        headers = build_hf_headers() | {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True) as r:
                hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the range: start the file over
                    transfer.add(f.path, -have)
                    partial.write_bytes(b"")
                    hasher = _hasher(f)
                with open(partial, "ab") as out:
                    for chunk in r.iter_bytes(CHUNK_BYTES):
                        if cancel.cancelled:
                            raise _cancelled(name)
                        chunk = chunk[: f.size - out.tell()]
                        _write(out, chunk, partial)
                        hasher.update(chunk)
                        transfer.add(f.path, len(chunk))
                        failures = 0
        except (DownloadCancelled, HubError):
            raise
        except Exception as e:
            if not _is_network_error(e) or failures >= RETRIES:
                raise hub_error(e, name, f.path) from None
            failures += 1
            if cancel.wait(min(RETRY_DELAY_S * 2 ** (failures - 1), 8)):
                raise _cancelled(name) from None
    digest = hasher.hexdigest()
    expected = f.sha256 or f.blob_id
    if expected and digest != expected:
        partial.unlink()
        raise HubError(
            f"{name}/{f.path} arrived corrupted (checksum {digest[:12]}..., the hub lists {expected[:12]}...); "
            "it was removed: run the download again"
        )
    os.replace(partial, blobs / f.etag)


def _write(out, chunk: bytes, partial: Path) -> None:
    """Append `chunk`; on a local failure (a full disk) cut the file back to what was checksummed, and say so."""
    start = out.tell()
    try:
        out.write(chunk)
        out.flush()
    except OSError as e:
        out.truncate(start)
        raise HubError(
            f"cannot write {partial}: {e.strerror or e}; free some space and run the download again"
        ) from None


def _link(target: Path, blob: Path) -> None:
    """Put `blob` at `target` in the snapshot as the hub cache does: a relative symlink (a copy where links fail)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:
        import shutil

        shutil.copyfile(blob, target)

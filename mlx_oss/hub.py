"""Downloading a model from the Hugging Face hub into the model store: resumable, verified, cancellable.

huggingface_hub supplies the pieces: file URLs, its HTTP session, its headers and its error types; the repository's
file list with sizes and checksums is read by `hub_listing`, as input from a possibly hostile mirror. The transfer
itself is ours because the library (2.x) starts a file over after any interruption it could not recover within one
call, and a gpt-oss shard is 5 GB: here the bytes that arrived stay in `blobs/<etag>.incomplete` and the next run
asks for the rest with an HTTP `Range`. Files land in the hub cache's own layout (`blobs/`, `snapshots/<commit>/`,
`refs/`), so other Hugging Face tools see them.

Every file is checked as it arrives: its size, and its checksum (the sha256 the hub lists for large files, the git
blob id for small ones). The download is recorded in the store only when all files passed. A body is read raw (no
decompression) and only up to the listed size: a server that sends more, less or something else is named.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .atomic import ensure_free_space
from .cancel import CancelToken
from .errors import MlxOssError
from .hub_listing import ALLOW_PATTERNS, HubError, ListingError, RemoteFile, parse_listing, read_body, wanted
from .store import ModelStore, clip, is_safe_file, shown

__all__ = ["ALLOW_PATTERNS", "HubError", "ListingError", "RemoteFile", "download", "remote_files", "wanted"]
CHUNK_BYTES = 1 << 20
RETRIES = 4  # transfers resumed after a dropped connection before giving up (the next run resumes again)
RETRY_DELAY_S = 1.0  # doubled after each failure in a row, at most 8 s
TIMEOUT_S = 30.0
ERROR_BODY_BYTES = 64 << 10  # of an error answer, read for its message


class DownloadCancelled(MlxOssError):
    """The download was cancelled; what arrived is kept and the next download resumes it."""


class StorageError(MlxOssError):
    """The model store's folder cannot be written (read-only, missing, full); what arrived intact is kept."""


@dataclass(frozen=True)
class DownloadProgress:
    name: str
    file: str
    done_bytes: int
    total_bytes: int
    bytes_per_s: float  # over this run, counting only bytes fetched (not what a previous run left)


def offline() -> bool:
    import huggingface_hub.constants as constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    import huggingface_hub.constants as constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def check_revision(revision: str) -> str:
    """A branch, tag or commit: it names a file under `refs/`, so it must stay a plain relative path there."""
    if not is_safe_file(revision) or len(revision) > 255 or revision.startswith("-"):
        raise MlxOssError(f"{shown(revision)} is not a branch, tag or commit name")
    return revision


def remote_files(name: str, revision: str = "main") -> tuple[str, list[RemoteFile]]:
    """The commit `revision` points at and the files of `name` the product needs, as the hub lists them."""
    from urllib.parse import quote

    from huggingface_hub.utils import build_hf_headers, get_session

    url = f"{endpoint()}/api/models/{name}/revision/{quote(revision, safe='')}?blobs=true"
    headers = build_hf_headers() | {"Accept-Encoding": "gzip, identity"}
    try:
        with get_session().stream("GET", url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True) as r:
            _raise_for_status(r)
            body = read_body(r, url)
    except MlxOssError:
        raise
    except Exception as e:
        raise hub_error(e, name) from None
    commit, files = parse_listing(body, url)
    if not any(f.path == "config.json" for f in files) or not any(f.path.endswith(".safetensors") for f in files):
        raise HubError(f"{name} on the hub has no config.json and safetensors weights; is it a gpt-oss model?")
    return commit, files


def _raise_for_status(r) -> None:
    """huggingface_hub's `hf_raise_for_status` (its error types, the hub's error codes), on at most the first
    `ERROR_BODY_BYTES` of an error's body: it reads the body for the message, and a hostile server's never ends."""
    from huggingface_hub.utils import hf_raise_for_status

    if r.status_code < 400:
        return hf_raise_for_status(r)
    body = bytearray()
    for chunk in r.iter_raw(ERROR_BODY_BYTES):
        body += chunk
        if len(body) >= ERROR_BODY_BYTES:
            break
    # The copy carries what we read as UTF-8 text (junk replaced): a compressed or mislabelled body would make the
    # library's own decoding raise UnicodeDecodeError instead of its error. NULs go too: `json.loads` guesses UTF-16
    # or UTF-32 from zero bytes at the start, whatever the charset says.
    framing = ("content-encoding", "content-length", "transfer-encoding", "content-type")
    headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in framing]
    kind = "application/json" if "json" in r.headers.get("Content-Type", "") else "text/plain"
    headers.append(("Content-Type", f"{kind}; charset=utf-8"))
    text = bytes(body[:ERROR_BODY_BYTES]).decode("utf-8", "replace").replace("\0", "\ufffd").encode()
    hf_raise_for_status(_http().Response(r.status_code, headers=headers, content=text, request=r.request))


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
            f"{what}: the hub answered {status} {clip(error.response.reason_phrase, 60)}; try again later "
            "(the download resumes where it stopped)"
        )
    if _is_dropped_transfer(error) and path is None:
        return HubError(
            f"{name}: the hub closed the connection or sent an answer that is not HTTP we can read "
            f"({type(error).__name__}); try again later"
        )
    if _is_dropped_transfer(error):
        return HubError(
            f"{what}: the connection dropped mid-file ({type(error).__name__}); run the download again to resume"
        )
    if _is_network_error(error):
        return HubError(
            f"cannot reach the hub at {endpoint()} ({type(error).__name__}: {clip(error)}); check the connection "
            "(models already on this computer need none)"
        )
    return HubError(f"{what}: {type(error).__name__}: {clip(error)}")


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
    (`HF_HUB_OFFLINE=1`) it costs none. Raises `HubError` (unreachable, refused, corrupted, a listing or answer
    that is not what the hub sends: named), `StorageError` (the store's folder cannot be written) or
    `DownloadCancelled`; in every case what arrived intact is kept for the next run.
    """
    store = store or ModelStore()
    cancel = cancel or CancelToken()
    check_revision(revision)
    stored = store.get(name)
    if offline():
        if stored.downloaded:
            return stored.layouts["hf"]
        raise HubError(f"{name} is not on this computer and HF_HUB_OFFLINE is set: nothing can be downloaded")
    commit, files = remote_files(name, revision)
    if stored.downloaded and stored.revision == commit:
        return stored.layouts["hf"]
    try:
        return _download(name, store, revision, commit, files, on_progress, cancel)
    except OSError as e:  # the store's folder, not the hub: read-only, missing, full
        where = e.filename or store.root
        raise StorageError(
            f"cannot write {where}: {e.strerror or e}; what arrived is kept (check the folder, or set MLX_OSS_MODELS "
            "to one you can write, and run the download again)"
        ) from None


def _download(
    name: str,
    store: ModelStore,
    revision: str,
    commit: str,
    files: list[RemoteFile],
    on_progress: Callable[[DownloadProgress], None] | None,
    cancel: CancelToken,
) -> Path:
    """The files of a checked listing into the store; local failures surface as OSError for `download` to name."""
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
    if revision != commit:
        ref = folder / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
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
    """Fetch `f`, resuming its `.incomplete` file; verify size and checksum on the way. Never more than the listed
    size is read; answers that end short are asked again from where they stopped, a few times in a row at most."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    partial = blobs / f"{f.etag}.incomplete"
    with open(partial, "ab") as out:
        if out.tell() > f.size:  # more than the file can hold: not a prefix of it
            out.truncate(0)
    hasher = _hasher(f)
    with open(partial, "rb") as existing:  # what an earlier run fetched counts towards the checksum
        while chunk := existing.read(CHUNK_BYTES):
            hasher.update(chunk)
    url = hf_hub_url(name, f.path, revision=commit, endpoint=endpoint())
    failures = short = 0
    while (have := partial.stat().st_size) < f.size:
        if cancel.cancelled:
            raise _cancelled(name)
        headers = build_hf_headers() | {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True) as r:
                _raise_for_status(r)
                _check_answer(r, name, f, have)
                if have and r.status_code != 206:  # the server ignored the range: start the file over
                    transfer.add(f.path, -have)
                    partial.write_bytes(b"")
                    hasher, have = _hasher(f), 0
                with open(partial, "ab", buffering=0) as out:
                    for chunk in r.iter_raw(CHUNK_BYTES):  # raw: we asked for the bytes as stored
                        if cancel.cancelled:
                            raise _cancelled(name)
                        room = f.size - have
                        _write(out, chunk[:room], partial, have)
                        hasher.update(chunk[:room])
                        transfer.add(f.path, min(len(chunk), room))
                        have += min(len(chunk), room)
                        failures = 0
                        if len(chunk) > room:
                            raise _too_long(name, f)
                if have < f.size:  # the answer ended cleanly, short of the listed size
                    short += 1
                    if short > RETRIES:
                        raise HubError(
                            f"{name}/{f.path}: the hub sent {have} of the listed {f.size} bytes and no more; "
                            "what arrived is kept: run the download again to resume"
                        )
        except (DownloadCancelled, HubError, StorageError):
            raise
        except Exception as e:
            if isinstance(e, OSError) and not isinstance(e, _http().HTTPError):
                raise  # our own files (the store's folder), which `download` names
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


def _too_long(name: str, f: RemoteFile) -> HubError:
    return HubError(
        f"{name}/{f.path}: the hub sent more than the listed {f.size} bytes; stopped reading there "
        "(the first bytes are kept and checked by the next download)"
    )


def _check_answer(r, name: str, f: RemoteFile, have: int) -> None:
    """Refuse an answer that announces something other than the rest of the file: compressed though we asked for
    the bytes as stored, a range other than the one asked for, or a length beyond the listed size."""
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise HubError(f"{name}/{f.path}: the hub sent it encoded ({shown(encoding)}) though asked for the file as is")
    start = have if r.status_code == 206 else 0
    if r.status_code == 206:
        content_range = r.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {have}-"):
            raise HubError(
                f"{name}/{f.path}: asked for the bytes from {have} on, the hub sent {shown(content_range, 40)}"
            )
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > f.size - start:
        raise _too_long(name, f)


def _write(out, chunk: bytes, partial: Path, start: int) -> None:
    """Append `chunk` to the unbuffered `out`; on a local failure (a full disk) cut the file back to the `start`
    bytes already checksummed, so the next run resumes from there, and say so."""
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view) :]
    except OSError as e:
        with contextlib.suppress(OSError):
            out.truncate(start)
        raise StorageError(
            f"cannot write {partial}: {e.strerror or e}; the {start} bytes before are kept: free some space and run "
            "the download again"
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

"""A tiny stand-in for the Hugging Face Hub, for tests (standard library only).

It serves model repos from local folders over real HTTP on 127.0.0.1 and answers the requests that
``huggingface_hub`` (2.x) makes for ``HfApi.model_info`` and ``hf_hub_download``, which mlx-oss's downloader uses:

    GET  /api/models/{repo_id}[/revision/{rev}][?blobs=true]        -> model info JSON (``sha``, ``siblings``)
    GET  /api/models/{repo_id}/tree/{rev}[/{path}][?recursive=true]  -> tree listing JSON (for snapshot_download)
    HEAD /{repo_id}/resolve/{rev}/{filename}                         -> file metadata in headers
    GET  /{repo_id}/resolve/{rev}/{filename}   (honours ``Range``)    -> file bytes (200, or 206 + Content-Range)

``rev`` may be ``main`` or the repo's commit hash. Nothing Xet-related is ever sent (no ``X-Xet-*`` headers, no
``xetHash`` in the tree), so the client always falls back to plain HTTP downloads.

Test knobs: :meth:`FakeHub.fail` (answer an HTTP error for matching requests), :meth:`FakeHub.cut` (announce the full
``Content-Length`` but close the connection once a given byte offset of the file is reached), ``honor_range``
(ignore ``Range`` and always answer 200), :meth:`FakeHub.answer` (a hostile mirror: any status, headers and body,
endless or compressed ones included, for matching requests), and counters (:meth:`FakeHub.bytes_sent`,
:attr:`FakeHub.requests`).

Usage::

    with FakeHub() as hub:
        hub.add_repo("org/model", folder)
        # point huggingface_hub at hub.url (see `configure_huggingface_hub`), then download...
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import gzip
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files stored with Git LFS on the real Hub (by extension). Their ETag is the sha256 of the content; other files
# use their git blob sha1, exactly like the Hub.
DEFAULT_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz", ".h5", ".msgpack", ".onnx", ".model")
_CHUNK_SIZE = 64 * 1024
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------------------
# Repo model
# --------------------------------------------------------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_digests(path: Path) -> tuple[int, str, str]:
    """Return (size, sha256, git blob sha1) of a file, streaming it."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


@dataclass(frozen=True)
class RepoFile:
    path: str  # posix path inside the repo
    local_path: Path
    size: int
    sha256: str
    blob_id: str  # git oid: sha1 of the content, or of the LFS pointer file for LFS files
    is_lfs: bool
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        """The Hub's ETag: sha256 for LFS files, git blob sha1 otherwise (also the cache's blob filename)."""
        return self.sha256 if self.is_lfs else self.blob_id

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, with_metadata: bool) -> dict:
        sibling: dict = {"rfilename": self.path}
        if with_metadata:
            sibling["size"] = self.size
            sibling["blobId"] = self.blob_id
            if self.is_lfs:
                sibling["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sibling


@dataclass(frozen=True)
class Repo:
    repo_id: str
    folder: Path
    files: dict[str, RepoFile]
    commit: str  # 40-hex commit hash, derived from the content (changes whenever a file changes)

    @classmethod
    def from_folder(cls, repo_id: str, folder: str | os.PathLike, lfs_suffixes=DEFAULT_LFS_SUFFIXES) -> Repo:
        folder = Path(folder)
        files: dict[str, RepoFile] = {}
        for local_path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = local_path.relative_to(folder).as_posix()
            if rel.startswith(".git/") or rel.startswith(".cache/"):
                continue
            size, sha256, sha1 = _file_digests(local_path)
            if rel.endswith(tuple(lfs_suffixes)):
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
                files[rel] = RepoFile(rel, local_path, size, sha256, _git_blob_sha1(pointer), True, len(pointer))
            else:
                files[rel] = RepoFile(rel, local_path, size, sha256, sha1, False)
        commit = hashlib.sha1(repr(sorted((p, f.blob_id) for p, f in files.items())).encode()).hexdigest()
        return cls(repo_id, folder, files, commit)

    def resolve_revision(self, revision: str) -> str | None:
        return self.commit if revision in ("main", self.commit) else None

    def folders(self) -> list[str]:
        parents = {str(parent) for f in self.files for parent in Path(f).parents if str(parent) != "."}
        return sorted(p.replace(os.sep, "/") for p in parents)

    def model_info(self, with_metadata: bool) -> dict:
        return {
            "_id": self.commit[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": self.repo_id.split("/")[0] if "/" in self.repo_id else None,
            "sha": self.commit,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [f.sibling(with_metadata) for f in self.files.values()],
        }

    def tree(self, path: str, recursive: bool) -> list[dict] | None:
        """Tree listing under `path` ('' = root), or None if `path` is not a folder of the repo."""
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and prefix.rstrip("/") not in self.folders():
            return None

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        entries: list[dict] = [
            {"type": "directory", "oid": hashlib.sha1(f"{self.commit}:{d}".encode()).hexdigest(), "size": 0, "path": d}
            for d in self.folders()
            if wanted(d)
        ]
        entries += [f.tree_entry() for p, f in self.files.items() if wanted(p)]
        return entries


# --------------------------------------------------------------------------------------------------------------------
# Knobs and records
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Fault:
    path_glob: str
    status: int
    methods: frozenset[str] | None
    remaining: int | None  # None = forever
    error_code: str | None

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and fnmatch.fnmatchcase(path, self.path_glob)


@dataclass
class Answer:
    """A canned answer for requests matching `path_glob`: what a hostile mirror may send. `body` is bytes or a
    callable giving an iterable of byte pieces (an endless one is cut off after `MAX_HOSTILE_BYTES`). Without a
    Content-Length in `headers` the body ends when the connection closes. `sent` counts the body bytes written."""

    path_glob: str
    status: int
    headers: dict[str, str]
    body: bytes | Callable[[], Iterable[bytes]]
    remaining: int | None
    sent: int = 0


MAX_HOSTILE_BYTES = 1 << 30  # an endless body stops here, so a client that never stops reading fails, not hangs


def endless(prefix: bytes = b"", piece: bytes = b"\0" * _CHUNK_SIZE) -> Callable[[], Iterable[bytes]]:
    """A body of `prefix` followed by `piece` repeated without end."""

    def pieces() -> Iterable[bytes]:
        if prefix:
            yield prefix
        while True:
            yield piece

    return pieces


@functools.lru_cache(maxsize=2)
def gzip_bomb(decoded_bytes: int) -> bytes:
    """`decoded_bytes` of spaces, gzip-compressed to about a thousandth of that."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as f:
        block = b" " * (1 << 20)
        for _ in range(decoded_bytes >> 20):
            f.write(block)
    return out.getvalue()


@dataclass
class _Cut:
    at_byte: int
    remaining: int | None  # None = forever


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # decoded URL path, without query
    query: dict[str, list[str]]
    range: str | None
    status: int
    authorization: bool  # whether the request carried an Authorization header (a token)
    body_bytes: int  # body bytes the answer carries (file bytes for /resolve, a cut included)


@dataclass
class _State:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: list[_Fault] = field(default_factory=list)
    cuts: dict[tuple[str, str], _Cut] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)
    honor_range: bool = True
    seconds_per_chunk: float = 0.0  # throttle: a pause after each 64 KiB of a file
    bytes_sent: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    requests: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


# --------------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, state: _State):
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (as one refusing a hostile answer does) is not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_all_connections(self) -> None:
        """Drop keep-alive connections too, so a stopped hub really looks down (connection refused / reset)."""
        with self.connections_lock:
            connections, self.connections = self.connections, set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub
    server: _Server

    # -- plumbing ----------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    @property
    def state(self) -> _State:
        return self.server.state

    def _record(self, status: int, body_bytes: int) -> None:
        with self.state.lock:
            self.state.requests.append(
                RequestRecord(
                    self.command,
                    self._path,
                    self._query,
                    self.headers.get("Range"),
                    status,
                    "Authorization" in self.headers,
                    body_bytes,
                )
            )

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        sent = len(body) if self.command != "HEAD" else 0
        self._record(status, sent)  # before the body: a client that has the answer finds it recorded
        if sent:
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _send_error(self, status: int, error_code: str | None, message: str, headers: dict | None = None) -> None:
        # The client maps X-Error-Code to exception classes (RepoNotFound -> RepositoryNotFoundError,
        # EntryNotFound -> RemoteEntryNotFoundError, RevisionNotFound -> RevisionNotFoundError).
        extra = {"X-Error-Message": message, **(headers or {})}
        if error_code:
            extra["X-Error-Code"] = error_code
        self._send_json({"error": message}, status, extra)

    # -- routing -----------------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self._raw_path = split.path
        self._path = unquote(split.path)
        self._query = parse_qs(split.query)
        try:
            if self._apply_fault() or self._apply_answer():
                return
            if self._raw_path.startswith("/api/models/"):
                self._handle_api(self._raw_path[len("/api/models/") :])
            elif "/resolve/" in self._raw_path:
                self._handle_resolve()
            else:
                self._send_error(404, None, f"Unknown route {self._path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _apply_fault(self) -> bool:
        with self.state.lock:
            fault = next((f for f in self.state.faults if f.matches(self.command, self._path)), None)
            if fault is None:
                return False
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.state.faults.remove(fault)
        headers = {}
        if fault.error_code == "EntryNotFound" and (repo := self._repo_for_resolve()) is not None:
            headers["X-Repo-Commit"] = repo.commit
        self._send_error(fault.status, fault.error_code, f"Injected fault ({fault.status})", headers)
        return True

    def _apply_answer(self) -> bool:
        with self.state.lock:
            answer = next((a for a in self.state.answers if fnmatch.fnmatchcase(self._path, a.path_glob)), None)
            if answer is None:
                return False
            if answer.remaining is not None:
                answer.remaining -= 1
                if answer.remaining <= 0:
                    self.state.answers.remove(answer)
        delimited = "Content-Length" not in answer.headers  # the body ends when the connection closes
        self.send_response(answer.status)
        for name, value in {**answer.headers, **({"Connection": "close"} if delimited else {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self._record(answer.status, 0)
        pieces = [answer.body] if isinstance(answer.body, bytes) else answer.body()
        if self.command == "GET":
            for piece in pieces:
                if answer.sent >= MAX_HOSTILE_BYTES:
                    break
                with self.state.lock:
                    answer.sent += len(piece)
                self.wfile.write(piece)
        self.wfile.flush()
        if delimited:
            self.close_connection = True
        return True

    def _find_repo(self, repo_id: str) -> Repo | None:
        with self.state.lock:
            return self.state.repos.get(repo_id)

    def _repo_for_resolve(self) -> Repo | None:
        return self._find_repo(unquote(self._raw_path.lstrip("/").split("/resolve/", 1)[0]))

    def _repo_at(self, repo_part: str, revision: str) -> tuple[Repo, str] | None:
        """The repo and the commit `revision` names, or None once a 404 has been sent."""
        repo = self._find_repo(unquote(repo_part))
        if repo is None:
            self._send_error(404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.resolve_revision(unquote(revision))
        if commit is None:
            self._send_error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
            return None
        return repo, commit

    def _handle_api(self, rest: str) -> None:
        # rest = "{repo_id}" | "{repo_id}/revision/{rev}" | "{repo_id}/tree/{rev}[/{path}]"
        kind, revision, sub_path = "info", "main", ""
        if "/tree/" in rest:
            repo_part, tail = rest.split("/tree/", 1)
            revision, _, sub_path = tail.partition("/")
            kind = "tree"
        elif "/revision/" in rest:
            repo_part, revision = rest.split("/revision/", 1)
        else:
            repo_part = rest
        found = self._repo_at(repo_part, revision)
        if found is None:
            return
        repo, commit = found
        if kind == "info":
            with_metadata = self._query.get("blobs", ["false"])[0].lower() == "true"
            return self._send_json(repo.model_info(with_metadata))
        recursive = self._query.get("recursive", ["false"])[0].lower() == "true"
        entries = repo.tree(unquote(sub_path), recursive)
        if entries is None:
            return self._send_error(404, "EntryNotFound", f"{unquote(sub_path)} does not exist on {revision}")
        self._send_json(entries)

    def _handle_resolve(self) -> None:
        repo_part, tail = self._raw_path.lstrip("/").split("/resolve/", 1)
        revision, _, filename = tail.partition("/")
        found = self._repo_at(repo_part, revision)
        if found is None:
            return
        repo, commit = found
        entry = repo.files.get(unquote(filename))
        if entry is None:
            return self._send_error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        self._serve_file(repo, commit, entry)

    def _serve_file(self, repo: Repo, commit: str, entry: RepoFile) -> None:
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.is_lfs:  # what the Hub adds for LFS files (it would also redirect to a CDN; not needed here)
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)

        start, end, status = 0, entry.size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and self.state.honor_range:
            parsed = _parse_range(range_header, entry.size)
            if parsed is None:
                return self._send_error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{entry.size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)

        stop = end + 1
        if self.command == "GET":
            with self.state.lock:
                cut = self.state.cuts.get((repo.repo_id, entry.path))
                if cut is not None and cut.at_byte < stop:
                    stop = max(start, cut.at_byte)
                    if cut.remaining is not None:
                        cut.remaining -= 1
                        if cut.remaining <= 0:
                            del self.state.cuts[(repo.repo_id, entry.path)]

        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._record(status, stop - start if self.command == "GET" else 0)  # what this answer carries
        if self.command == "GET":
            self._stream(repo, entry, start, stop)
        if stop <= end:  # injected cut: Content-Length promised more than we sent => drop the connection
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _stream(self, repo: Repo, entry: RepoFile, start: int, stop: int) -> int:
        sent = 0
        with entry.local_path.open("rb") as f:
            f.seek(start)
            while sent < stop - start:
                chunk = f.read(min(_CHUNK_SIZE, stop - start - sent))
                if not chunk:
                    break
                with self.state.lock:  # counted before it leaves, so a client that has it finds it counted
                    self.state.bytes_sent[(repo.repo_id, entry.path)] += len(chunk)
                self.wfile.write(chunk)
                sent += len(chunk)
                if self.state.seconds_per_chunk:
                    time.sleep(self.state.seconds_per_chunk)
        return sent


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single `bytes=` range into an inclusive (start, end), or None if unsatisfiable/unsupported."""
    match = _RANGE_RE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last or int(last) == 0:
            return None
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return None
    return start, end


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


class FakeHub:
    """A fake Hub on 127.0.0.1, running in a background thread. Can be stopped and restarted on the same port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self._state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self._state)
        self.port = self._server.server_address[1]  # keep the port so a restart reuses it
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: afterwards clients get 'connection refused'."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_all_connections()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- content -----------------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: str | os.PathLike, lfs_suffixes=DEFAULT_LFS_SUFFIXES) -> Repo:
        """Serve `folder` as model repo `repo_id` (re-call after changing files: the commit hash changes)."""
        repo = Repo.from_folder(repo_id, folder, lfs_suffixes)
        with self._state.lock:
            self._state.repos[repo_id] = repo
        return repo

    def repo(self, repo_id: str) -> Repo:
        with self._state.lock:
            return self._state.repos[repo_id]

    # -- knobs -------------------------------------------------------------------------------------------------------

    def fail(
        self,
        path_glob: str,
        status: int = 500,
        *,
        methods: set[str] | None = None,
        times: int | None = None,
        error_code: str | None = None,
    ) -> None:
        """Answer `status` to requests whose decoded URL path matches `path_glob` (fnmatch, `*` spans `/`).

        `methods` restricts to e.g. {"HEAD"} or {"GET"}; `times` = number of requests to fail (None = forever).
        `error_code` goes to the X-Error-Code header the client maps to exceptions (e.g. "RepoNotFound",
        "EntryNotFound", "RevisionNotFound"); for 404 it defaults to "EntryNotFound" on /resolve/ paths and to
        "RepoNotFound" on /api/ paths. Pass error_code="" for a bare 404 without the header.
        """
        if error_code is None and status == 404:
            error_code = "RepoNotFound" if path_glob.startswith("/api/") else "EntryNotFound"
        fault = _Fault(
            path_glob,
            int(HTTPStatus(status)),
            frozenset(m.upper() for m in methods) if methods else None,
            times,
            error_code or None,
        )
        with self._state.lock:
            self._state.faults.append(fault)

    def answer(
        self,
        path_glob: str,
        body: bytes | Callable[[], Iterable[bytes]] = b"",
        status: int = 200,
        headers: dict[str, str] | None = None,
        *,
        times: int | None = None,
    ) -> Answer:
        """Answer requests whose decoded URL path matches `path_glob` with `status`, `headers` and `body` as given
        (see `Answer`); `times` = number of requests (None = forever). Returns the rule, whose `sent` counts."""
        answer = Answer(path_glob, status, dict(headers or {}), body, times)
        with self._state.lock:
            self._state.answers.append(answer)
        return answer

    def cut(self, repo_id: str, filename: str, at_byte: int, *, times: int | None = 1) -> None:
        """Make GETs of a file stop once absolute file offset `at_byte` is reached, then drop the connection.

        Full Content-Length is announced, so the client sees a truncated body. `times` = number of GET responses
        affected (None = forever; a resume request starting at/after `at_byte` then gets 0 bytes and is cut too).
        """
        with self._state.lock:
            self._state.cuts[(repo_id, filename)] = _Cut(at_byte, times)

    @property
    def honor_range(self) -> bool:
        return self._state.honor_range

    @honor_range.setter
    def honor_range(self, value: bool) -> None:
        self._state.honor_range = value

    def throttle(self, seconds_per_chunk: float) -> None:
        """Pause this long after every 64 KiB sent (0: full speed), so a client can be stopped mid-file."""
        with self._state.lock:
            self._state.seconds_per_chunk = seconds_per_chunk

    def clear_faults(self) -> None:
        with self._state.lock:
            self._state.faults.clear()
            self._state.cuts.clear()
            self._state.answers.clear()
            self._state.honor_range = True
            self._state.seconds_per_chunk = 0.0

    # -- observation -------------------------------------------------------------------------------------------------

    def bytes_sent(self, repo_id: str, filename: str) -> int:
        """File-body bytes actually written for this file, across all GETs since the last reset."""
        with self._state.lock:
            return self._state.bytes_sent[(repo_id, filename)]

    @property
    def requests(self) -> list[RequestRecord]:
        with self._state.lock:
            return list(self._state.requests)

    def reset_stats(self) -> None:
        with self._state.lock:
            self._state.bytes_sent.clear()
            self._state.requests.clear()

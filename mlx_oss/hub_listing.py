"""A hub's list of a repository's files, read as untrusted input.

`HF_ENDPOINT` may point at any mirror, so the listing (`/api/models/NAME/revision/REV?blobs=true`) is checked
before anything in it becomes a path or a request: the body is read to a bounded size (and a compressed one
decoded to that bound, so a gzip bomb stays small), parsed with `parse_json`, and every field we use is checked
for its type and form. A checksum names a file in `blobs/` and a commit a folder in `snapshots/`, so they must be
lowercase hex of the right length; a file path must stay inside the snapshot. Anything else is refused in one line
naming the listing and the field: a mirror cannot make us write outside the cache or fetch without end.
"""

from __future__ import annotations

import fnmatch
import re
import time
import zlib
from dataclasses import dataclass

from .errors import MlxOssError
from .json_input import parse_json
from .store import is_commit, is_safe_file, shown

# What the product loads: top-level config, weights, tokenizer and template files. The hub repos of gpt-oss also
# carry `original/` (OpenAI's own format) and `metal/` copies, which are left out with every other folder.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.md", "LICENSE*", "USAGE_POLICY*", "tokenizer*")
MAX_LISTING_BYTES = 32 << 20  # gpt-oss's listing is 5 KB; the largest model repos list a few MB
MAX_FILES = 1000  # files to download: gpt-oss-120b has 22
LISTING_DEADLINE_S = 120.0  # a listing trickling in a byte at a time ends here
SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(MlxOssError):
    """The hub could not be reached, refused the request, or sent something that failed verification."""


class ListingError(HubError):
    """The hub's answer about a repository is not a listing we can use."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # large (LFS) files
    blob_id: str | None  # git blob sha1: the checksum of small files

    @property
    def etag(self) -> str:
        """The name the hub cache gives its blob: the sha256 of large files, the git blob id of the others."""
        return self.sha256 or self.blob_id or ""


def wanted(path: str) -> bool:
    return "/" not in path and any(fnmatch.fnmatch(path, pattern) for pattern in ALLOW_PATTERNS)


def read_body(response, source: str, limit: int = MAX_LISTING_BYTES, deadline_s: float = LISTING_DEADLINE_S) -> bytes:
    """The body of a streamed `response`, at most `limit` bytes once decoded, within `deadline_s`. gzip and deflate
    are decoded here, a bounded piece at a time; any other encoding is refused."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, told apart by zlib
    elif encoding not in ("", "identity"):
        raise ListingError(f"{source}: sent in an encoding we did not ask for ({shown(encoding)})")
    else:
        decoder = None
    declared = response.headers.get("Content-Length", "")
    if decoder is None and declared.isdigit() and int(declared) > limit:
        raise ListingError(f"{source}: the answer is {int(declared)} bytes, more than {limit} a listing may be")
    body, end = bytearray(), time.monotonic() + deadline_s
    for raw in response.iter_raw(64 << 10):
        data = raw
        while decoder is not None and data:  # at most what is still allowed, plus one byte to notice excess
            piece = decoder.decompress(data, limit + 1 - len(body))
            body += piece
            data = decoder.unconsumed_tail
            if len(body) > limit or not piece:
                break
        if decoder is None:
            body += data
        if len(body) > limit:
            raise ListingError(f"{source}: the answer is more than {limit} bytes, more than a listing may be")
        if time.monotonic() > end:
            raise ListingError(f"{source}: the answer did not arrive within {deadline_s:.0f} s")
    return bytes(body)


def parse_listing(body: bytes, source: str) -> tuple[str, list[RemoteFile]]:
    """The commit and the wanted files of a model-info answer (`?blobs=true`), each field checked."""
    try:
        info = parse_json(body)
    except ValueError as e:  # JsonInputError, or an integer too long for Python to convert
        raise ListingError(f"{source}: {e}") from None
    if not isinstance(info, dict):
        raise ListingError(f"{source}: expected a JSON object describing the model, got {type(info).__name__}")
    commit, siblings = info.get("sha"), info.get("siblings")
    if not is_commit(commit):
        raise ListingError(f"{source}: field 'sha' is not a commit hash (40 lowercase hex digits): {shown(commit)}")
    if not isinstance(siblings, list):
        raise ListingError(f"{source}: field 'siblings' is not a list of files: {shown(type(siblings).__name__)}")
    files: dict[str, RemoteFile] = {}
    for i, entry in enumerate(siblings):
        where = f"{source}: siblings[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("rfilename"), str):
            raise ListingError(f"{where} is not a file entry with an 'rfilename'")
        path = entry["rfilename"]
        if not wanted(path):
            continue
        if not is_safe_file(path) or path in files:
            raise ListingError(f"{where}: file name {shown(path)} is not a plain file name of this repository")
        files[path] = _remote_file(entry, path, f"{where} ({shown(path)})")
        if len(files) > MAX_FILES:
            raise ListingError(f"{source}: lists more than {MAX_FILES} files to download; not a model repository")
    return commit, list(files.values())


def _remote_file(entry: dict, path: str, where: str) -> RemoteFile:
    size, blob_id, lfs = entry.get("size"), entry.get("blobId"), entry.get("lfs")
    if type(size) is not int or size < 0:
        raise ListingError(f"{where}: field 'size' is not a number of bytes: {shown(size)}")
    if blob_id is not None and not is_commit(blob_id):
        raise ListingError(f"{where}: field 'blobId' is not a git blob id (40 lowercase hex digits): {shown(blob_id)}")
    sha256 = None
    if lfs is not None:
        if not isinstance(lfs, dict):
            raise ListingError(f"{where}: field 'lfs' is not an object")
        sha256 = lfs.get("sha256")
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise ListingError(f"{where}: field 'lfs.sha256' is not 64 lowercase hex digits: {shown(sha256)}")
    elif blob_id is None:
        raise ListingError(f"{where}: no checksum listed (neither 'lfs.sha256' nor 'blobId')")
    return RemoteFile(path, size, sha256, blob_id)

"""Opening the files a checkpoint names: regular files only, inside the model directory, read with a bound.

A FIFO named `model.safetensors` blocks the first `open()` forever, and a device can be read without end, so
every file is opened without blocking and checked to be a regular file (a symlink to one is fine, as the
Hugging Face cache links every snapshot file into its `blobs/`) before a byte is read. File names that come
from inside a checkpoint (the index's shard names) must be plain relative names below the model directory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .json_input import parse_json

KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The path exists but is a FIFO, device, socket or directory."""


class FileTooLarge(ValueError):
    """A file holds more bytes than its kind ever needs."""


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of the regular file at `path` (following symlinks).

    Raises FileNotFoundError, NotRegularFile, or another OSError; never blocks on a FIFO.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENXIO and stat.S_ISSOCK(_mode_or_zero(path)):  # the OS's words: "No such device"
            raise NotRegularFile("a socket, not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(_not_regular(mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _not_regular(mode: int) -> str:
    """What a file that is not a regular one is, in a few words."""
    kind = next((kind for is_kind, kind in KINDS if is_kind(mode)), None)
    return f"{kind}, not a regular file" if kind else "not a regular file"


def _mode_or_zero(path: str | Path) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def read_regular(path: str | Path, limit: int) -> bytes:
    """The whole regular file at `path`, refused (FileTooLarge) when it holds more than `limit` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FileTooLarge(f"{size} bytes, more than the {limit} such a file can hold")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FileTooLarge(f"more than the {limit} bytes such a file can hold")
        return data
    finally:
        os.close(fd)


def read_json(path: Path, limit: int, error: type[Exception], missing: str | None = None) -> Any:
    """The JSON in the regular file at `path` (at most `limit` bytes), every failure raised as `error("PATH: why")`:
    `missing` where there is no file (else the system's reason, as for any file that cannot be read), or why its
    bytes are not the JSON we read (too large, not UTF-8, invalid, nested too deeply)."""
    try:
        return parse_json(read_regular(path, limit))
    except FileNotFoundError as e:
        raise error(f"{path}: {missing or f'cannot read: {e.strerror or e}'}") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # FileTooLarge, JsonInputError
        raise error(f"{path}: {e}") from None


def printable(text: str, limit: int = 120) -> str:
    """A name from inside a file, fit for a one-line message: control characters escaped, cut at `limit`."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def confined_name(name: object) -> str | None:
    """Why `name` (from inside a checkpoint) is not a plain relative file name below its directory, or None.

    Absolute paths, `..` steps, backslashes and empty names are refused by the name alone, so the check holds
    whatever symlinks the directory has (the hub cache's own links into `../../blobs/` stay allowed).
    """
    if not isinstance(name, str):
        return f"is {type(name).__name__} {printable(repr(name))}, not a file name"
    shown = printable(repr(name))
    if not name or "\x00" in name or "\\" in name:
        return f"{shown} is not a file name"
    if PurePosixPath(name).is_absolute():
        return f"{shown} is an absolute path; shards must lie inside the model directory"
    if any(part in ("..", ".") for part in name.split("/")):
        return f"{shown} steps outside the model directory; shards must lie inside it"
    return None

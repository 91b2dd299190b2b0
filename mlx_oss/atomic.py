"""Writing a file or a whole model directory so that it appears complete or not at all.

`write_atomically` replaces one small file (settings, a download record, the unpacked vocabulary): a reader or a
crash sees the old file or the new one, never a part.

`atomic_directory` writes a directory in a hidden `.NAME.partial-PID` folder beside the destination, renamed into
place at the end. A process killed outright (SIGKILL, a power cut) cannot remove its folder, so each writer holds
an exclusive `flock` on its folder while it works, and every later `atomic_directory` in the same parent removes
the leftovers nobody holds. A PID alone would not do: it may since belong to another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MlxOssError

SPACE_MARGIN = 64 * 1024 * 1024  # headroom for metadata and the file system's own needs
PARTIAL = re.compile(r"\.(.+)\.partial-(\d+)")
# A folder just made is locked a moment later: one younger than this, of a live PID, is left alone unlocked.
FRESH_SECONDS = 60


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through a hidden temporary file in the same folder, flushed to disk
    and then renamed over `path`: a rename within one file system is atomic, so `path` is whole, old or new.

    The temporary name is unique, so two processes writing at once never mix their bytes (the last rename wins),
    and it is created with the default permissions, as `open` would. On any failure (a full disk, Ctrl-C) the
    temporary file is removed and the error raised. A symlink at `path` is replaced, not followed: a caller that
    keeps links resolves `path` first. The folder must exist."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with open(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def ensure_free_space(directory: Path, needed: int) -> None:
    """Refuse before the first byte if `directory`'s file system cannot hold `needed` more bytes (once the leftovers
    of killed writers there, which may hold gigabytes, are removed)."""
    remove_leftovers(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise MlxOssError(
            f"{directory}: not enough free disk space: need {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free on that drive"
        )


@contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `destination`; rename it into place only on success.

    On any exception (Ctrl-C included) the temporary directory is removed, so `destination` is
    either absent or complete. An existing `destination` is never touched.
    """
    destination = Path(destination)
    if destination.exists():
        raise MlxOssError(f"{destination}: already exists; remove it or choose another destination")
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(destination.parent)
    temporary = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        lock = _lock(temporary)
    except OSError:  # a file system without locks: the folder is written as before, and never taken for a leftover
        lock = None
    try:
        yield temporary
        os.rename(temporary, destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _lock(folder: Path) -> int:
    """An exclusive flock on `folder`, held for as long as the returned descriptor is open."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove the `.NAME.partial-PID` folders in `parent` that no process is writing; return them.

    A folder is left alone while a writer holds its lock, and while it is younger than `FRESH_SECONDS` and its
    PID is alive (between its `mkdir` and its lock). Symlinks and files are never touched.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = PARTIAL.fullmatch(name)
        if not match:
            continue
        path = parent / name
        try:
            fd = _lock(path)
        except OSError:  # held by a live writer, a symlink or file (ELOOP, ENOTDIR), or gone already
            continue
        try:
            if _alive(int(match.group(2))) and time.time() - os.fstat(fd).st_mtime < FRESH_SECONDS:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # another user's process exists; an impossible PID is no process
    return True

"""What went wrong with a file, in words a user can act on.

One disk can fail in several ways that each call for something different from the user: free space, fix a
permission, close the other program that holds the file, move a folder out of the way. A single catch-all hint
("is mlx-oss already running?") sent people after the wrong cause, so each cause gets its own words here, taken
from SQLite's result code or the OS's errno, never from matching the text of a message. A file that cannot be
used as it is gets set aside under a name from `aside_path`.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

# SQLite's primary result codes (https://sqlite.org/rescode.html) and what each means for the user.
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY = 3, 5, 6, 8
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN = 10, 11, 13, 14
SQLITE_AUTH, SQLITE_NOTADB = 23, 26
DAMAGED_CODES = (SQLITE_CORRUPT, SQLITE_NOTADB)

_OS_WORDS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "it does not exist",
}


def sentence(text: str) -> str:
    """`text` as a sentence of a message: capitalised, with one full stop (not after a question)."""
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else f"{text}."


def os_error_words(error: OSError) -> str:
    """`error` in words, e.g. "the disk is full (No space left on device)"."""
    reason = error.strerror or str(error)
    words = _OS_WORDS.get(error.errno)
    return f"{words} ({reason})" if words and words.lower() != reason.lower() else (words or reason)


def sqlite_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_damaged(error: sqlite3.Error) -> bool:
    """A file that is not (or no longer) a database: the one case where setting the file aside helps."""
    return sqlite_code(error) in DAMAGED_CODES


def sqlite_error_words(error: sqlite3.Error, path: Path) -> str:
    """`error` from the database at `path` in words; SQLite's own text follows in parentheses."""
    code = sqlite_code(error)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):  # the one cause where the hint fits
        return f"another program is using it ({error}); is mlx-oss already running?"
    if code in (SQLITE_PERM, SQLITE_AUTH):
        words = "permission denied"
    elif code == SQLITE_READONLY:
        words = _read_only_words(path)
    elif code == SQLITE_FULL:
        words = "the disk is full"
    elif code == SQLITE_NOTADB:
        words = "it is not a database"
    elif code == SQLITE_CORRUPT:
        words = "it is damaged"
    elif code == SQLITE_CANTOPEN:
        words = _cannot_open_words(path)
    elif code == SQLITE_IOERR:
        words = "the disk reported an error reading or writing it"
    else:
        words = ""
    return f"{words} ({error})" if words else str(error)


def _read_only_words(path: Path) -> str:
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return "the file system is read-only"
    except OSError:
        pass
    return "the file or its folder is read-only"


def _cannot_open_words(path: Path) -> str:
    """SQLite says only "unable to open database file"; the file system says which of the usual causes it is."""
    if path.is_dir():
        return "it is a folder, not a file"
    if path.exists() and not path.is_file():
        return "it is not a regular file"
    if not path.parent.is_dir():
        return "its folder does not exist"
    if (path.exists() and not os.access(path, os.R_OK)) or not os.access(path.parent, os.W_OK | os.X_OK):
        return "permission denied"
    return "the file cannot be opened"


def aside_path(path: Path, why: str) -> Path:
    """A free name beside `path` to set a file the app cannot use aside under: `<name>.<why>-<date>-<time>`, then
    `-2`, `-3`, ... when taken, so an earlier copy is never replaced."""
    stamp = f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, number = path.with_name(stamp), 1
    while aside.exists() or aside.is_symlink():
        number += 1
        aside = path.with_name(f"{stamp}-{number}")
    return aside

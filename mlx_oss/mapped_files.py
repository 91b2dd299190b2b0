"""Saying which checkpoint file changed when a memory-mapped read kills the process.

A memory-mapped file cut short while mapped (a shard re-downloaded or edited in place) raises SIGBUS at the
first read past its new end, inside NumPy or the compiled kernels, often on a thread that does not hold the
GIL: Python cannot recover, and a handler that ran Python there could deadlock against the thread that holds
it. So the words come from outside: the first file mapped starts one small watcher process
(`mlx_oss.mapped_watcher`) that is told each mapped file's size and inode. When this process ends normally it
says goodbye; when it dies without one, the watcher stats the files and names any that is now shorter than it
was, on the stderr the two share. Between passes `Checkpoint.check_unchanged` catches the change before any read.

The watcher is not this process's parent, so it cannot learn how this process ended; `faulthandler` tells it
instead: its C signal handler (safe where Python is not) writes "Fatal Python error: Bus error" down the pipe,
then lets the signal end the process as it would have. A process ended otherwise (SIGTERM, SIGKILL) writes
nothing, and the watcher then says nothing: a file changed on disk did not end it. Where faulthandler already
writes elsewhere (`-X faulthandler`, a test runner) it is left alone and the watcher cannot tell the causes apart.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import subprocess
import sys
import threading
from pathlib import Path

BYE = "bye"
FAULT = "Fatal Python error: "  # what faulthandler writes first, then the signal's name: "Bus error"
TOLD_FAULTS = "--told-faults"  # the watcher's flag: faulthandler writes to it
_lock = threading.Lock()
_watcher: subprocess.Popen | None = None
_failed = False
_faults_told = False


def changed_message(path: Path | str, was: int, now: int) -> str:
    return f"{path}: changed on disk since it was loaded (was {was} bytes, now {now}); load the model again"


def watch(path: Path, size: int, inode: int) -> None:
    """Have the watcher name `path` if this process dies while the file `inode` there is shorter than `size` bytes
    (the size and inode of the open file that is mapped, so a file put at `path` since is not taken for it)."""
    global _watcher, _failed, _faults_told
    line = f"{size} {inode} {os.fspath(Path(path).absolute())}\n"
    with _lock:
        if _failed or "\n" in line[:-1]:
            return
        try:
            if _watcher is None:
                tell_faults = not faulthandler.is_enabled()
                _watcher = subprocess.Popen(
                    [sys.executable, "-m", "mlx_oss.mapped_watcher", *([TOLD_FAULTS] if tell_faults else [])],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    text=True,
                    encoding="utf-8",
                    errors="surrogateescape",
                )
                atexit.register(_goodbye)
                if tell_faults:
                    faulthandler.enable(_watcher.stdin, all_threads=False)
                    _faults_told = True
            _watcher.stdin.write(line)
            _watcher.stdin.flush()
        except (OSError, ValueError):  # no interpreter to start (an odd bundle), or the watcher is gone
            _failed = True


def _goodbye() -> None:
    with _lock:
        if _watcher is not None:
            if _faults_told:  # before the pipe closes: its descriptor's number may then name another file
                faulthandler.disable()
            try:
                _watcher.stdin.write(BYE + "\n")
                _watcher.stdin.close()
                _watcher.wait(timeout=2)  # it leaves at once; reaped, it is no zombie nor a ResourceWarning
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass


def shortened(watched: list[tuple[int, int, str]]) -> list[str]:
    """Messages for the watched files whose inode is still at their path and is now shorter than it was."""
    lines = []
    for size, inode, path in watched:
        try:
            st = os.stat(path)
        except OSError:
            continue  # removed: a file unlinked while mapped stays whole for whoever maps it
        if st.st_ino == inode and st.st_size < size:
            lines.append(changed_message(path, size, st.st_size))
    return lines

"""The watcher process of `mapped_files`, run as `python -m mlx_oss.mapped_watcher` (a module of its own, so
that the package never imports it before `-m` runs it)."""

from __future__ import annotations

import signal
import sys

from mlx_oss.mapped_files import BYE, shortened


def serve() -> None:
    """Read `SIZE INODE PATH` lines until goodbye (quiet) or end of input (the process died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole process group
    watched: list[tuple[int, int, str]] = []
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line == BYE:
            return
        size, inode, path = line.split(" ", 2)
        watched.append((int(size), int(inode), path))
    for message in shortened(watched):
        sys.stderr.write(f"mlx_oss: the process reading the model was stopped (bus error): {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    sys.stderr.reconfigure(errors="backslashreplace")
    serve()

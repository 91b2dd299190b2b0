"""The watcher process of `mapped_files`, run as `python -m mlx_oss.mapped_watcher` (a module of its own, so
that the package never imports it before `-m` runs it)."""

from __future__ import annotations

import signal
import sys

from mlx_oss.mapped_files import BYE, FAULT, TOLD_FAULTS, shortened


def serve(told_faults: bool) -> None:
    """Read `SIZE INODE PATH` lines until goodbye (quiet), a fatal signal's report from faulthandler, or end of
    input (the process died). With `told_faults`, a death that faulthandler did not report was no fault (a kill)
    and is not the model's files' doing: quiet."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole process group
    watched: list[tuple[int, int, str]] = []
    fault = None
    for line in sys.stdin:
        if FAULT in line:  # anywhere: the signal may have cut a line being written
            fault = line.split(FAULT, 1)[1].strip()
            break
        line = line.rstrip("\n")
        if line == BYE:
            return
        size, inode, path = line.split(" ", 2)
        watched.append((int(size), int(inode), path))
    if fault is None and told_faults:
        return
    cause = "ended abruptly" if fault is None else f"was stopped ({fault.lower()})"  # faulthandler: "Bus error"
    for message in shortened(watched):
        sys.stderr.write(f"mlx_oss: the process reading the model {cause}: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    sys.stderr.reconfigure(errors="backslashreplace")
    serve(TOLD_FAULTS in sys.argv[1:])

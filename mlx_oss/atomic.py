"""Writing a whole model directory so that it appears complete or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MlxOssError

SPACE_MARGIN = 64 * 1024 * 1024  # headroom for metadata and the file system's own needs


def ensure_free_space(directory: Path, needed: int) -> None:
    """Refuse before the first byte if `directory`'s file system cannot hold `needed` more bytes."""
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
    temporary = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        yield temporary
        os.rename(temporary, destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

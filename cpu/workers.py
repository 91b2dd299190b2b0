"""Threads for the plain NumPy path, whose slow steps (`np.take`, ufuncs, one-thread BLAS) each run on one core with
the GIL released: the cores are shared by running independent pieces in threads, with BLAS kept to one thread
meanwhile (its own threads on top would oversubscribe the cores)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import ThreadpoolController

T = TypeVar("T")
R = TypeVar("R")


class Workers:
    def __init__(self, count: int | None = None):
        self.count = count or usable_cores()
        self._pool = ThreadPoolExecutor(max_workers=self.count, thread_name_prefix="mlx-oss-numpy")
        self._blas = ThreadpoolController()

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[function(item) for item in items]`, in the threads, BLAS on one thread each."""
        with self._blas.limit(limits=1, user_api="blas"):
            return list(self._pool.map(function, items))


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which container limits set), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1

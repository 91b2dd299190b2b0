"""Threads for the NumPy backend's steps that run on one core with the GIL released (`np.take`, ufuncs, one-thread
BLAS): the cores are shared by running independent pieces in threads (the plain path's experts and widened BF16
blocks, a prompt's attention heads), with BLAS kept to one thread meanwhile (its own threads on top would
oversubscribe the cores)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
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
        with self.one_blas_thread():
            return list(self._pool.map(function, items))

    def one_blas_thread(self) -> AbstractContextManager:
        """A context in which BLAS runs on the calling thread alone.

        OpenBLAS's own threads spin on for a while after each call they share (whatever `OPENBLAS_THREAD_TIMEOUT`
        says), taking a core from whatever runs next: the compiled kernels or these threads."""
        return self._blas.limit(limits=1, user_api="blas")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which container limits set), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1

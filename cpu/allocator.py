"""Keep freed memory in the C heap for the next allocation of its size, where the C library is glibc.

A prompt allocates the same large scratch arrays layer after layer (unpacked weights, laid-out inputs, the experts'
sums), megabytes each. glibc serves each of these over 128 KB (its default, raised only as it sees frees) with a
fresh `mmap` and returns it on free, so every allocation's pages fault in again, zeroed by the kernel: 100-200
thousand faults in a 128-token 20b prompt, several percent of its time. Served from the heap and kept there when
freed, they fault once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): larger arrays are mapped as before
TRIM_THRESHOLD = 256 << 20  # free memory the heap's top may keep before it is given back to the system


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations up to `MMAP_THRESHOLD` from its heap and keep up to `TRIM_THRESHOLD` of freed
    memory; whether it took both. Elsewhere (macOS, musl) nothing changes."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

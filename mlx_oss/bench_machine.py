"""What the benchmark says about the machine, so that figures from different computers can be compared: the CPU's
model and the vector instructions it offers, and how fast its memory reads.

Decoding reads every active weight once per token, so the memory's read speed bounds it: a figure is best judged
as a share of that ceiling, which differs between machines of the same kind.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time

import numpy as np

# The instruction-set extensions that matter to the kernels, in the order people name them.
VECTOR_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "i8mm",
    "bf16",
)


def cpu_model() -> str:
    """The CPU's marketing name (`Intel(R) Xeon(R) Processor`, `AMD EPYC 9R14`, `Apple M2`), or the machine type."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    for line in _cpuinfo_lines():
        if line.startswith(("model name", "Model")) and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def vector_flags() -> list[str]:
    """The vector extensions of `VECTOR_FLAGS` this CPU reports (Linux's /proc/cpuinfo; empty where unknown)."""
    present: set[str] = set()
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")) and ":" in line:
            present.update(line.split(":", 1)[1].split())
            break
    return [flag for flag in VECTOR_FLAGS if flag in present]


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def read_bandwidth_gb_s(size_bytes: int = 1 << 30, rounds: int = 5) -> float | None:
    """Memory read speed in GB/s with every core reading its share of a buffer far larger than the caches (the best
    of `rounds`), through the decoding kernels' own read loop (`kernels.matvec` over a float32 matrix, with their
    prefetching); None without the kernels. A plain parallel sum read a fifth slower on the same machine: without
    prefetches a core keeps too few reads in flight, so it measured the loop, not the memory."""
    try:
        from .cpu import kernels
    except ImportError:
        return None
    if kernels.ISA is None:
        return None
    width = 4096
    weights = np.ones((max(1, size_bytes // (4 * width)), width), dtype=np.float32)
    x = np.ones((1, width), dtype=np.float32)
    kernels.matvec(weights, x)  # compile, and fault the pages in
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        kernels.matvec(weights, x)
        best = min(best, time.perf_counter() - start)
    return weights.nbytes / best / 1e9

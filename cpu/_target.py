"""What the compiled kernels are built for: the vector extension this CPU offers numba (or why the plain NumPy
path runs instead), and whether numba may keep the build in its on-disk cache.

`kernels` reads it to decide whether to build; `_numba_kernels` reads it to build for that extension. It imports
neither of them, so neither imports the other back.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
from pathlib import Path

VARIABLE = "MLX_OSS_KERNELS"  # "off" (or 0, no, false) switches the kernels off; "avx2" forces the AVX2 ones,
# "avx512" the AVX-512 ones without AMX (the same build as on a CPU without AMX)

# The AVX2 kernels on a larger CPU, for tests. numba's on-disk cache is keyed by the CPU, not by the kernels'
# width, so a forced build must not share it.
FORCED_AVX2 = os.environ.get(VARIABLE, "").lower() == "avx2"
FORCED_AVX512 = os.environ.get(VARIABLE, "").lower() == "avx512"
CACHE = not FORCED_AVX2  # `kernels` turns it off where numba finds no writable cache folder


def instruction_set() -> tuple[str | None, str, bool]:
    """The vector extension the kernels are built for, or None with the reason they are not used; and whether that
    reason is a numba that is installed but will not import (a damaged install or app bundle, not this CPU)."""
    try:
        import llvmlite
        import llvmlite.binding as llvm
        import numba
    except Exception as e:  # ImportError; also OSError (a library that will not load), RuntimeError (no JIT memory)
        if importlib.util.find_spec("numba") is None:
            return None, "numba is not installed (pip install 'mlx-oss[fast]')", False
        return None, f"numba is installed but does not import ({e})", True
    if tuple(int(part) for part in llvmlite.__version__.split(".")[:2]) < (0, 50):
        return None, f"numba {numba.__version__} is too old for the kernels (pip install 'numba>=0.68')", False
    features = llvm.get_host_cpu_features()
    if FORCED_AVX2:
        features = {"avx2": features.get("avx2"), "fma": features.get("fma")}
        if features["avx2"] and features["fma"]:
            build_as_an_avx2_cpu(numba)
    if features.get("avx512f") and features.get("avx512bw"):
        return "avx512", "numba kernels for AVX-512", False
    if features.get("avx2") and features.get("fma"):
        return "avx2", "numba kernels for AVX2", False
    return None, "no AVX2 or AVX-512 on this CPU", False


def build_as_an_avx2_cpu(numba) -> None:
    """Have numba compile for an AVX2 CPU (Haswell's features), not for this one: built with the host's AVX-512
    features, the AVX2 kernels would use its 32 vector registers and its encodings, which a laptop has not (AVX2
    has 16), so a forced build would not be the one laptops run. numba reads these when it first compiles."""
    numba.config.CPU_NAME = "haswell"
    numba.config.CPU_FEATURES = ""  # the named CPU's own


def amx_permitted() -> bool:
    """Whether this process may use AMX's BF16 tiles: the CPU has them and Linux grants the process their state.

    Linux hands out AMX's 8 KB of tile state only to a process that asks (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)`); an AMX instruction before that kills the process with SIGILL.
    """
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    if FORCED_AVX2 or FORCED_AVX512 or not (features.get("amx-tile") and features.get("amx-bf16")):
        return False
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI's `vpdpbusd` (Intel's since Cascade Lake, AMD's since Zen 4)."""
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("avx512vnni"))


_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def l1_data_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache"), default: int = 48 << 10) -> int:
    """A core's level-1 data cache in bytes, as Linux describes the first CPU's caches in `caches`; `default`
    where it does not (another system, an unreadable or odd entry)."""
    units = {"K": 1 << 10, "M": 1 << 20}
    try:
        for index in sorted(caches.glob("index*")):
            level, kind = ((index / name).read_text().strip() for name in ("level", "type"))
            if level == "1" and kind in ("Data", "Unified"):
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError, IndexError):
        pass
    return default


ISA, DESCRIPTION, BROKEN = instruction_set()
AMX = ISA == "avx512" and amx_permitted()  # prompts' products on AMX tiles (see `_tile_kernels`)
VNNI = ISA == "avx512" and has_vnni()  # MXFP4 products as integer dot products (`_numba_kernels`, `_vnni_tiles`)
if AMX:
    DESCRIPTION += ", decoding's MXFP4 products on VNNI, prompts on AMX" if VNNI else ", prompts on AMX"
elif VNNI:
    DESCRIPTION += ", MXFP4 products on VNNI, prompts' inputs rounded to 16 bits"

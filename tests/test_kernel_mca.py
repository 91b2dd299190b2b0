"""scripts/kernel_mca.py, the developers' model of the decoding kernel on CPUs we cannot time: the loop it hands
llvm-mca is the kernel's unrolled inner loop."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from mlx_oss.cpu import kernels

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kernel_mca.py"


@pytest.fixture(scope="module")
def kernel_mca():
    spec = importlib.util.spec_from_file_location("kernel_mca", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ASSEMBLY = """mxfp4_matvec:
.LBB0_1:
\tvfmadd231ps\t%ymm0, %ymm1, %ymm2
.LBB0_2:
\t.p2align\t4
\tvmovups\t(%rax), %ymm3
\tvfmadd132ps\t(%rbx), %ymm3, %ymm2
\t# a comment
\taddq\t$64, %rax
\tjne\t.LBB0_2
\tjmp\t.LBB0_3
.LBB0_3:
\tvaddps\t%ymm0, %ymm1, %ymm1
\tjne\t.LBB0_1
.LBB0_4:
\tdecq\t%rcx
\tjne\t.LBB0_4
"""


def test_it_picks_the_shortest_loop_that_multiply_adds(kernel_mca):
    loop = kernel_mca.inner_loop(ASSEMBLY)
    assert [line.split()[0] for line in loop] == ["vmovups", "vfmadd132ps", "addq", "jne"]
    with pytest.raises(ValueError, match="no loop"):
        kernel_mca.inner_loop(ASSEMBLY.replace("vfmadd", "vmul"))


@pytest.mark.skipif(not kernels.available(), reason="no compiled kernels here (no numba, or no AVX2)")
def test_the_loop_it_finds_is_the_kernels_unrolled_one(kernel_mca):
    from mlx_oss.cpu import _numba_kernels as k

    asm, isa, per_block = kernel_mca.kernel_asm(None)
    loop = kernel_mca.inner_loop(asm)
    assert isa == k.ISA and per_block == 32 // k.LANES
    assert sum(bool(kernel_mca.FMA.search(line)) for line in loop) == k.UNROLL * per_block
    mca = shutil.which("llvm-mca")
    if mca:  # where LLVM's tools are installed, the model runs on it
        assert kernel_mca.cycles(loop, "skylake-avx512" if isa == "avx512" else "haswell", mca) > 0

"""Cycles a block of the decoding MXFP4 kernel's inner loop on CPUs we cannot time, as LLVM's machine-code analyser
(`llvm-mca`) models them: `python scripts/kernel_mca.py --isa avx2 --build znver3 --model znver3,znver4`.

The kernel is compiled (not run) for `--build`, as numba would compile it on that CPU, and the loop that holds its
multiply-adds goes to `llvm-mca -mcpu=` each of `--model`. A model, not a measurement: on a Xeon that timed 4.0 cycles
a block it gave 3.37, and 1.11x for a change timed there at 1.00x; on a Zen 4 EPYC that timed about 4.7, 4.32. It
says where to look on a CPU we do not have, not what a change will gain. Needs `llvm-mca` (Debian: `apt-get install
llvm-19`, then `--mca llvm-mca-19`; LLVM 14's knows no Zen 4).
An AVX-512 build needs a CPU with AVX-512 to compile on, since the kernels' width follows the host (`_target`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

FMA = re.compile(r"\bvfmadd\w*ps\b")


def inner_loop(asm: str) -> list[str]:
    """The instructions of the shortest loop in `asm` (a label and a later jump back to it) that multiply-adds."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.?L\w+):", line))}
    loops = []
    for i, line in enumerate(lines):
        jump = re.match(r"\s+j\w+\s+(\.?L\w+)\s*$", line)
        if jump and labels.get(jump.group(1), i) < i:
            body = [
                x
                for x in lines[labels[jump.group(1)] + 1 : i + 1]
                if x.strip() and not x.lstrip().startswith((".", "#"))
            ]
            if any(FMA.search(x) for x in body):
                loops.append(body)
    if not loops:
        raise ValueError("no loop with a multiply-add in this assembly")
    return min(loops, key=len)


def kernel_asm(build: str | None) -> tuple[str, str, int]:
    """The assembly of `mxfp4_matvec` compiled for CPU `build` (None: the CPU `_target` builds for), the instruction
    set it was built for, and the multiply-adds a block takes."""
    import numba
    import numpy as np

    from mlx_oss.cpu import _numba_kernels as k

    if build:
        numba.config.CPU_NAME, numba.config.CPU_FEATURES = build, ""  # as on that CPU (read when first compiling)
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    scales = np.zeros((1, 1, 1), np.uint8)
    blocks.flags.writeable = scales.flags.writeable = False  # checkpoint maps are read-only: the model's types
    x, experts, out = np.zeros((1, 32), np.float32), np.zeros(1, np.int64), np.zeros((1, 1), np.float32)
    signature = tuple(numba.typeof(a) for a in (blocks, scales, experts, x, out))
    fresh = numba.njit(parallel=True)(k.mxfp4_matvec.py_func)  # numba shows no assembly of code from its cache
    fresh.compile(signature)
    return fresh.inspect_asm(signature), k.ISA, 32 // k.LANES


def cycles(loop: list[str], cpu: str, mca: str, iterations: int = 300) -> float:
    """llvm-mca's cycles for one pass of `loop` on `cpu`, in steady state."""
    text = "\n".join(loop) + "\n"
    run = subprocess.run([mca, f"-mcpu={cpu}", f"-iterations={iterations}"], input=text, capture_output=True, text=True)
    total = re.search(r"Total Cycles:\s+(\d+)", run.stdout)
    if run.returncode or not total:
        said = (run.stderr or run.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"{mca} -mcpu={cpu}: {said[0]}")
    return int(total.group(1)) / iterations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=["avx2", "avx512"], default="avx512", help="the kernels' width (avx2 forced)")
    parser.add_argument("--build", help="CPU to compile for, as LLVM names it (default: this one; Haswell for avx2)")
    parser.add_argument(
        "--model", help="CPUs llvm-mca models, comma-separated (default: Zen 3 (avx2 only), Zen 4, SPR)"
    )
    parser.add_argument("--mca", default="llvm-mca", help="the llvm-mca executable")
    args = parser.parse_args()
    if shutil.which(args.mca) is None:
        print(
            f"kernel_mca: no {args.mca} here (Debian: apt-get install llvm-19, then --mca llvm-mca-19)", file=sys.stderr
        )
        return 1
    os.environ["MLX_OSS_KERNELS"] = args.isa  # read as `_target` is imported, in `kernel_asm`
    try:
        asm, isa, per_block = kernel_asm(args.build)
        loop = inner_loop(asm)
    except (ImportError, ValueError) as e:
        print(f"kernel_mca: {e}", file=sys.stderr)
        return 1
    blocks = sum(bool(FMA.search(x)) for x in loop) // per_block
    build = args.build or "this CPU"
    print(f"mxfp4_matvec for {build} ({isa}): an inner loop of {len(loop)} instructions, {blocks} blocks")
    models = args.model or ("znver3," if isa == "avx2" else "") + "znver4,sapphirerapids"
    failed = False
    for cpu in models.split(","):
        try:
            print(f"  {cpu}: {cycles(loop, cpu, args.mca) / blocks:.2f} cycles a block")
        except RuntimeError as e:  # a CPU it does not know, or instructions that CPU has not
            print(f"  {cpu}: not modelled ({e})")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

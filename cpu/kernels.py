"""Compiled matrix-vector kernels for the NumPy backend, through numba (the optional `fast` extra).

Plain NumPy must expand MXFP4 weights to float32 before BLAS can use them, which costs more than
reading them. These kernels multiply the packed weights directly: each block's 32 nibbles become E2M1
values in registers (AVX-512: widened to 32-bit lanes, looked up by a 16-entry `vpermps`; AVX2: the low and
high bytes of their BF16 bits looked up by `vpshufb`, 32 at once, and spread into floats), then multiplied
into float32 sums with the block's E8M0 scale. The inputs are laid out in the order the weights come out of
that decoding (`block_ordered`). BF16 weights are widened in registers, 32 at a time as the low and high halves of
16 words, their inputs laid out to match (`bf16_ordered`); on AVX-512 a prompt's products with them go the same
way, two rows to each load of the inputs (`bf16_matmul_passes`), not through BLAS on a widened copy. All arithmetic
is float32, as in the plain path, so results agree with it to rounding; where the CPU has AVX512-VNNI, decoding's
MXFP4 products are integer dot products of the weights (small integers, exactly) with inputs rounded to 2**-22 of
their block's largest (`mxfp4_matvec`), which agree with float32's to its rounding too.

The decoding is written in LLVM IR through numba intrinsics because numba's loops would promote the
nibble arithmetic to 64-bit lanes. Machines with neither AVX-512 nor AVX2, and machines without
numba, use the plain NumPy path; `MLX_OSS_KERNELS=off` forces it (and `=avx2` the AVX2 kernels).

Where the CPU has AMX (Intel's Xeons since Sapphire Rapids), a prompt's products with the experts and the BF16
matrices run on its tiles instead (`_tile_kernels`, exact as float32's products; `MLX_OSS_KERNELS=avx512` keeps
them on AVX-512). Where it has AVX512-VNNI but no AMX (AMD's since Zen 4, Intel's before Sapphire Rapids), a
prompt's products with the experts are 16-bit integer dot products (`_vnni_tiles`), twice float32's products an
instruction, on inputs rounded to 2**-16 of their block's largest: the one path here that rounds activations, held
to transformers' logits by the same reference tests.

Scales come from `mxfp4.SCALE_VALUES`, as in the plain path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlx_oss.packed_bf16 import PackedMatrix

from . import _target
from .layers import first_visible_key, visible_spans

ISA, DESCRIPTION, BROKEN = _target.ISA, _target.DESCRIPTION, _target.BROKEN  # what `_target` found to build for
AMX = _target.AMX  # prompts' expert products on AMX tiles (`_tile_kernels`)
VNNI = _target.VNNI  # decoding's expert products as integer dot products (`_numba_kernels.mxfp4_matvec_vnni`)
VNNI_PROMPTS = VNNI and not AMX  # prompts' expert products as 16-bit integer dot products (`_vnni_tiles`)
DISABLE_VARIABLE = _target.VARIABLE
DECODE_ROWS = 8  # up to this many rows of x (decoding), matrices and attention run in the kernels; more in BLAS
# A prompt's rows of x through a BF16 matrix on AVX-512 go through `bf16_matmul_passes`, not BLAS (which first widens
# the whole matrix to float32, a cost it spreads over the rows), up to DENSE_PROMPT_ROWS: the engine's prompt chunk
# (`generate.PREFILL_CHUNK`), where the two measured even. DENSE_PIECE rows at a time, whose slice of x (0.7-1 MB)
# stays in L2 while each chunk of rows goes through it.
DENSE_PROMPT_ROWS = 512
DENSE_PIECE = 64

# numba's OpenMP threads spin ~300k rounds after each kernel by default, fighting BLAS's threads for the cores
# whenever the two alternate (a prompt's expert decode, then its matmul). A short spin keeps back-to-back kernels
# quick. OpenMP reads it when it loads, at the first parallel kernel: set here, at import, for the whole process.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

if ISA is not None:
    try:
        from . import _numba_kernels as _compiled
    except RuntimeError as e:
        if not str(e).startswith("cannot cache function"):
            raise
        # numba found no writable folder for its cache (a read-only install and home): compile in each process.
        _target.CACHE = False
        from . import _numba_kernels as _compiled
CACHE = _target.CACHE  # whether the build is kept in numba's on-disk cache (see `warm_up`)
if AMX:
    from . import _tile_kernels as _tiles
if VNNI_PROMPTS:
    from numba import get_num_threads

    from . import _vnni_tiles
# The fewest tokens an expert's group needs to go through `mxfp4_matmul_groups`. The VNNI kernel pads each group to
# tiles of 16 tokens (its last to 8), which costs a group of 6 or fewer more than the float32 passes (`mxfp4_matmul`).
TILED_GROUP_TOKENS = 1 if AMX else 7


def _switched_off() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").lower() in ("0", "off", "no", "false")


def available() -> bool:
    """Whether models loaded now use the kernels (read at each load, so a test can switch them off)."""
    return ISA is not None and not _switched_off()


def description() -> str:
    if _switched_off():
        return f"plain NumPy (compiled kernels switched off by {DISABLE_VARIABLE})"
    return DESCRIPTION if ISA is not None else f"plain NumPy ({DESCRIPTION})"


def warm_up() -> None:
    """Compile the kernels now (or load them from numba's on-disk cache), not at the first token.

    Compiling holds the GIL for seconds. Off the main thread (the app's and the server's model threads) that would
    freeze the window or the event loop on the first load after an install, so a child process compiles into the
    cache first and this process only loads from it.
    """
    if threading.current_thread() is not threading.main_thread() and CACHE:
        compile_in_child()
    _compiled.warm_up()
    if AMX:
        _tiles.warm_up()
    if VNNI_PROMPTS:
        _vnni_tiles.warm_up()


def compile_in_child(timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m mlx_oss.cpu`, which fills numba's cache (in an app bundle: its executable, `-m` alike).
    A child that outlives `timeout` seconds is killed and counts as failed (returncode -1)."""
    command = [sys.executable, "-m", "mlx_oss.cpu"]
    try:
        return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(command, -1, e.stdout, e.stderr)


def mxfp4_matvec(blocks: np.ndarray, scales: np.ndarray, experts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row p of the result is `W[experts[p]] @ x[p]`, for MXFP4 `blocks [E, R, G, 16]` and `scales [E, R, G]`.

    For pairs whose expert has no other input: every weight row is read once per pair. `x` is a plain array, or
    `swiglu_laid_out`'s for `passes=False`. Where the CPU has AVX512-VNNI, by integer dot products on x rounded to
    2**-22 of each block's largest input (`_compiled.mxfp4_matvec_vnni`): float32's precision, in fewer
    instructions.
    """
    ordered = x.for_kernel(passes=False).reshape(x.rows, -1) if isinstance(x, LaidOut) else block_ordered(x)
    out = np.empty((experts.size, blocks.shape[1]), dtype=np.float32)
    experts = np.ascontiguousarray(experts, dtype=np.int64)
    if VNNI:
        _compiled.mxfp4_matvec_vnni(blocks, scales, experts, ordered, *_quantized_buffers(ordered.shape), out)
    else:
        _compiled.mxfp4_matvec(blocks, scales, experts, ordered, out)
    return out


def _quantized_buffers(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Room for rows of x `[n, G*32]` quantized as `mxfp4_matvec_vnni` reads them (`_compiled.quantize_rounds`),
    in `_aligned_empty` memory."""
    n, rounds = shape[0], shape[1] // (32 * _compiled.ROUND_BLOCKS)
    parts = _aligned_empty(n * rounds * 96).view(np.int8).reshape(n, rounds * 384)
    corrections = _aligned_empty(n * rounds * 16).view(np.int32).reshape(n, rounds * 16)
    return parts, corrections, _aligned_empty(n * rounds * 16).reshape(n, rounds * 16)


def mxfp4_matmul(blocks: np.ndarray, scales: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`x @ W.T` for one MXFP4 matrix (`blocks [R, G, 16]`, `scales [R, G]`) and several rows of `x`.

    Each weight block is decoded once for every pass of up to 8 rows of x on AVX2, 16 on AVX-512. `x` is a plain
    array, or `swiglu_laid_out`'s for `passes=True`.
    """
    laid_out = x if isinstance(x, LaidOut) else LaidOut(passes_by_block(x), x.shape[0], passes=True)
    out = np.empty((laid_out.rows, blocks.shape[0]), dtype=np.float32)
    _compiled.mxfp4_matmul(blocks, scales, laid_out.for_kernel(passes=True), out)
    return out


@dataclass(frozen=True)
class LaidOut:
    """The rows of an MXFP4 kernel's input, already in the order it reads them (flat, in `_aligned_empty` memory):
    pass by pass for `mxfp4_matmul` (`passes`), or row by row for `mxfp4_matvec`."""

    ordered: np.ndarray
    rows: int
    passes: bool

    def for_kernel(self, passes: bool) -> np.ndarray:
        """`ordered`, for a kernel that reads the layout `passes` says (the other would multiply shuffled rows)."""
        if passes != self.passes:
            raise ValueError(f"rows laid out {'pass by pass' if self.passes else 'row by row'} for the other kernel")
        return self.ordered


def swiglu_laid_out(
    gate_up: np.ndarray, bias: np.ndarray, bias_rows: np.ndarray, alpha: float, limit: float, passes: bool
) -> LaidOut:
    """`layers.clamped_swiglu` of `gate_up [T, 2I] + bias[bias_rows]` (gate and up interleaved), laid out for the
    down projection: as `passes_by_block` lays out rows for `mxfp4_matmul` (`passes`), or as `block_ordered` does for
    `mxfp4_matvec`. One parallel pass (`_compiled.swiglu_laid_out`) instead of NumPy's nine on one core."""
    tokens, doubled = gate_up.shape
    out = _aligned_empty(tokens * doubled // 2)
    bias_rows = np.ascontiguousarray(bias_rows, dtype=np.int64)
    gate_up, bias = (np.ascontiguousarray(a, dtype=np.float32) for a in (gate_up, bias))
    _compiled.swiglu_laid_out(gate_up, bias, bias_rows, np.float32(alpha), np.float32(limit), passes, out)
    return LaidOut(out, tokens, passes)


def tiles_fit(blocks: np.ndarray) -> bool:
    """Whether `mxfp4_matmul_groups` can take these MXFP4 `blocks [..., R, G, 16]`: on AMX, R a multiple of 16; on
    AVX512-VNNI without AMX, of `_vnni_tiles.ROWS`."""
    rows = blocks.shape[-3]
    return (AMX and rows % 16 == 0) or (VNNI_PROMPTS and rows % _vnni_tiles.ROWS == 0)


def mxfp4_matmul_groups(
    blocks: np.ndarray, scales: np.ndarray, experts: np.ndarray, sizes: np.ndarray, x: np.ndarray | LaidOut
) -> np.ndarray:
    """`x [N, G*32]` in consecutive groups of `sizes` rows, group i times `W[experts[i]].T` for MXFP4 `blocks [E, R, G,
    16]`, `scales [E, R, G]`: `[N, R]`, in one parallel loop for all the groups (where `tiles_fit`). `x` is a plain
    array, or `swiglu_laid_out`'s for `passes=False`.

    Each group's rows are padded to a multiple of 16 (a tile). On AMX, each weight block is decoded once for every
    64 of a group's rows, and the products are float32's. On VNNI (`_vnni_tiles`), each row once for all of a group's
    rows, and x is first rounded to 16 bits per block of 32 (within 2**-16 of the block's largest magnitude).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    experts = np.asarray(experts, dtype=np.int64)
    out = np.empty((x.rows if isinstance(x, LaidOut) else x.shape[0], blocks.shape[1]), dtype=np.float32)
    if AMX:
        _tiles.mxfp4_matmul_tiles(blocks, scales, experts, sizes, tiles_by_block(_plain(x), sizes), out)
    else:
        threads = get_num_threads()
        _vnni_tiles.mxfp4_matmul_tiles(blocks, scales, experts, sizes, *quantized_tiles(x, sizes), threads, out)
    return out


def quantized_tiles(x: np.ndarray | LaidOut, sizes) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive groups of `sizes` rows of `x [N, G*32]` (or `swiglu_laid_out`'s rows for `passes=False`) rounded
    to int16 and laid out in tiles of 16 rows as `_vnni_tiles.mxfp4_matmul_tiles` reads them: the pairs (uint32)
    and the block scales (float32)."""
    laid_out = isinstance(x, LaidOut)
    rows = x.for_kernel(passes=False).reshape(x.rows, -1) if laid_out else np.ascontiguousarray(x, dtype=np.float32)
    sizes = np.asarray(sizes, dtype=np.int64)
    blocks = int((-(-sizes // 16)).sum()) * (rows.shape[1] // 32)
    pairs = _aligned_empty(blocks * 256).view(np.uint32)  # see `_aligned_empty`
    x_scales = _aligned_empty(blocks * 16)
    _vnni_tiles.quantized_tiles(rows, laid_out, sizes, pairs, x_scales)
    return pairs, x_scales


def _plain(x: np.ndarray | LaidOut) -> np.ndarray:
    """The rows of x in their own order: `swiglu_laid_out`'s for `passes=False` put back from `BLOCK_ORDER`."""
    if not isinstance(x, LaidOut):
        return x
    blocked = x.for_kernel(passes=False).reshape(x.rows, -1, 32)
    return np.ascontiguousarray(blocked[:, :, _compiled.BLOCK_POSITIONS]).reshape(x.rows, -1)


def bf16_tiles_fit(weights: np.ndarray) -> bool:
    """Whether `bf16_matmul` can take these BF16-bits `weights [R, C]`: on AMX, R a multiple of 16 and C of 32."""
    return AMX and weights.dtype == np.uint16 and weights.shape[0] % 16 == 0 and weights.shape[1] % 32 == 0


def bf16_matmul(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`x @ W.T` for BF16-bits `weights [R, C]` (where `bf16_tiles_fit`) on AMX tiles, loaded as they are mapped."""
    out = np.empty((x.shape[0], weights.shape[0]), dtype=np.float32)
    _tiles.bf16_matmul_tiles(weights, tiles_by_block(x, [x.shape[0]]), out)
    return out


def bf16_passes_fit(weights: np.ndarray, rows: int) -> bool:
    """Whether `bf16_matmul_passes` should take `rows` rows of x through these BF16-bits `weights [R, C]`: on
    AVX-512, C a multiple of 32, the rows contiguous (as mapped), at most `DENSE_PROMPT_ROWS` rows."""
    shape_fits = weights.ndim == 2 and weights.shape[1] % 32 == 0 and weights.flags.c_contiguous
    return ISA == "avx512" and weights.dtype == np.uint16 and shape_fits and rows <= DENSE_PROMPT_ROWS


def bf16_matmul_passes(weights: np.ndarray, x: np.ndarray, pieces: list[np.ndarray] | None = None) -> np.ndarray:
    """`x @ W.T` for BF16-bits `weights [R, C]` (where `bf16_passes_fit`), widened in registers where they are
    mapped, `DENSE_ROWS` rows to each load of x. `pieces` is x as `bf16_pieces` lays it out, for callers that
    multiply the same x by several matrices (or blocks of one)."""
    if not bf16_passes_fit(weights, 0) or x.ndim != 2 or x.shape[1] != weights.shape[1]:
        raise ValueError(f"bf16_matmul_passes: weights {weights.dtype} {weights.shape} with x {x.shape}")
    out = np.empty((x.shape[0], weights.shape[0]), dtype=np.float32)
    for start, piece in zip(range(0, x.shape[0], DENSE_PIECE), pieces or bf16_pieces(x), strict=True):
        _compiled.bf16_matmul_passes(weights, piece, out[start : start + DENSE_PIECE])
    return out


def bf16_pieces(x: np.ndarray) -> list[np.ndarray]:
    """`x [T, C]` as `bf16_matmul_passes` reads it: `DENSE_PIECE` rows at a time, each laid out in passes."""
    order, widest = _compiled.BF16_ORDER, _compiled.DENSE_PASS_TOKENS
    return [
        passes_by_block(x[start : start + DENSE_PIECE], order, widest) for start in range(0, x.shape[0], DENSE_PIECE)
    ]


def tiles_by_block(x: np.ndarray, sizes) -> np.ndarray:
    """Consecutive groups of `sizes` rows of `x [N, G*32]` as AMX's B tiles (`_tile_kernels.tiles_by_block`), as
    uint16: each float32 split exactly into three BF16 parts."""
    sizes = np.asarray(sizes, dtype=np.int64)
    tiles = int((-(-sizes // 16)).sum())
    layout = _aligned_empty(tiles * (x.shape[1] // 32) * _tiles.X_PARTS * 256).view(np.uint32)  # see `_aligned_empty`
    _tiles.tiles_by_block(np.ascontiguousarray(x, dtype=np.float32), sizes, layout)
    return layout.view(np.uint16)


def passes_by_block(x: np.ndarray, order: np.ndarray | None = None, widest: int | None = None) -> np.ndarray:
    """x `[T, G*32]` flattened the way `mxfp4_matmul` reads it: pass after pass (`_compiled.pass_tokens` rows
    each, at most `widest`: by default `PASS_TOKENS`), each `[G, pass, 32]`, a row's 32 elements of a block in
    `order` (by default `block_ordered`'s; `bf16_matmul_passes` gives `BF16_ORDER` and its own width). A pass's
    inputs for one block lie together, and the blocks a tile reads sit a pass's width apart, not all T rows' (which
    at 32 rows, 4 KB, put them in the same L1 sets).
    """
    order = _compiled.BLOCK_ORDER if order is None else order
    widest = _compiled.PASS_TOKENS if widest is None else widest
    out = _aligned_empty(x.size)
    _compiled.lay_out_passes(np.ascontiguousarray(x, dtype=np.float32), order, widest, out)
    return out


def matvec(weights: np.ndarray | Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """`x @ W.T` for float32 or BF16-bits (uint16) `weights [R, C]` (C a multiple of 16) and a few rows of x,
    reading W once; or for several such matrices (`stackable`), their outputs side by side in one call. BLAS would
    do float32 as fast, but its threads spin on after each call and slow the kernels that follow."""
    stack = tuple(weights) if isinstance(weights, (list, tuple)) else (weights,)
    if not stackable(stack):
        raise ValueError("matvec takes C-contiguous matrices of one dtype, writability and width, a multiple of 16")
    if x.ndim != 2 or x.shape[1] != stack[0].shape[1]:
        raise ValueError(f"matvec: x {x.shape} does not match matrices of {stack[0].shape[1]} columns")
    out = np.empty((x.shape[0], sum(w.shape[0] for w in stack)), dtype=np.float32)
    x = bf16_ordered(x) if stack[0].dtype == np.uint16 else np.ascontiguousarray(x, dtype=np.float32)
    _compiled.matvec(stack, x, out, _compiled.matvec_span(out.shape[1]))  # memory-bound: x unaligned is fine
    return out


def packed_matvec(matrices: Sequence[PackedMatrix], x: np.ndarray) -> np.ndarray:
    """`matvec` for packed BF16 matrices (`packed_bf16.PackedMatrix`, of one width): their outputs side by side."""
    stack = tuple(matrices)
    columns = stack[0].shape[1]
    if x.ndim != 2 or x.shape[1] != columns or any(m.shape[1] != columns for m in stack):
        raise ValueError(f"packed_matvec: x {x.shape} does not match matrices of {columns} columns")
    x = np.ascontiguousarray(x, dtype=np.float32)
    ordered = np.empty_like(x)
    _compiled.reorder_steps(x, _compiled.PACKED_ORDER, ordered)
    out = np.empty((x.shape[0], sum(m.shape[0] for m in stack)), dtype=np.float32)
    parts = [tuple(getattr(m, name) for m in stack) for name in _PACKED_PARTS]
    _compiled.packed_matvec(*parts, ordered, x, out, _compiled.matvec_span(out.shape[1]))
    return out


_PACKED_PARTS = ("packed", "tables", "row_starts", "exception_columns", "exception_values")


def unpacked(matrix: PackedMatrix, start: int, stop: int) -> np.ndarray:
    """BF16 bits of rows `start:stop` of a packed matrix (`PackedMatrix.rows`, compiled)."""
    out = np.empty((stop - start, matrix.shape[1]), dtype=np.uint16)
    _compiled.unpack_packed(matrix.packed[start:stop], matrix.tables[start:stop], out)
    matrix.overlay_exceptions(out, start, stop)
    return out


def stackable(weights: Sequence[np.ndarray]) -> bool:
    """Whether `matvec` takes these matrices in one call: C-contiguous, float32 or BF16 bits, all of one dtype,
    width (a multiple of 16) and writability (numba compiles a tuple of one array type)."""
    first = weights[0]
    return first.ndim == 2 and first.dtype in (np.float32, np.uint16) and first.shape[1] % 16 == 0 and all(
        w.ndim == 2 and w.flags.c_contiguous and w.dtype == first.dtype and w.shape[1] == first.shape[1]
        and w.flags.writeable == first.flags.writeable
        for w in weights
    )  # fmt: skip


def bf16_ordered(x: np.ndarray) -> np.ndarray:
    """`x [T, C]` with each 32 elements in the order `matvec` widens BF16 weights in (`_compiled.BF16_ORDER`: the
    even ones, then the odd ones), all but a last 16, which keep theirs."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    _compiled.reorder_steps(x, _compiled.BF16_ORDER, out)
    return out


def attention(q, keys, values, sinks, q_start: int, window: int | None, k_start: int = 0) -> np.ndarray:
    """`layers.attention` for a few queries (decoding), in one compiled loop (`_numba_kernels.attention`), without
    BLAS, whose threads would spin on after each call and take the cores from the kernels around it.

    `keys` and `values` `[KV, D, capacity]` are whole C-contiguous cache buffers (float32, or float16 as uint16
    bits) holding at least the positions up to the last query's, `keys[..., 0]` being position `k_start` (a slice
    of them would have strides numba cannot vectorize over).
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    tokens, heads, dim = q.shape
    first = first_visible_key(q_start, window)
    spans = visible_spans(q_start, tokens, first, window)
    out = np.empty(q.shape, dtype=np.float32)
    sinks = np.ascontiguousarray(sinks, dtype=np.float32)
    _compiled.attention(q, keys, values, sinks, first - k_start, *spans, np.float32(1.0 / np.sqrt(dim)), out)
    return out.reshape(tokens, heads * dim)


def widened(buffer: np.ndarray, first: int, end: int) -> np.ndarray:
    """Positions `first .. end` of a float16 KV cache buffer `[KV, D, capacity]` (C-contiguous) as float32, by
    `vcvtph2ps` on every core: NumPy's own cast ran 4-5 times slower, and a prompt's attention widens each layer."""
    rows = buffer.view(np.uint16).reshape(-1, buffer.shape[-1])
    out = np.empty((rows.shape[0], end - first), np.float32)
    _compiled.widen_half(rows, first, out)
    return out.reshape(*buffer.shape[:2], end - first)


def softmax_in_spans(scores: np.ndarray, sink: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """`layers.softmax_in_spans`, compiled: the exponentials by the kernels' polynomial in vector registers, several
    times quicker than NumPy's, and no masking pass."""
    denominators = np.empty(scores.shape[:2], dtype=np.float32)
    _compiled.softmax_in_spans(scores, np.ascontiguousarray(sink, dtype=np.float32), first, last, denominators)
    return denominators


def block_ordered(x: np.ndarray) -> np.ndarray:
    """`x [..., G*32]` with each block's 32 elements in the order the MXFP4 kernels decode weights in
    (`_numba_kernels.BLOCK_ORDER`), in `_aligned_empty` memory."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = _aligned_empty(x.size).reshape(rows.shape)
    _compiled.reorder_steps(rows, _compiled.BLOCK_ORDER, out)
    return out.reshape(x.shape)


def _aligned_empty(size: int) -> np.ndarray:
    """`size` float32 whose data starts on a 64-byte cache line.

    The kernels read inputs 64 bytes at a time; from rows that start mid-line (NumPy aligns to 16 bytes) every
    such load would touch two lines (and AMX's tile loads run 3-4 times slower). Row lengths here are multiples of
    16 floats, so every row then starts on a line too.
    """
    buffer = np.empty(size * 4 + 64, dtype=np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start : start + size * 4].view(np.float32)

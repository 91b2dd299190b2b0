"""Prompts' expert products on AMX tiles (Intel's Advanced Matrix Extensions), where `_target.AMX`.

A prompt multiplies each expert's MXFP4 weights with the few to few hundred tokens routed to it: compute-bound
work, where AVX-512's float32 multiply-adds (`_numba_kernels.mxfp4_matmul`) reach about 100 GMAC/s on two cores.
AMX's `tdpbf16ps` multiplies 16 x 32 BF16 values by 32 x 16 into 16 x 16 float32 sums in one instruction.

Exactness: a weight is an E2M1 value (two significant bits) times a power of two, which BF16 holds exactly. A
float32 input is split exactly into three BF16 parts (each the upper half of what the parts before it left), and
each part's product with a weight is exact in float32; so the tiles sum the float32 products, only in another
order than a float32 dot product would.

A tile is 16 rows of 64 bytes. Tiles 0 to `SUM_TILES` - 1 sum the products of 16 weight rows with up to
`TILE_PASS` * 16 inputs; the two `A_TILES` take turns holding the rows' next block as BF16, the two `B_TILES` one
BF16 part of 16 inputs' block.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mlx_oss.mxfp4 import FP4_VALUES, SCALE_VALUES

from ._numba_kernels import (
    F32,
    I8,
    I16,
    I32,
    LANES,
    _function,
    _load,
    _module_constant,
    _pointer,
    _prefetch,
    _splat,
    _starts,
    _vector,
)
from ._target import CACHE

TILE_PASS = 4  # tiles of 16 inputs a task sums at once
SUM_TILES = 4  # tiles 0-3 hold sums
A_TILES, B_TILES = (4, 5), (6, 7)
X_PARTS = 3  # BF16 parts of a float32 input
# How far ahead (in blocks) each of a task's 16 rows asks for its weights: 16 rows read a block at a time are 16
# streams that the hardware prefetchers leave waiting on memory.
PREFETCH_BLOCKS = 8
_CONFIG = "mlx_oss_amx_tile_config"
_SCALE_TABLE = "mlx_oss_e8m0_scale_values"
_I64 = ir.IntType(64)


@numba.njit(cache=CACHE)
def sum_tile(tiles: int, t: int, part: int) -> int:
    """The tile that sums part `part` of the products of tile `t` of `tiles` tiles of inputs.

    Sums into one tile wait on each other; with fewer than three tiles of inputs the parts take spare tiles, added
    together after the last block, so that a block's products never wait on one another.
    """
    if tiles == 1:
        return part
    if tiles == 2:
        return t if part == 0 else 2 + t
    return t


def _tile_config(builder):
    """AMX's tile configuration (palette 1; eight tiles of 16 rows x 64 bytes), as a constant in memory."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    for tile in range(8):
        config[16 + 2 * tile] = 64  # bytes a row, a little-endian uint16
        config[48 + tile] = 16  # rows
    return _module_constant(builder, _CONFIG, config)


def _amx(builder, name, *arguments):
    """Call AMX intrinsic `llvm.x86.NAME` (tile numbers are i8 immediates)."""
    builder.call(_function(builder, f"llvm.x86.{name}", ir.VoidType(), *[a.type for a in arguments]), list(arguments))


def _tile(n: int):
    return ir.Constant(I8, n)


def _scale(builder, scale_pointer, g):
    """The E8M0 scale of block `g` as a float32, from `mxfp4.SCALE_VALUES` (a load, not a register shuffle)."""
    table = builder.bitcast(_module_constant(builder, _SCALE_TABLE, SCALE_VALUES), F32.as_pointer())
    return builder.load(builder.gep(table, [builder.zext(builder.load(builder.gep(scale_pointer, [g])), I32)]))


def _bf16_table(builder, scale):
    """The 16 E2M1 values times `scale` as BF16, twice over (`<32 x i16>`, a `vpermw` table whose index bit 4 is
    ignored): each product, exact in float32 with two significant bits, cut to its upper 16 bits, exact too."""
    scaled = builder.fmul(_vector(F32, [float(v) for v in FP4_VALUES]), _splat(builder, scale, 16))
    words = builder.bitcast(scaled, ir.VectorType(I16, 32))
    return builder.shuffle_vector(words, words, ir.Constant(ir.VectorType(I32, 32), list(range(1, 32, 2)) * 2))


def _bf16_block(builder, block_pointer, g, table):
    """MXFP4 block `g` as its 32 BF16 values in order (`<32 x i16>`, from `_bf16_table`): one `vpermw` of the
    table by the nibbles, each byte's low nibble in word 2i and its high one in word 2i+1.

    A byte widened to a 32-bit lane, OR its copy shifted up by 12, holds the low nibble in the low word's bits 0-3
    (bit 4, the high nibble's, picks the table's second copy) and the high nibble in the high word's bits 0-3.
    """
    vi = ir.VectorType(I32, 16)
    offset = builder.mul(g, ir.Constant(g.type, 16))
    nibbles = builder.zext(_load(builder, block_pointer, offset, ir.VectorType(I8, 16)), vi)
    index = builder.bitcast(builder.or_(nibbles, builder.shl(nibbles, _vector(I32, [12] * 16))), table.type)
    words = ir.VectorType(I16, 32)
    return builder.bitcast(
        builder.call(_function(builder, "llvm.x86.avx512.permvar.hi.512", words, words, words), [table, index]), vi
    )


def _multiply_blocks(builder, tiles, count, load_a, xp, x_step, sums):
    """The loop both tile kernels share: for each block g of 16 weight rows, `load_a(g, a_tile)` loads the rows'
    block g as BF16 into A tile `a_tile`; each part of the inputs' block g (`xp + g * x_step`, laid out by
    `tiles_by_block`) is loaded as a B tile and its product with A added to its `sum_tile`. Sum tile k lands at
    `sums + 256 * k` (16 rows x 16 inputs, float32)."""
    i8p, row_bytes = I8.as_pointer(), ir.Constant(_I64, 64)
    used = sorted({sum_tile(tiles, t, part) for t in range(tiles) for part in range(X_PARTS)})
    b_turn = [0]

    def block(g, a_tile):
        load_a(g, a_tile)
        block_x = builder.gep(xp, [builder.mul(g, x_step)])
        for part in range(X_PARTS):  # the same part of every tile in turn: no sum waits on the one before
            for t in range(tiles):
                b_tile = B_TILES[b_turn[0] % len(B_TILES)]
                b_turn[0] += 1
                source = builder.gep(block_x, [ir.Constant(x_step.type, (t * X_PARTS + part) * 512)])
                _amx(builder, "tileloadd64", _tile(b_tile), builder.bitcast(source, i8p), row_bytes)
                _amx(builder, "tdpbf16ps", _tile(sum_tile(tiles, t, part)), _tile(a_tile), _tile(b_tile))

    _amx(builder, "ldtilecfg", _tile_config(builder))
    for k in used:
        _amx(builder, "tilezero", _tile(k))
    two = ir.Constant(count.type, 2)
    with cgutils.for_range(builder, builder.udiv(count, two)) as loop:  # the A tiles take turns
        g = builder.mul(loop.index, two)
        block(g, A_TILES[0])
        block(builder.add(g, ir.Constant(count.type, 1)), A_TILES[1])
    with builder.if_then(builder.icmp_unsigned("==", builder.urem(count, two), ir.Constant(count.type, 1))):
        block(builder.sub(count, ir.Constant(count.type, 1)), A_TILES[0])
    for k in used:
        target = builder.bitcast(builder.gep(sums, [ir.Constant(I32, 256 * k)]), i8p)
        _amx(builder, "tilestored64", _tile(k), target, row_bytes)
    _amx(builder, "tilerelease")  # so that a context switch saves no tile state


def _mxfp4_rows_intrinsic(tiles: int):
    @intrinsic
    def mxfp4_rows(typingctx, blocks, block_offset, scales, scale_offset, groups, x, x_offset, x_stride, a, sums):
        """16 MXFP4 rows (from `blocks[block_offset:]`, each `groups` blocks) times `tiles` * 16 inputs (see
        `_multiply_blocks`): each block of the rows is decoded to BF16 into the half of `a` (2 x 16 x 16 uint32) of
        the A tile that loads it from there."""

        def codegen(context, builder, signature, args):
            b_arr, b_off, s_arr, s_off, count, x_arr, x_off, x_step, a_arr, o_arr = args
            bt, _, st, _, _, xt, _, _, at, ot = signature.args
            bp = _pointer(context, builder, bt, b_arr, b_off, I8)
            sp = _pointer(context, builder, st, s_arr, s_off, I8)
            ap = _pointer(context, builder, at, a_arr, ir.Constant(I32, 0), I32)
            vi = ir.VectorType(I32, LANES)

            def decode_and_load(g, a_tile):
                buffer = builder.gep(ap, [ir.Constant(I32, 256 * A_TILES.index(a_tile))])
                ahead = builder.add(g, ir.Constant(g.type, PREFETCH_BLOCKS))
                for r in range(16):
                    row_blocks = builder.gep(bp, [builder.mul(count, ir.Constant(count.type, 16 * r))])
                    row_scales = builder.gep(sp, [builder.mul(count, ir.Constant(count.type, r))])
                    _prefetch(builder, builder.gep(row_blocks, [builder.mul(ahead, ir.Constant(g.type, 16))]))
                    _prefetch(builder, builder.gep(row_scales, [ahead]))
                    table = _bf16_table(builder, _scale(builder, row_scales, g))
                    row = builder.bitcast(builder.gep(buffer, [ir.Constant(I32, 16 * r)]), vi.as_pointer())
                    builder.store(_bf16_block(builder, row_blocks, g, table), row, align=4)
                source = builder.bitcast(buffer, I8.as_pointer())
                _amx(builder, "tileloadd64", _tile(a_tile), source, ir.Constant(_I64, 64))

            xp = _pointer(context, builder, xt, x_arr, x_off, I16)
            sums = _pointer(context, builder, ot, o_arr, ir.Constant(I32, 0), F32)
            _multiply_blocks(builder, tiles, count, decode_and_load, xp, x_step, sums)
            return context.get_dummy_value()

        arguments = (blocks, block_offset, scales, scale_offset, groups, x, x_offset, x_stride, a, sums)
        return types.none(*arguments), codegen

    return mxfp4_rows


def _bf16_rows_intrinsic(tiles: int):
    @intrinsic
    def bf16_rows(typingctx, weights, offset, groups, x, x_offset, x_stride, sums):
        """16 BF16 rows (from `weights[offset:]`, each `groups` * 32 long) times `tiles` * 16 inputs (see
        `_multiply_blocks`): the A tiles load straight from the weights."""

        def codegen(context, builder, signature, args):
            w_arr, w_off, count, x_arr, x_off, x_step, o_arr = args
            wt, _, _, xt, _, _, ot = signature.args
            wp = _pointer(context, builder, wt, w_arr, w_off, I8)
            row_bytes = builder.sext(builder.mul(count, ir.Constant(count.type, 64)), _I64)

            def load(g, a_tile):
                source = builder.gep(wp, [builder.mul(g, ir.Constant(g.type, 64))])
                _amx(builder, "tileloadd64", _tile(a_tile), source, row_bytes)

            xp = _pointer(context, builder, xt, x_arr, x_off, I16)
            sums = _pointer(context, builder, ot, o_arr, ir.Constant(I32, 0), F32)
            _multiply_blocks(builder, tiles, count, load, xp, x_step, sums)
            return context.get_dummy_value()

        return types.none(weights, offset, groups, x, x_offset, x_stride, sums), codegen

    return bf16_rows


_mxfp4_rows_1, _mxfp4_rows_2, _mxfp4_rows_3, _mxfp4_rows_4 = (_mxfp4_rows_intrinsic(n) for n in range(1, 5))
_bf16_rows_1, _bf16_rows_2, _bf16_rows_3, _bf16_rows_4 = (_bf16_rows_intrinsic(n) for n in range(1, 5))


@numba.njit(cache=CACHE)
def _line_aligned(count):
    """`count` uint32 starting on a 64-byte cache line: a tile row that straddles two lines loads 3-4 times slower."""
    raw = np.empty(count + 16, dtype=np.uint32)
    skip = (64 - raw.ctypes.data % 64) % 64 // 4
    return raw[skip : skip + count]


@numba.njit(parallel=True, cache=CACHE)
def mxfp4_matmul_tiles(blocks, scales, experts, sizes, x, out):
    """For each group i of `sizes[i]` inputs: `x_i @ W[experts[i]].T` into `out [N, R]` (the groups' rows one after
    another), for MXFP4 weights `blocks [E, R, G, 16]`, `scales [E, R, G]` (R a multiple of 16) and `x` (uint16)
    concatenating the groups' inputs, each laid out by `tiles_by_block`.

    One parallel loop for every group's work: a task takes 16 rows of one expert and up to TILE_PASS * 16 of its
    inputs, decoding each of the rows' blocks once for them.
    """
    _, rows, groups, _ = blocks.shape
    row_tiles = rows // 16
    tiles = (sizes + 15) // 16
    first_task = _starts((tiles + TILE_PASS - 1) // TILE_PASS * row_tiles)
    x_start = _starts(tiles * (groups * X_PARTS * 512))
    out_start = _starts(sizes)
    flat_blocks = blocks.reshape(-1)
    flat_scales = scales.reshape(-1)
    for task in prange(first_task[-1]):
        i = np.searchsorted(first_task, task, side="right") - 1
        local = task - first_task[i]
        tile = (local // row_tiles) * TILE_PASS  # pass by pass: a pass's inputs stay in the core's cache
        first = (local % row_tiles) * 16
        row = experts[i] * rows + first
        a = _line_aligned(2 * 256)
        sums = _line_aligned(SUM_TILES * 256).view(np.float32).reshape(SUM_TILES, 16, 16)
        b, s, flat_sums = row * groups * 16, row * groups, sums.reshape(-1)
        x_offset, x_stride = x_start[i] + tile * X_PARTS * 512, tiles[i] * X_PARTS * 512
        count = min(TILE_PASS, tiles[i] - tile)
        if count == 4:
            _mxfp4_rows_4(flat_blocks, b, flat_scales, s, groups, x, x_offset, x_stride, a, flat_sums)
        elif count == 3:
            _mxfp4_rows_3(flat_blocks, b, flat_scales, s, groups, x, x_offset, x_stride, a, flat_sums)
        elif count == 2:
            _mxfp4_rows_2(flat_blocks, b, flat_scales, s, groups, x, x_offset, x_stride, a, flat_sums)
        else:
            _mxfp4_rows_1(flat_blocks, b, flat_scales, s, groups, x, x_offset, x_stride, a, flat_sums)
        _store_sums(sums, count, out[out_start[i] : out_start[i + 1]], sizes[i], first, tile)


@numba.njit(parallel=True, cache=CACHE)
def bf16_matmul_tiles(weights, x, out):
    """`x @ W.T` into `out [T, R]` for BF16 `weights [R, C]` (uint16, R a multiple of 16, C of 32) and T inputs `x`
    (uint16) laid out by `tiles_by_block`. A task takes 16 rows and up to TILE_PASS * 16 inputs."""
    rows, width = weights.shape
    groups = width // 32
    tiles = (out.shape[0] + 15) // 16
    row_tiles = rows // 16
    flat = weights.reshape(-1)
    x_stride = tiles * X_PARTS * 512
    for task in prange((tiles + TILE_PASS - 1) // TILE_PASS * row_tiles):
        tile = (task // row_tiles) * TILE_PASS
        first = (task % row_tiles) * 16
        sums = _line_aligned(SUM_TILES * 256).view(np.float32).reshape(SUM_TILES, 16, 16)
        flat_sums, x_offset, w = sums.reshape(-1), tile * X_PARTS * 512, first * width
        count = min(TILE_PASS, tiles - tile)
        if count == 4:
            _bf16_rows_4(flat, w, groups, x, x_offset, x_stride, flat_sums)
        elif count == 3:
            _bf16_rows_3(flat, w, groups, x, x_offset, x_stride, flat_sums)
        elif count == 2:
            _bf16_rows_2(flat, w, groups, x, x_offset, x_stride, flat_sums)
        else:
            _bf16_rows_1(flat, w, groups, x, x_offset, x_stride, flat_sums)
        _store_sums(sums, count, out, out.shape[0], first, tile)


@numba.njit(cache=CACHE)
def _store_sums(sums, count, out, inputs, first, tile):
    """The products of 16 rows from `first` with `count` tiles of inputs from tile `tile`, added up from the tiles
    that summed their parts (`sum_tile`), into `out [inputs, rows]` (its first `inputs`: the rest are padding)."""
    for t in range(count):
        products = sums[sum_tile(count, t, 0)].copy()
        for part in range(1, X_PARTS):
            if sum_tile(count, t, part) != sum_tile(count, t, part - 1):
                products += sums[sum_tile(count, t, part)]
        for n in range(min(16, inputs - (tile + t) * 16)):
            out[(tile + t) * 16 + n, first : first + 16] = products[:, n]


@numba.njit(parallel=True, cache=CACHE)
def tiles_by_block(x, sizes, out):
    """Groups of consecutive rows of `x [T, G*32]` (`sizes` rows each) laid out as the kernels read them, into `out`
    (uint32): for each group `[G, tiles, X_PARTS, 16, 16]` BF16 pairs, where row k of block g's tile of 16 inputs
    holds, for each input, the pair of its elements 2k and 2k+1; zeros past a group's last input.

    A task takes 16 inputs of one group: it splits their rows into parts (vectorized along the row), then writes
    each block's 16 x 16 pairs transposed into the tiles, which no other task writes.
    """
    width = x.shape[1]
    groups = width // 32
    tiles = (sizes + 15) // 16
    row_start = _starts(sizes)
    tile_start = _starts(tiles)
    for task in prange(tile_start[-1]):
        i = np.searchsorted(tile_start, task, side="right") - 1
        tile = task - tile_start[i]
        pairs = np.zeros((X_PARTS, 16, width // 2), dtype=np.uint32)
        rest = np.empty(width, dtype=np.float32)
        rest_bits = rest.view(np.uint32)
        upper = np.empty(width, dtype=np.uint32)
        upper_value = upper.view(np.float32)
        for n in range(min(16, sizes[i] - tile * 16)):
            rest[:] = x[row_start[i] + tile * 16 + n]
            for part in range(X_PARTS):
                for k in range(width):
                    upper[k] = rest_bits[k] & np.uint32(0xFFFF0000)
                for k in range(width // 2):
                    pairs[part, n, k] = (upper[2 * k] >> np.uint32(16)) | upper[2 * k + 1]
                for k in range(width):
                    rest[k] -= upper_value[k]
        base = tile_start[i] * groups * X_PARTS * 256
        for g in range(groups):
            for part in range(X_PARTS):
                at = base + ((g * tiles[i] + tile) * X_PARTS + part) * 256
                for k in range(16):
                    for n in range(16):
                        out[at + 16 * k + n] = pairs[part, n, g * 16 + k]


def warm_up() -> None:
    """Compile (or load from numba's cache) the tile kernels for the array types the model passes."""
    blocks = np.zeros((1, 16, 1, 16), np.uint8)
    scales = np.full((1, 16, 1), 127, np.uint8)
    for array in (blocks, scales):
        array.flags.writeable = False  # checkpoint weights are read-only maps, a distinct array type to numba
    sizes = np.ones(1, dtype=np.int64)
    x = np.empty(X_PARTS * 256, dtype=np.uint32)
    tiles_by_block(np.zeros((1, 32), np.float32), sizes, x)
    weights = np.zeros((16, 32), np.uint16)
    weights.flags.writeable = False
    bf16_matmul_tiles(weights, x.view(np.uint16), np.empty((1, 16), np.float32))
    mxfp4_matmul_tiles(blocks, scales, np.zeros(1, np.int64), sizes, x.view(np.uint16), np.empty((1, 16), np.float32))

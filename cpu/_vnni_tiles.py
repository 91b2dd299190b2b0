"""Prompts' expert products as 16-bit integer dot products, where the CPU has AVX512-VNNI but no AMX (`_target`).

A prompt multiplies each expert's MXFP4 weights with the tokens routed to it: compute-bound work. A float32
multiply-add makes 16 products an instruction; VNNI's `vpdpwssd` multiplies 32 pairs of 16-bit integers and adds
each two into 16 32-bit sums, at the same rate (one a cycle a core on Zen 4): twice the products.

- Weights: an E2M1 value doubled is an integer from -12 to 12, exact as int16 (`_decode_row_pair`); half the block's
  E8M0 scale multiplies the block's sums.
- Inputs: each token's block of 32 elements is rounded to int16 at the power of two that puts its largest
  magnitude in [2**14, 2**15) (`quantized_tiles`), so each element is off by at most 2**-16 of that largest, where
  float32 would round it at 2**-24 of itself. That is this path's one rounding: a block's products and sums are
  exact in int32 (at most 32 x 12 x 32767), and each block's sum meets the two scales in float32. The reference
  tests hold it to transformers' logits at the tolerance they hold every path to.

Tokens go in the lanes. A group's tokens are laid out in tiles of 16 (`quantized_tiles`): for each block, 16
vectors, vector j holding each token's elements 2j and 2j+1 as one 32-bit lane, then the tokens' 16 block scales.
A task decodes up to `ROW_SPAN` rows of one expert to int16 pairs once, into a scratch, then for every tile of its
group, `TILE_PASS` at a time, and `ROWS` rows at a time (`_rows_times_tile`) broadcasts each pair to all lanes and
multiplies it into its row's sums for the 16 tokens: the rows share each vector of inputs.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mlx_oss.mxfp4 import FP4_VALUES, SCALE_VALUES

from ._numba_kernels import (
    BLOCK_POSITIONS,
    F32,
    I8,
    I16,
    I32,
    _fma,
    _function,
    _horizontal_sum,
    _load,
    _module_constant,
    _pointer,
    _prefetch_ahead,
    _splat,
    _starts,
    _vector,
)
from ._target import CACHE

ROWS = 8  # rows a task multiplies at once: 8 sums and 8 float32 totals in registers, each input vector used 8 times
ROW_SPAN = 8 * ROWS  # rows a task takes (its scratch is allocated once for them)
TILE_PASS = 4  # tiles of 16 tokens a pass takes: their inputs stay in the core's cache while the rows go through
LANES = 16
HALF_SCALES = (SCALE_VALUES * 0.5).astype(np.float32)  # the weights are decoded doubled
_HALF_SCALES = "mlx_oss_e8m0_half_scale_values"


def _pair_words(builder, rows_blocks, g):
    """Block `g` of two MXFP4 rows as `_decode_row_pair` lays them out, `<32 x i32>`: lane 2j holds the first row's
    elements 2j and 2j+1 as int16 (doubled E2M1 values), lane 2j + 1 the second row's.

    In bytes first: each row's 16 low and 16 high nibbles looked up by `vpshufb` (128-bit vectors, single-pumped
    on Zen 4), the four vectors shuffled into the lanes' order, then widened to 16 bits with their signs."""
    v16 = ir.VectorType(I8, 16)
    lookup = _function(builder, "llvm.x86.ssse3.pshuf.b.128", v16, v16, v16)
    table = _vector(I8, [int(2 * v) for v in FP4_VALUES])
    fifteen, four = _vector(I8, [15] * 16), _vector(I8, [4] * 16)
    values = []
    for row in rows_blocks:
        raw = _load(builder, row, builder.mul(g, ir.Constant(g.type, 16)), v16)
        for nibbles in (builder.and_(raw, fifteen), builder.lshr(raw, four)):
            values.append(builder.call(lookup, [table, nibbles]))
    order = [index for j in range(16) for index in (j, 16 + j, 32 + j, 48 + j)]  # low, high; the second row's
    first = builder.shuffle_vector(values[0], values[1], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    second = builder.shuffle_vector(values[2], values[3], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    ordered = builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(I32, 64), order))
    return builder.bitcast(builder.sext(ordered, ir.VectorType(I16, 64)), ir.VectorType(I32, 2 * LANES))


@intrinsic
def _decode_row_pair(typingctx, blocks, block_offset, scales, scale_offset, groups, words, words_offset, w_scales):
    """MXFP4 rows `blocks[block_offset:]`, `scales[scale_offset:]` and the next (`groups` blocks each) as int16
    pairs into `words[words_offset:]`, interleaved: pair j (elements 2j and 2j+1) of the first row's block g at
    `32 * g + 2 * j`, the second row's after it; and their blocks' scales, halved, into `w_scales[words_offset //
    16:]`, the same way (`2 * g`, `2 * g + 1`). So both rows' pair j load as one 64-bit word (`_rows_times_tile`'s
    half tiles), and either alone as a 32-bit one."""

    def codegen(context, builder, signature, args):
        b_arr, b_off, s_arr, s_off, count, w_arr, w_off, ws_arr = args
        bt, _, st, _, _, wt, _, wst = signature.args
        bp = _pointer(context, builder, bt, b_arr, b_off, I8)
        sp = _pointer(context, builder, st, s_arr, s_off, I8)
        wp = _pointer(context, builder, wt, w_arr, w_off, I32)
        wsp = _pointer(context, builder, wst, ws_arr, builder.udiv(w_off, ir.Constant(w_off.type, LANES)), F32)
        rows_blocks = [bp, builder.gep(bp, [builder.mul(count, ir.Constant(count.type, 16))])]
        rows_scales = [sp, builder.gep(sp, [count])]
        halves = builder.bitcast(_module_constant(builder, _HALF_SCALES, HALF_SCALES), F32.as_pointer())
        both = ir.VectorType(I32, 2 * LANES)
        with cgutils.for_range(builder, count) as loop:
            g = loop.index
            for row_blocks, row_scales in zip(rows_blocks, rows_scales, strict=True):
                _prefetch_ahead(builder, row_blocks, row_scales, g)  # the two streams left alone run 1.2x slower
            target = builder.gep(wp, [builder.mul(g, ir.Constant(g.type, 2 * LANES))])
            builder.store(_pair_words(builder, rows_blocks, g), builder.bitcast(target, both.as_pointer()), align=4)
            for parity, row_scales in enumerate(rows_scales):
                exponent = builder.zext(builder.load(builder.gep(row_scales, [g])), I32)
                at = builder.add(builder.mul(g, ir.Constant(g.type, 2)), ir.Constant(g.type, parity))
                builder.store(builder.load(builder.gep(halves, [exponent])), builder.gep(wsp, [at]))
        return context.get_dummy_value()

    arguments = (blocks, block_offset, scales, scale_offset, groups, words, words_offset, w_scales)
    return types.none(*arguments), codegen


def _rows_times_tile_intrinsic(half: bool):
    @intrinsic
    def rows_times_tile(typingctx, words, words_offset, groups, x, x_offset, x_scales, xs_offset, w_scales, sums):
        """`ROWS` decoded rows (`words[words_offset:]`, in pairs of rows as `_decode_row_pair` lays them out, their
        block scales at `w_scales[words_offset // 16:]`) times one tile of tokens (`x[x_offset:]`,
        `x_scales[xs_offset:]`, `quantized_tiles`).

        A full tile holds 16 tokens, token n in lane n: each row's pair j is broadcast to all lanes, and row r's
        products with token n go to `sums[16 * r + n]`. A half tile holds 8, token n in lanes 2n and 2n + 1: a pair
        of rows' pair j is broadcast as one 64-bit word, the first row's in the even lanes, and pair p's products
        go to `sums[16 * p + 2 * n + parity]`. Either way a `vpdpwssd` makes 32 products.

        For each block, the pairs are multiplied into int32 sums (`vpmaddwd` and an add, which LLVM fuses into
        `vpdpwssd`); the block's sums then meet the scales in float32."""

        def codegen(context, builder, signature, args):
            w_arr, w_off, count, x_arr, x_off, s_arr, s_off, ws_arr, o_arr = args
            wt, _, _, xt, _, st, _, wst, ot = signature.args
            zero = ir.Constant(I32, 0)
            wp = _pointer(context, builder, wt, w_arr, w_off, I32)
            xp = _pointer(context, builder, xt, x_arr, x_off, I32)
            sp = _pointer(context, builder, st, s_arr, s_off, F32)
            wsp = _pointer(context, builder, wst, ws_arr, builder.udiv(w_off, ir.Constant(w_off.type, LANES)), F32)
            op = _pointer(context, builder, ot, o_arr, zero, F32)
            vi, vw = ir.VectorType(I32, LANES), ir.VectorType(I16, 2 * LANES)
            vf, fma = _fma(builder, LANES)
            madd = _function(builder, "llvm.x86.avx512.pmaddw.d.512", vi, vw, vw)
            accumulators = ROWS // 2 if half else ROWS
            pair_words = [builder.gep(wp, [builder.mul(count, ir.Constant(count.type, 2 * LANES * p))])
                          for p in range(ROWS // 2)]  # fmt: skip
            pair_scales = [
                builder.gep(wsp, [builder.mul(count, ir.Constant(count.type, 2 * p))]) for p in range(ROWS // 2)
            ]
            totals = [cgutils.alloca_once_value(builder, _vector(F32, [0.0] * LANES)) for _ in range(accumulators)]
            alternate = ir.Constant(ir.VectorType(I32, LANES), [i % 2 for i in range(LANES)])

            def weights(g, j, a):  # the broadcast pair(s) accumulator a multiplies by
                at = builder.add(builder.mul(g, ir.Constant(g.type, 2 * LANES)), ir.Constant(g.type, 2 * j))
                if half:
                    word = builder.bitcast(builder.gep(pair_words[a], [at]), ir.IntType(64).as_pointer())
                    return builder.bitcast(_splat(builder, builder.load(word, align=4), LANES // 2), vw)
                word = builder.gep(pair_words[a // 2], [builder.add(at, ir.Constant(g.type, a % 2))])
                return builder.bitcast(_splat(builder, builder.load(word), LANES), vw)

            def row_scales(g, a):  # the scales of accumulator a's row(s) in its lanes
                at = builder.mul(g, ir.Constant(g.type, 2))
                if half:
                    both = builder.bitcast(builder.gep(pair_scales[a], [at]), ir.VectorType(F32, 2).as_pointer())
                    pair = builder.load(both, align=4)
                    return builder.shuffle_vector(pair, pair, alternate)
                scale = builder.gep(pair_scales[a // 2], [builder.add(at, ir.Constant(g.type, a % 2))])
                return _splat(builder, builder.load(scale), LANES)

            with cgutils.for_range(builder, count) as loop:
                g = loop.index
                block_x = builder.gep(xp, [builder.mul(g, ir.Constant(g.type, LANES * LANES))])
                sums = [None] * accumulators
                for j in range(LANES):
                    inputs = builder.bitcast(_load(builder, block_x, ir.Constant(I32, LANES * j), vi), vw)
                    for a in range(accumulators):
                        product = builder.call(madd, [inputs, weights(g, j, a)])
                        sums[a] = product if j == 0 else builder.add(sums[a], product)
                token_scales = _load(builder, sp, builder.mul(g, ir.Constant(g.type, LANES)), vf)
                for a, total in enumerate(totals):
                    scale = builder.fmul(token_scales, row_scales(g, a))
                    builder.store(builder.call(fma, [builder.sitofp(sums[a], vf), scale, builder.load(total)]), total)
            for a, total in enumerate(totals):
                target = builder.bitcast(builder.gep(op, [ir.Constant(I32, LANES * a)]), vf.as_pointer())
                builder.store(builder.load(total), target, align=4)
            return context.get_dummy_value()

        arguments = (words, words_offset, groups, x, x_offset, x_scales, xs_offset, w_scales, sums)
        return types.none(*arguments), codegen

    return rows_times_tile


_rows_times_tile, _rows_times_half_tile = _rows_times_tile_intrinsic(False), _rows_times_tile_intrinsic(True)


@numba.njit(cache=CACHE)
def _half(size, tile):
    """Whether tile `tile` of a group of `size` tokens is a half tile: the last, holding 1 to 8 tokens."""
    rest = size % LANES
    return 0 < rest <= LANES // 2 and tile == size // LANES


@numba.njit(parallel=True, nogil=True, cache=CACHE)
def mxfp4_matmul_tiles(blocks, scales, experts, sizes, x, x_scales, threads, out):
    """For each group i of `sizes[i]` inputs: `x_i @ W[experts[i]].T` into `out [N, R]` (the groups' rows one after
    another), for MXFP4 weights `blocks [E, R, G, 16]`, `scales [E, R, G]` (R a multiple of `ROWS`) and the groups'
    inputs as `quantized_tiles` lays them out (`x` uint32, `x_scales` float32).

    A task takes up to `ROW_SPAN` rows of one group's expert and decodes them once (`_decode_row_pair`), then goes
    through the group's tiles `TILE_PASS` at a time (a pass's inputs stay in the core's cache), `ROWS` rows at a
    time. The tasks are dealt out in turn to one worker per thread (`threads`: numba's, which compiled here would
    keep the function out of numba's cache), each allocating its scratch once.
    """
    _, rows, groups, _ = blocks.shape
    spans = (rows + ROW_SPAN - 1) // ROW_SPAN
    tasks = sizes.size * spans
    tiles = (sizes + LANES - 1) // LANES
    tile_start = _starts(tiles)
    out_start = _starts(sizes)
    flat_blocks, flat_scales = blocks.reshape(-1), scales.reshape(-1)
    workers = max(1, min(threads, tasks))
    for worker in prange(workers):
        words = np.empty(ROW_SPAN * groups * LANES, dtype=np.uint32)
        w_scales = np.empty(ROW_SPAN * groups, dtype=np.float32)
        sums = np.empty(ROWS * LANES, dtype=np.float32)
        for task in range(worker, tasks, workers):
            i, span = task // spans, task % spans
            first = span * ROW_SPAN
            count = min(ROW_SPAN, rows - first)
            for r in range(0, count, 2):
                row = experts[i] * rows + first + r
                _decode_row_pair(flat_blocks, row * groups * 16, flat_scales, row * groups, groups, words,
                                 r * groups * LANES, w_scales)  # fmt: skip
            for pass_start in range(0, tiles[i], TILE_PASS):
                for chunk in range(0, count, ROWS):
                    for t in range(pass_start, min(pass_start + TILE_PASS, tiles[i])):
                        at = tile_start[i] + t
                        tokens = min(LANES, sizes[i] - t * LANES)
                        x_at, xs_at, w_at = at * groups * LANES * LANES, at * groups * LANES, chunk * groups * LANES
                        if _half(sizes[i], t):
                            _rows_times_half_tile(words, w_at, groups, x, x_at, x_scales, xs_at, w_scales, sums)
                            for n in range(tokens):
                                for r in range(ROWS):
                                    value = sums[(r // 2) * LANES + 2 * n + r % 2]
                                    out[out_start[i] + t * LANES + n, first + chunk + r] = value
                        else:
                            _rows_times_tile(words, w_at, groups, x, x_at, x_scales, xs_at, w_scales, sums)
                            for n in range(tokens):
                                for r in range(ROWS):
                                    out[out_start[i] + t * LANES + n, first + chunk + r] = sums[r * LANES + n]


def _quantize_block_intrinsic(positions: list[int]):
    @intrinsic
    def quantize_block(typingctx, x, x_offset, pairs, pairs_offset, x_scales, xs_offset):
        """The 32 elements at `x[x_offset:]` (element e at `positions[e]`) rounded to int16 as `quantized_tiles`
        says, their 16 pairs into `pairs[pairs_offset + 16 * j]` (element 2j in the low half) and their scale into
        `x_scales[xs_offset]`.

        The scale comes from the bits of the largest magnitude (E, its biased exponent): 2**(E - 141), which is
        frexp's; E taken as at least 15, so a block whose largest is below 2**-112 keeps fewer bits."""

        def codegen(context, builder, signature, args):
            x_arr, x_off, p_arr, p_off, s_arr, s_off = args
            xt, _, pt, _, st, _ = signature.args
            xp = _pointer(context, builder, xt, x_arr, x_off, F32)
            pp = _pointer(context, builder, pt, p_arr, p_off, I32)
            sp = _pointer(context, builder, st, s_arr, s_off, F32)
            vi, vf = ir.VectorType(I32, LANES), ir.VectorType(F32, LANES)
            v32 = ir.VectorType(I32, 32)
            convert = _function(builder, "llvm.x86.avx512.mask.cvtps2dq.512", vi, vf, vi, I16, I32)
            nearest = [ir.Constant(vi, None), ir.Constant(I16, -1), ir.Constant(I32, 4)]  # MXCSR's: ties to even
            halves = [_load(builder, xp, ir.Constant(I32, 16 * h), vf) for h in (0, 1)]
            bits = builder.shuffle_vector(
                *(builder.bitcast(half, vi) for half in halves), ir.Constant(v32, list(range(32)))
            )
            magnitudes = builder.and_(bits, _vector(I32, [0x7FFFFFFF] * 32))
            peak = _horizontal_sum(builder, magnitudes, _unsigned_larger)  # a NaN's bits outrank an infinity's
            invalid = builder.icmp_unsigned(">=", peak, ir.Constant(I32, 0x7F800000))
            exponent = _unsigned_larger(builder, builder.lshr(peak, ir.Constant(I32, 23)), ir.Constant(I32, 15))
            up = builder.bitcast(builder.shl(builder.sub(ir.Constant(I32, 268), exponent), ir.Constant(I32, 23)), F32)
            scale = builder.bitcast(builder.shl(builder.sub(exponent, ir.Constant(I32, 14)), ir.Constant(I32, 23)), F32)
            scale = builder.select(builder.icmp_unsigned("==", peak, ir.Constant(I32, 0)), ir.Constant(F32, 0.0), scale)
            scale = builder.select(invalid, ir.Constant(F32, math.nan), scale)
            high, low = _vector(I32, [32767] * LANES), _vector(I32, [-32767] * LANES)
            rounded = []
            for half in halves:
                value = builder.call(convert, [builder.fmul(half, _splat(builder, up, LANES)), *nearest])
                value = builder.select(builder.icmp_signed(">", value, high), high, value)
                rounded.append(builder.select(builder.icmp_signed("<", value, low), low, value))
            mask = ir.VectorType(I32, LANES)
            even = builder.shuffle_vector(*rounded, ir.Constant(mask, [positions[2 * j] for j in range(LANES)]))
            odd = builder.shuffle_vector(*rounded, ir.Constant(mask, [positions[2 * j + 1] for j in range(LANES)]))
            pairs = builder.or_(
                builder.and_(even, _vector(I32, [0xFFFF] * LANES)), builder.shl(odd, _vector(I32, [16] * LANES))
            )
            pairs = builder.select(invalid, _vector(I32, [0] * LANES), pairs)  # an infinity or NaN converts to none
            for j in range(LANES):
                builder.store(
                    builder.extract_element(pairs, ir.Constant(I32, j)), builder.gep(pp, [ir.Constant(I32, LANES * j)])
                )
            builder.store(scale, sp)
            return context.get_dummy_value()

        return types.none(x, x_offset, pairs, pairs_offset, x_scales, xs_offset), codegen

    return quantize_block


def _unsigned_larger(builder, a, b):
    return builder.select(builder.icmp_unsigned(">", a, b), a, b)


_quantize_block = _quantize_block_intrinsic(list(range(32)))
_quantize_laid_out_block = _quantize_block_intrinsic([int(p) for p in BLOCK_POSITIONS])


@numba.njit(parallel=True, nogil=True, cache=CACHE)
def quantized_tiles(x, laid_out, sizes, pairs, x_scales):
    """Consecutive groups of `sizes` rows of `x [N, G*32]` rounded to int16 and laid out as `_rows_times_tile`
    reads them: for each group's tile of 16 rows and each block, 16 x 16 pairs `pairs` (uint32; vector j holds row
    n's elements 2j and 2j+1 in lane n, the first in the low half), then the rows' 16 block scales in `x_scales`;
    a group's last tile, if it holds 8 rows or fewer, a half tile: row n in lanes 2n and 2n + 1. With `laid_out`,
    each block of x holds its elements in `BLOCK_ORDER` (`kernels.swiglu_laid_out`'s rows). Rows past a group's
    last are zero.

    A block's scale is the power of two that puts its largest magnitude in [2**14, 2**15) (as `math.frexp` gives
    it); a block of zeros has scale 0, and one holding an infinity or NaN scale NaN and zeros, so that its products
    come out NaN.
    """
    width = x.shape[1]
    groups = width // 32
    flat = x.reshape(-1)
    tiles = (sizes + LANES - 1) // LANES
    row_start = _starts(sizes)
    tile_start = _starts(tiles)
    for task in prange(tile_start[-1]):
        i = np.searchsorted(tile_start, task, side="right") - 1
        t = task - tile_start[i]
        filled = min(LANES, sizes[i] - t * LANES)
        half = _half(sizes[i], t)
        for g in range(groups):
            base = (task * groups + g) * LANES
            for lane in range(LANES):
                n = lane // 2 if half else lane
                if n < filled:
                    at = (row_start[i] + t * LANES + n) * width + g * 32
                    if laid_out:
                        _quantize_laid_out_block(flat, at, pairs, base * LANES + lane, x_scales, base + lane)
                    else:
                        _quantize_block(flat, at, pairs, base * LANES + lane, x_scales, base + lane)
                else:
                    x_scales[base + lane] = 0.0
                    for j in range(LANES):
                        pairs[base * LANES + j * LANES + lane] = 0


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels for the array types the model passes."""
    blocks = np.zeros((1, ROWS, 1, 16), np.uint8)
    scales = np.full((1, ROWS, 1), 127, np.uint8)
    for array in (blocks, scales):
        array.flags.writeable = False  # checkpoint weights are read-only maps, a distinct array type to numba
    sizes = np.ones(1, dtype=np.int64)
    pairs, x_scales = np.empty(LANES * LANES, np.uint32), np.empty(LANES, np.float32)
    for laid_out in (False, True):
        quantized_tiles(np.zeros((1, 32), np.float32), laid_out, sizes, pairs, x_scales)
    out = np.empty((1, ROWS), np.float32)
    mxfp4_matmul_tiles(blocks, scales, np.zeros(1, np.int64), sizes, pairs, x_scales, numba.get_num_threads(), out)

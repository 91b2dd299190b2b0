"""The numba side of `kernels`: LLVM IR for one row's dot product, parallel loops over rows.

Imported by `kernels` only where `_target` found an instruction set to build for (`_target.ISA`), and built for
it; see `kernels`.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from mlx_oss.mxfp4 import FP4_VALUES, SCALE_VALUES

from ._target import CACHE, ISA, VNNI, l1_data_bytes

F32, F16, I32, I16, I8 = ir.FloatType(), ir.HalfType(), ir.IntType(32), ir.IntType(16), ir.IntType(8)
LANES = 16 if ISA == "avx512" else 8  # float32 lanes of a vector register (decoded MXFP4 weights, values)
DOT_LANES = 16  # float32 lanes of the dot products over float32 or BF16 rows
UNROLL = 4  # independent sums per row
MATVEC_ROWS = 64  # consecutive rows of one matrix (or expert) a decoding task reads, at most: one stream
# Inputs a prompt's expert rows are multiplied with per pass, one register each: at most PASS_TOKENS (AVX2 has 16
# registers, AVX-512 32). An expert's T inputs go through in the fewest passes, of near-equal widths (17 as 6, 6
# and 5), one loop compiled for each width: padding T to a few fixed widths wasted up to a third of the products
# of the experts a prompt's routing gives 9 to 20 tokens.
PASS_TOKENS = 16 if ISA == "avx512" else 8
# A prompt's products with a BF16 matrix (`bf16_matmul_passes`, AVX-512 only) go DENSE_ROWS rows at a time, each
# input load shared by them, in passes of at most DENSE_PASS_TOKENS: 24 accumulators of the 32 registers. BF16 rows
# widen in two instructions per 32 weights, so the loads of inputs, not the decoding, bound the one-row loop.
DENSE_ROWS = 2
DENSE_PASS_TOKENS = 12
assert ISA != "avx512" or DENSE_PASS_TOKENS <= PASS_TOKENS  # `_in_passes` holds PASS_TOKENS inputs' sums a row
# A prompt's kernel walks the weight in tiles of ROW_CHUNK rows by GROUP_CHUNK blocks, so that the slice of
# input it reads again for every row (PASS_TOKENS x GROUP_CHUNK x 32 values) stays in the core's L1 cache
# (`tile_blocks`).
ROW_CHUNK = 16


def tile_blocks(l1_bytes: int, pass_tokens: int) -> int:
    """Blocks of a prompt kernel's tile: as many as keep a pass's slice of inputs within three quarters of the L1
    data cache, from 4 to 16. The rest of L1 holds the rows' blocks, the sums and the tables: a slice as large as
    the whole L1 (16 blocks of 16 inputs in Zen 4's 32 KB) ran the kernel 0.88x as fast as 12 blocks. (numba's cache
    keys a build by the CPU's name, so a cached build keeps the tile it was compiled with: only speed depends on it.)"""
    return max(4, min(16, 3 * l1_bytes // 4 // (pass_tokens * 32 * 4)))


GROUP_CHUNK = tile_blocks(l1_data_bytes(), PASS_TOKENS)
SCALED_TABLES = "mlx_oss_scaled_e2m1_tables"
# How far ahead of its reads a row's stream asks for memory: far enough to hide its latency, near enough that a
# line is still in L1 when read with the rest of the streams' (twice this was slower on Zen 4; see the README).
PREFETCH_BYTES = 2048
# Decoding attention: query heads of one kv head whose scores (or weighted values) are summed in registers at once,
# positions it walks at a time, their scores held in a scratch row per head, and how many positions ahead each key
# or value row asks for memory. It reads one 64-byte line of a row at a time, 64 rows in turn, in runs of a chunk
# (2 KB a row): prefetches into L1 kept too few of those lines in flight, so each row asks a chunk ahead, into L2
# (see the README). A group's scratch (8 heads x 2 KB) leaves most of a 32 or 48 KB L1 to the rows' lines; twice as
# long, it would fill a 32 KB L1 (Zen 3's) on its own.
HEAD_TILE = 8 if ISA == "avx512" else 4  # accumulators that fit the registers with room to spare
POSITION_CHUNK = 512
AHEAD_POSITIONS = 512


def _vector(element, values):
    return ir.Constant(ir.VectorType(element, len(values)), [ir.Constant(element, v) for v in values])


def _splat(builder, value, lanes: int):
    vector = builder.insert_element(ir.Constant(ir.VectorType(value.type, lanes), None), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))


def _pointer(context, builder, array_type, array, offset, element):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element.as_pointer())


def _load(builder, pointer, offset, vector_type):
    return builder.load(builder.bitcast(builder.gep(pointer, [offset]), vector_type.as_pointer()), align=1)


def _cache_element(array_type):
    """The LLVM element of a KV cache buffer: float32, or float16 held in a uint16 array (numba has no float16 on
    the CPU)."""
    return F16 if array_type.dtype == types.uint16 else F32


def _load_widened(builder, pointer, offset, lanes: int):
    """`lanes` cache elements from `pointer + offset` as `<lanes x float>`: float16 ones widened (`vcvtph2ps`)."""
    element = pointer.type.pointee
    loaded = _load(builder, pointer, offset, ir.VectorType(element, lanes))
    return loaded if element == F32 else builder.fpext(loaded, ir.VectorType(F32, lanes))


@intrinsic
def _widened(typingctx, element):
    """A KV cache element as float32: a float16's bits (uint16) widened, a float32 as it is."""
    if element not in (types.uint16, types.float32):
        raise TypingError(f"a KV cache element is float32 or float16 bits, not {element}")

    def codegen(context, builder, signature, args):
        (value,) = args
        return value if value.type == F32 else builder.fpext(builder.bitcast(value, F16), F32)

    return types.float32(element), codegen


def _function(builder, name, result, *arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, list(arguments)), name)


def _fma(builder, lanes: int):
    """The `<lanes x float>` type and LLVM's fused multiply-add over it."""
    vf = ir.VectorType(F32, lanes)
    return vf, _function(builder, f"llvm.fma.v{lanes}f32", vf, vf, vf, vf)


def _accumulators(builder, count: int, lanes: int, start: float = 0.0) -> list:
    """`count` vector accumulators, each `<lanes x float>` of `start` (allocas that LLVM keeps in registers)."""
    return [cgutils.alloca_once_value(builder, _vector(F32, [start] * lanes)) for _ in range(count)]


def _accumulate(builder, count, lanes: int, step, start: float = 0.0, combine=None, each_round=None):
    """`combine` (default: addition) over `range(count)` of `step(builder, index, acc) -> acc`, with independent
    accumulators starting at `start`; `each_round(builder, index)`, if given, once before each round of `UNROLL`
    steps (not in the tail).

    One accumulator would chain every iteration on the latency of the last addition; four cover it.
    Returns the vector combination of the accumulators.
    """
    combine = combine or _add
    accs = _accumulators(builder, UNROLL, lanes, start)
    width = ir.Constant(count.type, UNROLL)
    with cgutils.for_range(builder, builder.udiv(count, width)) as loop:
        base = builder.mul(loop.index, width)
        if each_round is not None:
            each_round(builder, base)
        for j, acc in enumerate(accs):
            index = builder.add(base, ir.Constant(count.type, j))
            builder.store(step(builder, index, builder.load(acc)), accs[j])
    tail_start = builder.mul(builder.udiv(count, width), width)
    with cgutils.for_range(builder, builder.sub(count, tail_start)) as loop:
        index = builder.add(tail_start, loop.index)
        builder.store(step(builder, index, builder.load(accs[0])), accs[0])
    total = builder.load(accs[0])
    for acc in accs[1:]:
        total = combine(builder, total, builder.load(acc))
    return total


def _add(builder, a, b):
    return builder.fadd(a, b)


def _max(builder, a, b):
    """The larger of `a` and `b`, lane by lane (`vmaxps`)."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def _prefetch(builder, pointer, locality: int = 3):
    """Ask for the cache line at `pointer`: the hardware prefetcher alone left a core's stream below its share.
    `locality` 3 brings it to L1, 2 to L2 only (`prefetcht1`)."""
    i8p = ir.IntType(8).as_pointer()
    prefetch = _function(builder, "llvm.prefetch.p0", ir.VoidType(), i8p, I32, I32, I32)
    read, keep, data = ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)
    builder.call(prefetch, [builder.bitcast(pointer, i8p), read, keep, data])


def _prefetch_ahead(builder, block_pointer, scale_pointer, g, ahead=None):
    """While reading MXFP4 block `g`, ask for the block and scale `ahead` blocks on: by default `PREFETCH_BYTES` of
    blocks further along the same stream of rows, into L1; a given distance is far enough to go to L2 only."""
    locality = 3 if ahead is None else 2
    at = builder.add(g, ahead if ahead is not None else ir.Constant(g.type, PREFETCH_BYTES // 16))
    _prefetch(builder, builder.gep(block_pointer, [builder.mul(at, ir.Constant(g.type, 16))]), locality)
    _prefetch(builder, builder.gep(scale_pointer, [at]), locality)


def _horizontal_sum(builder, vector, combine=None):
    """The sum of a vector's lanes (or their `combine`), halving it each step (a tree, not a chain of dependent
    additions)."""
    combine = combine or _add
    lanes = vector.type.count
    while lanes > 1:
        lanes //= 2
        low = builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, lanes), list(range(lanes))))
        high = builder.shuffle_vector(
            vector, vector, ir.Constant(ir.VectorType(I32, lanes), list(range(lanes, 2 * lanes)))
        )
        vector = combine(builder, low, high)
    return builder.extract_element(vector, ir.Constant(I32, 0))


def _block_order() -> np.ndarray:
    """The order `_blocks` yields a block's 32 weights in, by element (element 2i is byte i's low nibble, 2i+1 its
    high one): inputs are laid out in it (`kernels.block_ordered`), so each vector of weights meets its inputs in
    one load."""
    if LANES == 16:  # the low nibbles, then the high ones
        return np.concatenate([np.arange(0, 32, 2), np.arange(1, 32, 2)])
    order = []  # see `_avx2_blocks`: bytes 0 2 4 6, 1 3 5 7, 8 10 12 14, 9 11 13 15, each low nibbles then high
    for first in (0, 1, 8, 9):
        pairs = range(first, first + 8, 2)
        order += [2 * i for i in pairs] + [2 * i + 1 for i in pairs]
    return np.array(order)


BLOCK_ORDER = _block_order()
BLOCK_POSITIONS = np.argsort(BLOCK_ORDER)  # where each element of a block lies in `BLOCK_ORDER`


@functools.cache
def scaled_tables() -> np.ndarray:
    """For each E8M0 scale e, the 64 bytes `_blocks` decodes a block of scale e with: `uint8 [256, 64]`.

    Every E2M1 value times every scale, as float32 products (`mxfp4.SCALE_VALUES`), exact: each has at most two
    significant bits (scale 255, infinite, gives infinities and, times zero, NaN). On AVX-512 a row is the 16
    products (a `vpermps` table); on AVX2 the low bytes of their BF16 bits, then the high bytes, each 16 twice over
    (the `vpshufb` tables of both 128-bit lanes): the products' lower 16 bits are all zero, so BF16 holds them
    exactly. Decoding by the block's own table spares the kernels a multiply by the scale per vector of weights (or
    per block of sums).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        products = np.multiply.outer(SCALE_VALUES, FP4_VALUES).astype(np.float32)
    if LANES == 16:
        return np.ascontiguousarray(products).view(np.uint8)
    bits = products.view(np.uint32)
    assert not (bits & 0xFFFF).any(), "an E2M1 value times an E8M0 scale is not exact in BF16"
    low, high = ((bits >> shift) & 0xFF for shift in (16, 24))
    return np.concatenate([low, low, high, high], axis=1).astype(np.uint8)


def _module_constant(builder, name: str, data: np.ndarray):
    """A pointer to the first byte of a read-only copy of `data` in the module, 64-byte aligned (made on first
    use)."""
    table_type = ir.ArrayType(I8, data.nbytes)
    try:
        table = builder.module.get_global(name)
    except KeyError:
        table = ir.GlobalVariable(builder.module, table_type, name)
        table.linkage = "internal"
        table.global_constant = True
        table.align = 64
        table.initializer = ir.Constant(table_type, bytearray(np.ascontiguousarray(data).tobytes()))
    return builder.gep(table, [ir.Constant(I32, 0), ir.Constant(I32, 0)])


def _scaled_table(builder, scale_pointer, g, offset: int, vector_type):
    """`vector_type` from byte `offset` of the `scaled_tables` row of block `g`'s scale."""
    tables = _module_constant(builder, SCALED_TABLES, scaled_tables())
    exponent = builder.zext(builder.load(builder.gep(scale_pointer, [g])), I32)
    row = builder.add(builder.mul(exponent, ir.Constant(I32, 64)), ir.Constant(I32, offset))
    return builder.load(builder.bitcast(builder.gep(tables, [row]), vector_type.as_pointer()), align=32)


def _blocks(builder, block_pointer, scale_pointer, g):
    """Yield (position in `BLOCK_ORDER`, `<LANES x float>` weights) for the 32 values of MXFP4 block `g`, scaled:
    looked up in the block's own table (`scaled_tables`)."""
    raw = _load(builder, block_pointer, builder.mul(g, ir.Constant(g.type, 16)), ir.VectorType(I8, 16))
    if LANES == 8:
        yield from _avx2_blocks(builder, raw, scale_pointer, g)
        return
    # AVX-512: vpermps reads the low four bits of each index, so one table decodes 16 nibbles at once.
    vf, vi = ir.VectorType(F32, LANES), ir.VectorType(I32, LANES)
    permute = _function(builder, "llvm.x86.avx512.permvar.sf.512", vf, vf, vi)
    table = _scaled_table(builder, scale_pointer, g, 0, vf)
    nibbles = builder.zext(raw, vi)
    yield 0, builder.call(permute, [table, nibbles])
    yield 16, builder.call(permute, [table, builder.lshr(nibbles, _vector(I32, [4] * LANES))])


def _avx2_blocks(builder, raw, scale_pointer, g):
    """`_blocks` for a block's 16 bytes `raw` on AVX2, which has no 16-entry float permute (one of the magnitude and
    a sign fix-up per 8 values would take 20 vector instructions a block). Instead `vpshufb` looks up the low and
    the high byte of each nibble's scaled BF16 bits, 32 nibbles at once (the low nibbles in one 128-bit lane, the
    high ones in the other); the bytes are interleaved into BF16 words, and each 32-bit pair of words gives two
    floats, one shifted up 16, one masked: 10 instructions."""
    v32 = ir.VectorType(I8, 32)
    both = builder.shuffle_vector(raw, raw, ir.Constant(ir.VectorType(I32, 32), list(range(16)) * 2))
    quads = ir.VectorType(ir.IntType(64), 4)
    shifted = builder.lshr(builder.bitcast(both, quads), _vector(ir.IntType(64), [0, 0, 4, 4]))  # high lane: >> 4
    nibbles = builder.and_(builder.bitcast(shifted, v32), _vector(I8, [0x0F] * 32))
    lookup = _function(builder, "llvm.x86.avx2.pshuf.b", v32, v32, v32)
    low = builder.call(lookup, [_scaled_table(builder, scale_pointer, g, 0, v32), nibbles])
    high = builder.call(lookup, [_scaled_table(builder, scale_pointer, g, 32, v32), nibbles])
    vi, vf = ir.VectorType(I32, 8), ir.VectorType(F32, 8)
    for position, half in ((0, 0), (16, 8)):  # vpunpcklbw, then vpunpckhbw: bytes 0-7, 8-15 of each lane
        pairs = [(lane + half + i, 32 + lane + half + i) for lane in (0, 16) for i in range(8)]
        interleave = ir.Constant(ir.VectorType(I32, 32), [index for pair in pairs for index in pair])
        words = builder.bitcast(builder.shuffle_vector(low, high, interleave), vi)
        yield position, builder.bitcast(builder.shl(words, _vector(I32, [16] * 8)), vf)
        yield position + 8, builder.bitcast(builder.and_(words, _vector(I32, [0xFFFF0000] * 8)), vf)


def _bf16_load(builder, pointer, offset, lanes: int):
    """`<lanes x float>` from the BF16 bits at `pointer[offset:]`: each shifted into a float32's upper half."""
    bits = builder.zext(_load(builder, pointer, offset, ir.VectorType(I16, lanes)), ir.VectorType(I32, lanes))
    return builder.bitcast(builder.shl(bits, _vector(I32, [16] * lanes)), ir.VectorType(F32, lanes))


@intrinsic
def _mxfp4_row_dot(typingctx, blocks, block_offset, scales, scale_offset, x, groups):
    """One MXFP4 row (`groups` blocks from `blocks[block_offset:]`) dotted with x, each block's 32 elements in
    `BLOCK_ORDER`."""

    def codegen(context, builder, signature, args):
        b_arr, b_off, s_arr, s_off, x_arr, count = args
        bt, _, st, _, xt, _ = signature.args
        bp = _pointer(context, builder, bt, b_arr, b_off, I8)
        sp = _pointer(context, builder, st, s_arr, s_off, I8)
        xp = _pointer(context, builder, xt, x_arr, ir.Constant(I32, 0), F32)
        return _horizontal_sum(builder, _mxfp4_sums(builder, bp, sp, xp, ir.Constant(count.type, 0), count))

    return types.float32(blocks, block_offset, scales, scale_offset, x, groups), codegen


def _mxfp4_sums(builder, bp, sp, xp, first, end):
    """The `<LANES x float>` sums of a row's MXFP4 blocks `first` to `end` (exclusive) times x (each block in
    `BLOCK_ORDER`), decoded by `_blocks`."""
    vf, fma = _fma(builder, LANES)

    def step(builder, index, acc):
        g = builder.add(first, index)
        block_x = builder.gep(xp, [builder.mul(g, ir.Constant(g.type, 32))])
        for position, weights in _blocks(builder, bp, sp, g):
            acc = builder.call(fma, [weights, _load(builder, block_x, ir.Constant(g.type, position), vf), acc])
        return acc

    # A round of UNROLL blocks is 64 bytes, a cache line: one request a round asks for every line once, where
    # one a block asked for each four times, load-port work the kernel is short of (it is bound by its
    # instructions, not by memory).
    def each_round(builder, index):
        _prefetch_ahead(builder, bp, sp, builder.add(first, index))

    return _accumulate(builder, builder.sub(end, first), LANES, step, each_round=each_round)


# Decoding's MXFP4 products on AVX512-VNNI (`VNNI`): `vpdpbusd` multiplies 64 bytes by 64 bytes and adds each four
# products into a 32-bit sum, 4x the products of a float32 FMA. A block's weights are exact small integers (twice
# an E2M1 value: -12..12, offset by 12 to the unsigned bytes the instruction takes), so the rounding is all on the
# input side: each block of x becomes integers X = round(x * 2**(22 - e)), e the exponent of the block's largest
# magnitude, split into three signed bytes (X = x2 * 2**16 + x1 * 2**8 + x0). Their products, summed exactly in
# 32 bits and scaled once per block, differ from float32's by at most 2**-22 of the block's largest input times
# the row's weights: float32's own order of rounding. A 64-byte load holds four blocks (a round); each 32-bit lane
# of the sums belongs to one of them, so one vector of scales serves the round.
ROUND_BLOCKS = 4
X_BITS = 22
ROUNDING = 1.5 * 2.0**52
WEIGHT_OFFSET = 12  # added to the weights (twice the E2M1 values) to make them unsigned
VNNI_WEIGHTS = (WEIGHT_OFFSET + 2 * FP4_VALUES).astype(np.uint8)  # by nibble


@numba.njit(nogil=True, cache=CACHE)
def quantize_rounds(x, parts, corrections, scales):
    """`x [G*32]` (each block in `BLOCK_ORDER`) as `_mxfp4_row_dot_vnni` reads it, for its G // 4 rounds of four
    blocks: `parts int8 [rounds * 384]`, per round the three bytes of X (most significant first), each as the four
    blocks' low-nibble elements, then their high-nibble ones (64 bytes each); `corrections int32 [rounds * 16]`, per
    lane of a round's sums -12 times the sum of the 8 inputs it multiplies (the weights' offset); `scales float32
    [rounds * 16]`, per lane 2**(e - 23) (the weights are twice their values). False, leaving them partly written,
    where x is not finite or has a block whose largest magnitude is below 2**-103, but not 0."""
    bits = x.view(np.int32)
    big = np.empty(32, np.int32)
    for b in range(x.size // (32 * ROUND_BLOCKS) * ROUND_BLOCKS):
        start = b * 32
        peak = np.int32(0)  # the largest magnitude's bits: as integers they order finite floats' magnitudes
        for i in range(32):
            peak = max(peak, bits[start + i] & np.int32(0x7FFFFFFF))
        if peak >= 0x7F800000:  # inf or NaN
            return False
        # math.frexp's exponent of the peak: from a normal float's bits; a subnormal's count 2**-149s. A block of
        # zeros takes any scale; below 2**-103 a block's would not be a normal float32.
        exponent = (peak >> 23) - 126 if peak >= 0x00800000 else math.frexp(float(peak))[1] - 149
        if peak == 0:
            exponent = 0
        elif exponent - X_BITS - 1 < -126:
            return False
        factor = math.ldexp(1.0, X_BITS - exponent)
        for i in range(32):  # x * factor is exact and below 2**22; adding 1.5 * 2**52 rounds it to an integer
            big[i] = np.int32((x[start + i] * factor + ROUNDING) - ROUNDING)
        scale = np.float32(math.ldexp(1.0, exponent - X_BITS - 1))
        for k in range(4):
            total = np.int32(0)
            for i in range(4 * k, 4 * k + 4):
                total += big[i] + big[16 + i]
            corrections[b * 4 + k] = -WEIGHT_OFFSET * total
            scales[b * 4 + k] = scale
        for half in range(2):
            at = b // ROUND_BLOCKS * 384 + half * 64 + b % ROUND_BLOCKS * 16
            for i in range(16):
                value = big[half * 16 + i]
                low = ((value + np.int32(128)) & np.int32(255)) - np.int32(128)
                value = (value - low) >> np.int32(8)
                middle = ((value + np.int32(128)) & np.int32(255)) - np.int32(128)
                parts[at + i] = (value - middle) >> np.int32(8)
                parts[at + 128 + i] = middle
                parts[at + 256 + i] = low
    return True


@intrinsic
def _mxfp4_row_dot_vnni(typingctx, blocks, block_offset, scales, scale_offset, parts, corrections, x_scales, x, groups):
    """`_mxfp4_row_dot` by integer dot products: the row's blocks in rounds of four, against x quantized by
    `quantize_rounds`, the last `groups % 4` blocks in float32 against `x` (in `BLOCK_ORDER`). A row with a scale
    of 0 (2**-127, subnormal, which a scale built from the exponent's bits makes 0) goes again, all in float32."""

    def codegen(context, builder, signature, args):
        b_arr, b_off, s_arr, s_off, p_arr, c_arr, xs_arr, x_arr, count = args
        bt, _, st, _, pt, ct, xst, xt, _ = signature.args
        zero = ir.Constant(I32, 0)
        bp = _pointer(context, builder, bt, b_arr, b_off, I8)
        sp = _pointer(context, builder, st, s_arr, s_off, I8)
        pp = _pointer(context, builder, pt, p_arr, zero, I8)
        cp = _pointer(context, builder, ct, c_arr, zero, I32)
        xsp = _pointer(context, builder, xst, xs_arr, zero, F32)
        xp = _pointer(context, builder, xt, x_arr, zero, F32)
        bytes64, words, vi, vf = (ir.VectorType(t, n) for t, n in ((I8, 64), (I16, 32), (I32, 16), (F32, 16)))
        lookup = _function(builder, "llvm.x86.avx512.pshuf.b.512", bytes64, bytes64, bytes64)
        dot = _function(builder, "llvm.x86.avx512.vpdpbusd.512", vi, vi, vi, vi)
        _, fma = _fma(builder, 16)
        weights_table = _vector(I8, [int(v) for v in VNNI_WEIGHTS] * 4)
        nibble = _vector(I8, [0x0F] * 64)
        c4, c16 = ir.Constant(count.type, 4), ir.Constant(count.type, 16)
        saw_zero_scale = cgutils.alloca_once_value(builder, zero)  # a scale of 0 seen: see the docstring

        def step(builder, r, acc):
            raw = _load(builder, bp, builder.mul(r, ir.Constant(r.type, 64)), bytes64)
            low = builder.and_(raw, nibble)
            high = builder.and_(
                builder.bitcast(builder.lshr(builder.bitcast(raw, words), _vector(I16, [4] * 32)), bytes64), nibble
            )
            halves = [builder.bitcast(builder.call(lookup, [weights_table, n]), vi) for n in (low, high)]
            round_parts = builder.gep(pp, [builder.mul(r, ir.Constant(r.type, 384))])
            # Each byte of X in a sum of its own, the least significant one's starting from the round's correction,
            # combined after by shifts (the total fits 32 bits, so any wrapping of the parts cancels): three short
            # chains of dependent dot products, where one long one had the next round wait on its latency.
            limb_sums = []
            for part in range(3):
                sums = _load(builder, cp, builder.mul(r, c16), vi) if part == 2 else ir.Constant(vi, None)
                for half, weights in enumerate(halves):
                    inputs = _load(builder, round_parts, ir.Constant(r.type, part * 128 + half * 64), vi)
                    sums = builder.call(dot, [sums, weights, inputs])
                limb_sums.append(sums)
            eight = _vector(I32, [8] * 16)
            sums = builder.add(builder.shl(limb_sums[0], eight), limb_sums[1])
            sums = builder.add(builder.shl(sums, eight), limb_sums[2])
            scale_word = builder.load(builder.bitcast(builder.gep(sp, [builder.mul(r, c4)]), I32.as_pointer()), align=1)
            # Bit 7 of each zero byte of the word (and only then any bit): four scalar instructions.
            found = builder.sub(scale_word, ir.Constant(I32, 0x01010101))
            found = builder.and_(builder.and_(found, builder.not_(scale_word)), ir.Constant(I32, 0x80808080))
            builder.store(builder.or_(builder.load(saw_zero_scale), found), saw_zero_scale)
            four = builder.zext(builder.bitcast(scale_word, ir.VectorType(I8, 4)), ir.VectorType(I32, 4))
            four = builder.shl(four, _vector(I32, [23] * 4))
            spread = ir.Constant(ir.VectorType(I32, 16), [lane // 4 for lane in range(16)])
            weight_scales = builder.bitcast(builder.shuffle_vector(four, four, spread), vf)
            scaled = builder.fmul(builder.sitofp(sums, vf), _load(builder, xsp, builder.mul(r, c16), vf))
            _prefetch_ahead(builder, bp, sp, builder.mul(r, c4))
            return builder.call(fma, [scaled, weight_scales, acc])

        rounds = builder.udiv(count, c4)
        sums = builder.fadd(
            _accumulate(builder, rounds, 16, step),
            _mxfp4_sums(builder, bp, sp, xp, builder.mul(rounds, c4), count),
        )
        total = cgutils.alloca_once_value(builder, sums)
        with builder.if_then(builder.icmp_unsigned("!=", builder.load(saw_zero_scale), zero), likely=False):
            builder.store(_mxfp4_sums(builder, bp, sp, xp, ir.Constant(count.type, 0), count), total)
        return _horizontal_sum(builder, builder.load(total))

    return types.float32(blocks, block_offset, scales, scale_offset, parts, corrections, x_scales, x, groups), codegen


def _pass_loop(builder, rows_weights, xp, ops, count, tokens: int):
    """The loop of a pass over `count` blocks of 32 elements for `tokens` inputs and one or more rows: each block's
    weights come once per row from `rows_weights(g)` (one list of (position in the block's 32 elements, vector)
    per row), each input vector is loaded once and multiplied into every row's lanes of sums for that input (kept
    in registers through the loop, read from and written back to the pointers `ops`, one per row)."""
    vf, fma = _fma(builder, LANES)
    rows_accs = []
    for op in ops:
        at = [builder.gep(op, [ir.Constant(I32, t * LANES)]) for t in range(tokens)]
        targets = [builder.bitcast(pointer, vf.as_pointer()) for pointer in at]
        accs = [cgutils.alloca_once_value(builder, builder.load(target, align=4)) for target in targets]
        rows_accs.append(list(zip(targets, accs, strict=True)))
    stride = ir.Constant(count.type, 32 * tokens)
    with cgutils.for_range(builder, count) as loop:
        g = loop.index
        weights = rows_weights(g)
        block_x = builder.gep(xp, [builder.mul(g, stride)])
        for part, (position, _) in enumerate(weights[0]):
            for t in range(tokens):
                inputs = _load(builder, block_x, ir.Constant(g.type, 32 * t + position), vf)
                for row_weights, accs in zip(weights, rows_accs, strict=True):
                    acc = accs[t][1]
                    builder.store(builder.call(fma, [row_weights[part][1], inputs, builder.load(acc)]), acc)
    for accs in rows_accs:
        for target, acc in accs:
            builder.store(builder.load(acc), target, align=4)


def _pass_widths(builder, width, widest: int, loop):
    """Branch to `loop(tokens)` compiled for the `width` of this pass, 1 to `widest`."""
    for tokens in range(1, widest + 1):
        with builder.if_then(builder.icmp_signed("==", width, ir.Constant(width.type, tokens))):
            loop(tokens)


@intrinsic
def _lanes_total(typingctx, sums, offset):
    """The sum of the `LANES` floats at `sums[offset:]`, added in a tree: a loop over them would chain each addition
    on the last, for every row and input of a pass."""

    def codegen(context, builder, signature, args):
        pointer = _pointer(context, builder, signature.args[0], args[0], args[1], F32)
        return _horizontal_sum(builder, _load(builder, pointer, ir.Constant(I32, 0), ir.VectorType(F32, LANES)))

    return types.float32(sums, offset), codegen


@intrinsic
def _row_dot_tokens(
    typingctx, blocks, block_offset, scales, scale_offset, x, x_offset, tokens, sums, sums_offset, groups, ahead
):
    """One MXFP4 row dotted with `tokens` inputs at once (1 to `PASS_TOKENS`): each block is decoded once and used
    `tokens` times.

    `x` is laid out by block, then input (`kernels.passes_by_block`): input t's elements of block g are
    `x[x_offset + (g * tokens + t) * 32:][:32]`, in `BLOCK_ORDER`. Each input's lanes of partial sums are added to
    `sums[sums_offset + t * LANES:][:LANES]`, summed across by the caller at the end of the row. The loop is
    compiled for every width, its accumulators in registers, and the call branches to the one for `tokens`.

    Each block read asks for the block `ahead` blocks on, into L2: `_in_passes` passes the same block of the next
    chunk of rows, which this core reads next. (The decoding kernel's distance along the rows lands, in this tiled
    order, on blocks read several tiles later, and into L1, where they pushed out the inputs.)
    """

    def codegen(context, builder, signature, args):
        b_arr, b_off, s_arr, s_off, x_arr, x_off, width, o_arr, o_off, count, ahead = args
        bt, _, st, _, xt, _, _, ot, _, _, _ = signature.args
        bp = _pointer(context, builder, bt, b_arr, b_off, I8)
        sp = _pointer(context, builder, st, s_arr, s_off, I8)
        xp = _pointer(context, builder, xt, x_arr, x_off, F32)
        op = _pointer(context, builder, ot, o_arr, o_off, F32)

        def decoded(g):  # the block's weights, scaled
            _prefetch_ahead(builder, bp, sp, g, ahead)
            return [list(_blocks(builder, bp, sp, g))]

        _pass_widths(builder, width, PASS_TOKENS, lambda tokens: _pass_loop(builder, decoded, xp, [op], count, tokens))
        return context.get_dummy_value()

    arguments = (blocks, block_offset, scales, scale_offset, x, x_offset, tokens, sums, sums_offset, groups, ahead)
    return types.none(*arguments), codegen


def _bf16_pass_intrinsic(rows: int):
    """An intrinsic for `rows` consecutive BF16 rows (`columns` apart) dotted with a pass's inputs: `_row_dot_tokens`
    for rows widened in registers (`_row_weights`), 32 elements a block, every input load shared by the rows; x laid
    out in `BF16_ORDER`, the rows' sums `PASS_TOKENS * LANES` apart."""

    @intrinsic
    def rows_tokens(typingctx, weights, offset, columns, x, x_offset, tokens, sums, sums_offset, count, ahead):
        def codegen(context, builder, signature, args):
            w_arr, w_off, cols, x_arr, x_off, width, o_arr, o_off, n, far = args
            wt, _, _, xt, _, _, ot, _, _, _ = signature.args
            starts = [builder.add(w_off, builder.mul(cols, ir.Constant(cols.type, k))) for k in range(rows)]
            wps = [_pointer(context, builder, wt, w_arr, start, I16) for start in starts]
            xp = _pointer(context, builder, xt, x_arr, x_off, F32)
            sums_at = [builder.add(o_off, ir.Constant(o_off.type, k * PASS_TOKENS * LANES)) for k in range(rows)]
            ops = [_pointer(context, builder, ot, o_arr, at, F32) for at in sums_at]

            def widened(g):  # the even elements' weights, then the odd ones' (`BF16_ORDER`)
                offset = builder.mul(g, ir.Constant(g.type, 32))
                rows_weights = []
                for wp in wps:
                    _prefetch(builder, builder.gep(wp, [builder.mul(builder.add(g, far), ir.Constant(g.type, 32))]), 2)
                    parts = _row_weights(builder, wp, offset, bf16=True)
                    rows_weights.append([(position, w) for position, (_, w) in zip((0, DOT_LANES), parts, strict=True)])
                return rows_weights

            _pass_widths(
                builder, width, DENSE_PASS_TOKENS, lambda tokens: _pass_loop(builder, widened, xp, ops, n, tokens)
            )
            return context.get_dummy_value()

        arguments = (weights, offset, columns, x, x_offset, tokens, sums, sums_offset, count, ahead)
        return types.none(*arguments), codegen

    return rows_tokens


_bf16_row_pass, _bf16_rows_pass = _bf16_pass_intrinsic(1), _bf16_pass_intrinsic(DENSE_ROWS)


BF16_STEP = 2 * DOT_LANES  # BF16 weights a step of a row's dot product takes: 16 32-bit words of two each
BF16_ORDER = np.concatenate([np.arange(0, BF16_STEP, 2), np.arange(1, BF16_STEP, 2)])  # see `_row_weights`


def _row_weights(builder, ap, offset, bf16: bool):
    """Yield (offset in x, `<16 x float>` weights) for the step of a row at element `offset`: 16 float32s, or 32 BF16s
    read as 16 words whose low halves (the even elements), shifted up, and high halves (the odd ones), masked, are
    two vectors of floats, two instructions for 32 weights where widening 16 takes two; x is laid out to match
    (`BF16_ORDER`, `kernels.bf16_ordered`)."""
    vf = ir.VectorType(F32, DOT_LANES)
    if not bf16:
        yield offset, _load(builder, ap, offset, vf)
        return
    words = _load(builder, ap, offset, ir.VectorType(I32, DOT_LANES))
    yield offset, builder.bitcast(builder.shl(words, _vector(I32, [16] * DOT_LANES)), vf)
    odd = builder.add(offset, ir.Constant(offset.type, DOT_LANES))
    yield odd, builder.bitcast(builder.and_(words, _vector(I32, [0xFFFF0000] * DOT_LANES)), vf)


def _row_sums(builder, ap, bf16: bool, xs: list, n) -> list:
    """The `<16 x float>` sums of a weight row `ap[:n]` (float32, or BF16 bits widened in registers) times each row
    of x at the pointers `xs`, each in `UNROLL` accumulators added up at the end: one weight load for all of them,
    and each row's sum the same operations in the same order whatever the number of rows. A BF16 row 16 past a
    multiple of 32 ends with 16 widened one by one, x in its own order there."""
    vf, fma = _fma(builder, DOT_LANES)
    accs = [_accumulators(builder, UNROLL, DOT_LANES) for _ in xs]
    width = BF16_STEP if bf16 else DOT_LANES

    def step(index, j):
        offset = builder.mul(index, ir.Constant(n.type, width))
        ahead = builder.add(offset, ir.Constant(n.type, PREFETCH_BYTES // 2))
        _prefetch(builder, builder.gep(ap, [ahead]), 2)  # into L2 only: L1's few fill buffers stay the loads'
        for x_offset, w in _row_weights(builder, ap, offset, bf16):
            for x, acc in zip(xs, accs, strict=True):
                builder.store(builder.call(fma, [w, _load(builder, x, x_offset, vf), builder.load(acc[j])]), acc[j])

    steps = builder.udiv(n, ir.Constant(n.type, width))
    unroll = ir.Constant(steps.type, UNROLL)
    with cgutils.for_range(builder, builder.udiv(steps, unroll)) as loop:
        base = builder.mul(loop.index, unroll)
        for j in range(UNROLL):
            step(builder.add(base, ir.Constant(steps.type, j)), j)
    tail_start = builder.mul(builder.udiv(steps, unroll), unroll)
    with cgutils.for_range(builder, builder.sub(steps, tail_start)) as loop:
        step(builder.add(tail_start, loop.index), 0)
    if bf16:
        last = builder.udiv(builder.urem(n, ir.Constant(n.type, width)), ir.Constant(n.type, DOT_LANES))
        with cgutils.for_range(builder, last):
            offset = builder.mul(steps, ir.Constant(n.type, width))
            w = _bf16_load(builder, ap, offset, DOT_LANES)
            for x, acc in zip(xs, accs, strict=True):
                builder.store(builder.call(fma, [w, _load(builder, x, offset, vf), builder.load(acc[0])]), acc[0])
    totals = []
    for acc in accs:
        total = builder.load(acc[0])
        for other in acc[1:]:
            total = builder.fadd(total, builder.load(other))
        totals.append(total)
    return totals


@intrinsic
def _dot(typingctx, a, a_offset, b, b_offset, count):
    """`a[a_offset:][:count] . b[b_offset:][:count]`, float32 `b`, for `count` a multiple of 16. `a` is float32 or
    BF16 bits (uint16), widened in registers; for BF16, b is in `BF16_ORDER` (`_row_weights`)."""

    def codegen(context, builder, signature, args):
        a_arr, a_off, b_arr, b_off, n = args
        at, _, bt, _, _ = signature.args
        bf16 = at.dtype == types.uint16
        ap = _pointer(context, builder, at, a_arr, a_off, I16 if bf16 else F32)
        bp = _pointer(context, builder, bt, b_arr, b_off, F32)
        return _horizontal_sum(builder, _row_sums(builder, ap, bf16, [bp], n)[0])

    return types.float32(a, a_offset, b, b_offset, count), codegen


def _dot_rows_intrinsic(rows: int):
    @intrinsic
    def dot_rows(typingctx, a, a_offset, b, b_offset, b_stride, count, out, out_offset, out_stride):
        """`out[out_offset + t * out_stride] = a[a_offset:][:count] . b[b_offset + t * b_stride:][:count]` for
        `rows` rows t of `b`: each block of `a` (float32 or BF16 bits) is loaded and widened once for all of them.
        Every row's sum runs exactly as `_dot`'s (`_row_sums`), so a row gives the bits `_dot` gives: verifying
        drafted tokens reads the weights once and decodes as one-token steps do."""

        def codegen(context, builder, signature, args):
            a_arr, a_off, b_arr, b_off, b_step, n, o_arr, o_off, o_step = args
            at, _, bt, _, _, _, ot, _, _ = signature.args
            bf16 = at.dtype == types.uint16
            ap = _pointer(context, builder, at, a_arr, a_off, I16 if bf16 else F32)
            bp = _pointer(context, builder, bt, b_arr, b_off, F32)
            op = _pointer(context, builder, ot, o_arr, o_off, F32)
            xs = [builder.gep(bp, [builder.mul(b_step, ir.Constant(b_step.type, t))]) for t in range(rows)]
            for t, total in enumerate(_row_sums(builder, ap, bf16, xs, n)):
                target = builder.gep(op, [builder.mul(o_step, ir.Constant(o_step.type, t))])
                builder.store(_horizontal_sum(builder, total), target)
            return context.get_dummy_value()

        arguments = (a, a_offset, b, b_offset, b_stride, count, out, out_offset, out_stride)
        return types.none(*arguments), codegen

    return dot_rows


DOT_ROWS = 4 if ISA == "avx512" else 2  # rows of x `matvec` multiplies per weight load: 4 accumulators each
_dot_rows = _dot_rows_intrinsic(DOT_ROWS)


def _scores_intrinsic(heads: int):
    @intrinsic
    def scores_tile(typingctx, k, k_offset, k_stride, q, q_offset, dim, scale, out, out_offset, out_stride):
        """Scores of `heads` consecutive query heads (`q[q_offset + i * dim:][:dim]`) against 16 keys, whose
        dimension d is `k[k_offset + d * k_stride:][:16]`: `out[out_offset + i * out_stride:][:16]`."""

        def codegen(context, builder, signature, args):
            k_arr, k_off, k_step, q_arr, q_off, n, a, o_arr, o_off, o_step = args
            kt, _, _, qt, _, _, _, ot, _, _ = signature.args
            kp = _pointer(context, builder, kt, k_arr, k_off, _cache_element(kt))
            qp = _pointer(context, builder, qt, q_arr, q_off, F32)
            op = _pointer(context, builder, ot, o_arr, o_off, F32)
            vf, fma = _fma(builder, DOT_LANES)
            accs = _accumulators(builder, heads, DOT_LANES)
            with cgutils.for_range(builder, n) as loop:
                row = builder.mul(loop.index, k_step)
                ahead = builder.add(row, ir.Constant(row.type, AHEAD_POSITIONS))
                _prefetch(builder, builder.gep(kp, [ahead]), locality=2)
                keys = _load_widened(builder, kp, row, DOT_LANES)
                for i, acc in enumerate(accs):
                    index = builder.add(builder.mul(n, ir.Constant(n.type, i)), loop.index)
                    query = _splat(builder, builder.load(builder.gep(qp, [index])), DOT_LANES)
                    builder.store(builder.call(fma, [query, keys, builder.load(acc)]), acc)
            for i, acc in enumerate(accs):
                target = builder.gep(op, [builder.mul(o_step, ir.Constant(o_step.type, i))])
                scaled = builder.fmul(builder.load(acc), _splat(builder, a, DOT_LANES))
                builder.store(scaled, builder.bitcast(target, vf.as_pointer()), align=1)
            return context.get_dummy_value()

        arguments = (k, k_offset, k_stride, q, q_offset, dim, scale, out, out_offset, out_stride)
        return types.none(*arguments), codegen

    return scores_tile


def _mix_intrinsic(heads: int, rows: int):
    @intrinsic
    def mix_tile(typingctx, v, v_offset, v_stride, w, w_offset, w_stride, out, out_offset, out_stride, blocks):
        """Adds to `out[out_offset + i * out_stride + r]` the dot product of value row r,
        `v[v_offset + r * v_stride:][:16 * blocks]`, with the weights of head i, `w[w_offset + i * w_stride:]
        [:16 * blocks]`, for `rows` rows and `heads` heads: each vector of weights is loaded once for all rows, each
        of values once for all heads."""

        def codegen(context, builder, signature, args):
            v_arr, v_off, v_step, w_arr, w_off, w_step, o_arr, o_off, o_step, n = args
            vt, _, _, wt, _, _, ot, _, _, _ = signature.args
            vp = _pointer(context, builder, vt, v_arr, v_off, _cache_element(vt))
            wp = _pointer(context, builder, wt, w_arr, w_off, F32)
            op = _pointer(context, builder, ot, o_arr, o_off, F32)
            vf, fma = _fma(builder, LANES)
            accs = [_accumulators(builder, rows, LANES) for _ in range(heads)]
            value_rows = [builder.mul(v_step, ir.Constant(v_step.type, r)) for r in range(rows)]
            weight_rows = [builder.mul(w_step, ir.Constant(w_step.type, i)) for i in range(heads)]
            with cgutils.for_range(builder, builder.mul(n, ir.Constant(n.type, 16 // LANES))) as loop:
                offset = builder.mul(loop.index, ir.Constant(n.type, LANES))
                values = []
                for row in value_rows:
                    at = builder.add(row, offset)
                    ahead = builder.add(at, ir.Constant(n.type, AHEAD_POSITIONS))
                    _prefetch(builder, builder.gep(vp, [ahead]), locality=2)
                    values.append(_load_widened(builder, vp, at, LANES))
                for head, row in zip(accs, weight_rows, strict=True):
                    weights = _load(builder, wp, builder.add(row, offset), vf)
                    for acc, value in zip(head, values, strict=True):
                        builder.store(builder.call(fma, [weights, value, builder.load(acc)]), acc)
            for i, head in enumerate(accs):
                for r, acc in enumerate(head):
                    index = builder.add(builder.mul(o_step, ir.Constant(o_step.type, i)), ir.Constant(o_step.type, r))
                    target = builder.gep(op, [index])
                    total = _horizontal_sum(builder, builder.load(acc))
                    builder.store(builder.fadd(builder.load(target), total), target)
            return context.get_dummy_value()

        arguments = (v, v_offset, v_stride, w, w_offset, w_stride, out, out_offset, out_stride)
        return types.none(*arguments, blocks), codegen

    return mix_tile


_scores_tile, _scores_head = _scores_intrinsic(HEAD_TILE), _scores_intrinsic(1)
# Value rows a decoding step's weighted sum takes at once, each with `HEAD_TILE` heads. On AVX2, 3 rows x 4 heads
# keep 12 sums in flight, enough to cover the FMA's latency at two a cycle (2 x 4 kept 8, no slack), in 16 of its
# 16 registers. On AVX-512, 3 rows x 8 heads: 24 sums, 3 values and a weight in the 32 registers. 4 rows, with 32
# sums, keep some in memory, which only paid while the loop waited on memory (see the README).
MIX_ROWS = 3
_mix_tile, _mix_head = _mix_intrinsic(HEAD_TILE, MIX_ROWS), _mix_intrinsic(1, MIX_ROWS)
_mix_tile_row, _mix_head_row = _mix_intrinsic(HEAD_TILE, 1), _mix_intrinsic(1, 1)

# exp(r) for |r| <= ln(2) / 2 as 1 + r + r^2 p(r), Cephes' `expf` coefficients (within an ulp or two of exp);
# ln 2 in two parts, the first exact in few bits, so that x - n ln 2 is exact for the n of float32's range.
EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4
EXP_UNDERFLOW = -87.33654  # ln of float32's smallest normal: below it, 0


def _exp(builder, x):
    """exp(x) lane by lane for `x <= 0` (the log-weights of a softmax, -inf where masked): exp(r) 2^n with
    n = round(x / ln 2), r = x - n ln 2. numba calls the C library's exp once per element; this is vectorized."""
    lanes = x.type.count
    vf, fma = _fma(builder, lanes)
    vi = ir.VectorType(I32, lanes)
    underflow = builder.fcmp_ordered("<", x, _vector(F32, [EXP_UNDERFLOW] * lanes))
    x = builder.select(underflow, _vector(F32, [EXP_UNDERFLOW] * lanes), x)  # no -inf into the integer conversion
    rint = _function(builder, f"llvm.rint.v{lanes}f32", vf, vf)
    n = builder.call(rint, [builder.fmul(x, _vector(F32, [1 / np.log(2)] * lanes))])
    r = builder.call(fma, [n, _vector(F32, [-LN2_HIGH] * lanes), x])
    r = builder.call(fma, [n, _vector(F32, [-LN2_LOW] * lanes), r])
    p = _vector(F32, [EXP_POLYNOMIAL[0]] * lanes)
    for c in EXP_POLYNOMIAL[1:]:
        p = builder.call(fma, [p, r, _vector(F32, [c] * lanes)])
    e = builder.fadd(builder.call(fma, [p, builder.fmul(r, r), r]), _vector(F32, [1.0] * lanes))
    exponent = builder.shl(builder.add(builder.fptosi(n, vi), _vector(I32, [127] * lanes)), _vector(I32, [23] * lanes))
    e = builder.fmul(e, builder.bitcast(exponent, vf))
    return builder.select(underflow, _vector(F32, [0.0] * lanes), e)


@intrinsic
def _row_max(typingctx, a, offset, count):
    """The largest of `a[offset:][:count]` (-inf for none), `count` a multiple of 16."""

    def codegen(context, builder, signature, args):
        a_arr, a_off, n = args
        ap = _pointer(context, builder, signature.args[0], a_arr, a_off, F32)
        vf = ir.VectorType(F32, DOT_LANES)

        def step(builder, i, acc):
            return _max(builder, acc, _load(builder, ap, builder.mul(i, ir.Constant(n.type, DOT_LANES)), vf))

        steps = builder.udiv(n, ir.Constant(n.type, DOT_LANES))
        lanes = _accumulate(builder, steps, DOT_LANES, step, start=-np.inf, combine=_max)
        return _horizontal_sum(builder, lanes, combine=_max)

    return types.float32(a, offset, count), codegen


@intrinsic
def _exp_sum(typingctx, a, offset, count, peak):
    """Replaces `a[offset:][:count]` by `exp(a - peak)` (`_exp`; `peak` at least their largest) and returns their
    sum, `count` a multiple of 16."""

    def codegen(context, builder, signature, args):
        a_arr, a_off, n, top = args
        ap = _pointer(context, builder, signature.args[0], a_arr, a_off, F32)
        vf = ir.VectorType(F32, DOT_LANES)
        peaks = _splat(builder, top, DOT_LANES)

        def step(builder, i, acc):
            offset = builder.mul(i, ir.Constant(n.type, DOT_LANES))
            pointer = builder.bitcast(builder.gep(ap, [offset]), vf.as_pointer())
            weights = _exp(builder, builder.fsub(builder.load(pointer, align=1), peaks))
            builder.store(weights, pointer, align=1)
            return builder.fadd(acc, weights)

        steps = builder.udiv(n, ir.Constant(n.type, DOT_LANES))
        return _horizontal_sum(builder, _accumulate(builder, steps, DOT_LANES, step))

    return types.float32(a, offset, count, peak), codegen


def _swiglu(builder, gate, up, alpha, limit):
    """`layers.clamped_swiglu` lane by lane: gate * sigmoid(alpha * gate) * (up + 1), gate clamped from above and up
    on both sides, with `_exp` (whose domain is x <= 0) of -|alpha * gate|: sigmoid(a) is 1 / (1 + e) for a >= 0,
    and e / (1 + e) below, with e = exp(-|a|) (NumPy's form, gate / (exp(-a) + 1), overflows to inf there)."""
    lanes = gate.type.count
    high, one = _splat(builder, limit, lanes), _vector(F32, [1.0] * lanes)
    low = builder.fneg(high)
    gate = builder.select(builder.fcmp_ordered(">", gate, high), high, gate)
    up = builder.select(builder.fcmp_ordered("<", up, low), low, up)
    up = builder.select(builder.fcmp_ordered(">", up, high), high, up)
    a = builder.fmul(gate, _splat(builder, alpha, lanes))
    positive = builder.fcmp_ordered(">=", a, _vector(F32, [0.0] * lanes))
    e = _exp(builder, builder.select(positive, builder.fneg(a), a))
    swish = builder.fdiv(builder.select(positive, gate, builder.fmul(gate, e)), builder.fadd(e, one))
    return builder.fmul(swish, builder.fadd(up, one))


@intrinsic
def _swiglu_block(typingctx, gate_up, gate_up_offset, bias, bias_offset, alpha, limit, out, out_offset):
    """One block's 32 SwiGLU outputs (`_swiglu`) of `gate_up[gate_up_offset:][:64] + bias[bias_offset:][:64]` (gate
    and up interleaved) into `out[out_offset:][:32]`, in `BLOCK_ORDER`: the 64 inputs are loaded as one vector and
    shuffled into that order's gates and ups."""

    def codegen(context, builder, signature, args):
        g_arr, g_off, b_arr, b_off, a, lim, o_arr, o_off = args
        gt, _, bt, _, _, _, ot, _ = signature.args
        gp = _pointer(context, builder, gt, g_arr, g_off, F32)
        bp = _pointer(context, builder, bt, b_arr, b_off, F32)
        op = _pointer(context, builder, ot, o_arr, o_off, F32)
        v64 = ir.VectorType(F32, 64)
        zero = ir.Constant(g_off.type, 0)
        inputs = builder.fadd(_load(builder, gp, zero, v64), _load(builder, bp, zero, v64))
        for start in range(0, 32, LANES):
            elements = [int(e) for e in BLOCK_ORDER[start : start + LANES]]
            pick = [ir.Constant(ir.VectorType(I32, LANES), [2 * e + half for e in elements]) for half in (0, 1)]
            gate, up = (builder.shuffle_vector(inputs, inputs, mask) for mask in pick)
            target = builder.bitcast(
                builder.gep(op, [ir.Constant(o_off.type, start)]), ir.VectorType(F32, LANES).as_pointer()
            )
            builder.store(_swiglu(builder, gate, up, a, lim), target, align=4)
        return context.get_dummy_value()

    return types.none(gate_up, gate_up_offset, bias, bias_offset, alpha, limit, out, out_offset), codegen


@numba.njit(cache=CACHE)
def _exps(flat, start, count, floor):
    """`flat[start:][:count]` replaced by `exp(score - peak)`, `peak` the largest of them and `floor`: returns `peak`
    and the exponentials' sum. The last `count % 16` take the C library's exp."""
    body = count - count % DOT_LANES
    peak = max(_row_max(flat, start, body), floor)
    for j in range(start + body, start + count):
        peak = max(peak, flat[j])
    total = _exp_sum(flat, start, body, peak)
    for j in range(start + body, start + count):
        flat[j] = np.exp(flat[j] - peak)
        total += flat[j]
    return peak, total


@numba.njit(parallel=True, cache=CACHE)
def widen_half(bits, first, out):
    """`out[r, j]` = the float16 `bits[r, first + j]` as float32, rows shared out among the threads."""
    for r in prange(out.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] = _widened(bits[r, first + j])


@numba.njit(nogil=True, cache=CACHE)
def softmax_in_spans(scores, sinks, first, last, denominators):
    """`layers.softmax_in_spans` into `denominators [G, T]`, on the calling thread (a prompt's attention runs its kv
    heads in threads of its own), without holding the GIL.

    A row's span is widened to whole vectors of 16 (moved left where it would pass the row's end) and the scores it
    gains set to -inf, whose exponentials are 0: no scalar tail. Rows shorter than a vector keep one.
    """
    groups, tokens, count = scores.shape
    flat = scores.reshape(-1)
    for g in range(groups):
        for t in range(tokens):
            row = (g * tokens + t) * count
            lo, hi = first[t], last[t]
            if hi - lo < count - count % DOT_LANES:
                width = -(-(hi - lo) // DOT_LANES) * DOT_LANES
                lo = min(lo, count - width)
                flat[row + lo : row + first[t]] = -np.inf
                hi = lo + width
                flat[row + last[t] : row + hi] = -np.inf
            flat[row : row + lo] = 0
            flat[row + hi : row + count] = 0
            peak, total = _exps(flat, row + lo, hi - lo, sinks[g])
            denominators[g, t] = total + np.exp(sinks[g] - peak)


@numba.njit(parallel=True, cache=CACHE)
def mxfp4_matvec(blocks, scales, experts, x, out):
    """`out[p] = W[experts[p]] @ x[p]` for MXFP4 weights `blocks [E, R, G, 16]`, `scales [E, R, G]`.

    `x [n, G*32]` holds each block's elements in `BLOCK_ORDER` (`kernels.block_ordered`).
    """
    _, rows, groups, _ = blocks.shape
    flat_blocks = blocks.reshape(-1)
    flat_scales = scales.reshape(-1)
    chunks = _matvec_chunks(rows)
    for task in prange(experts.size * chunks):
        p, first, end = _matvec_task(task, chunks, rows)
        for r in range(first, end):
            row = experts[p] * rows + r
            out[p, r] = _mxfp4_row_dot(flat_blocks, row * groups * 16, flat_scales, row * groups, x[p], groups)


@numba.njit(inline="always")
def _matvec_chunks(rows):
    """The tasks of one pair's rows in a decoding matrix product: `MATVEC_ROWS` rows each."""
    return (rows + MATVEC_ROWS - 1) // MATVEC_ROWS


@numba.njit(inline="always")
def _matvec_task(task, chunks, rows):
    """Task `task`'s pair and its rows `first` to `end` (exclusive), for pairs of `chunks` tasks each."""
    p = task // chunks
    first = (task - p * chunks) * MATVEC_ROWS
    return p, first, min(rows, first + MATVEC_ROWS)


@numba.njit(parallel=True, cache=CACHE)
def mxfp4_matvec_vnni(blocks, scales, experts, x, parts, corrections, x_scales, out):
    """`mxfp4_matvec` by `_mxfp4_row_dot_vnni`: each row of x first quantized by `quantize_rounds` into `parts`,
    `corrections` and `x_scales` (`[n, ...]`, their sizes for `x`'s width). A row of x it does not take (not
    finite, or tiny) goes by `_mxfp4_row_dot`: infinities and NaN come out as float32's."""
    _, rows, groups, _ = blocks.shape
    flat_blocks = blocks.reshape(-1)
    flat_scales = scales.reshape(-1)
    quantized = np.empty(experts.size, np.bool_)
    for p in prange(experts.size):
        quantized[p] = quantize_rounds(x[p], parts[p], corrections[p], x_scales[p])
    chunks = _matvec_chunks(rows)
    for task in prange(experts.size * chunks):
        p, first, end = _matvec_task(task, chunks, rows)
        for r in range(first, end):
            row = experts[p] * rows + r
            if quantized[p]:
                out[p, r] = _mxfp4_row_dot_vnni(
                    flat_blocks, row * groups * 16, flat_scales, row * groups,
                    parts[p], corrections[p], x_scales[p], x[p], groups,
                )  # fmt: skip
            else:
                out[p, r] = _mxfp4_row_dot(flat_blocks, row * groups * 16, flat_scales, row * groups, x[p], groups)


@numba.njit(parallel=True, cache=CACHE)
def _in_passes(weights, scales, x, groups, widest, out):
    """`out [T, R] = x @ W.T` for a matrix of R rows of `groups` blocks of 32 elements (MXFP4 or BF16, see
    `_tile`): the rows in chunks of ROW_CHUNK shared out among the threads, the inputs in passes of near-equal
    widths up to `widest` (`x` laid out by `lay_out_passes` for that width), each pass in tiles of GROUP_CHUNK
    blocks (the inputs' slice stays in L1 while the chunk's rows go through it)."""
    tokens, rows = out.shape
    ahead = ROW_CHUNK * groups  # each block read asks for the same block of the thread's next chunk
    for chunk in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
        first = chunk * ROW_CHUNK
        last = min(rows, first + ROW_CHUNK)
        sums = np.empty((ROW_CHUNK, PASS_TOKENS, LANES), dtype=np.float32)
        flat_sums = sums.reshape(-1)
        t = 0
        while t < tokens:
            step = pass_tokens(tokens - t, widest)
            sums[:] = 0
            for g in range(0, groups, GROUP_CHUNK):
                inputs = (t * groups + g * step) * 32
                count = min(GROUP_CHUNK, groups - g)
                _tile(weights, scales, x, inputs, step, flat_sums, first, last, g, count, groups, ahead)
            for r in range(first, last):
                for u in range(step):
                    out[t + u, r] = _lanes_total(flat_sums, ((r - first) * PASS_TOKENS + u) * LANES)
            t += step


def _tile(weights, scales, x, inputs, step, sums, first, last, g, count, groups, ahead):
    """`_in_passes`'s tile: rows `first:last`, blocks `g:g+count` multiplied into the pass's `sums`. Compiled for
    MXFP4 `weights` (blocks, uint8) one row at a time, or BF16 bits (uint16; `scales` unused) `DENSE_ROWS` at a
    time."""
    raise NotImplementedError("compiled only, inside _in_passes")


@overload(_tile, inline="always")
def _tile_for(weights, scales, x, inputs, step, sums, first, last, g, count, groups, ahead):
    if weights.dtype not in (types.uint8, types.uint16):
        raise TypingError(f"_in_passes takes MXFP4 blocks (uint8) or BF16 bits (uint16), not {weights.dtype}")
    if weights.dtype == types.uint16:
        if LANES != DOT_LANES:
            raise TypingError("the BF16 pass kernel is built for AVX-512 only")

        def bf16_rows(weights, scales, x, inputs, step, sums, first, last, g, count, groups, ahead):
            columns = groups * 32
            r = first
            while r + DENSE_ROWS <= last:
                o = (r - first) * PASS_TOKENS * LANES
                _bf16_rows_pass(weights, r * columns + g * 32, columns, x, inputs, step, sums, o, count, ahead)
                r += DENSE_ROWS
            for row in range(r, last):
                o = (row - first) * PASS_TOKENS * LANES
                _bf16_row_pass(weights, row * columns + g * 32, columns, x, inputs, step, sums, o, count, ahead)

        return bf16_rows

    def mxfp4_rows(weights, scales, x, inputs, step, sums, first, last, g, count, groups, ahead):
        for r in range(first, last):
            b, s, o = (r * groups + g) * 16, r * groups + g, (r - first) * PASS_TOKENS * LANES
            _row_dot_tokens(weights, b, scales, s, x, inputs, step, sums, o, count, ahead)

    return mxfp4_rows


def mxfp4_matmul(blocks, scales, x, out):
    """`out = x @ W.T` for one MXFP4 matrix `blocks [R, G, 16]`, `scales [R, G]` and T inputs (`out [T, R]`).

    The inputs go through in passes of `pass_tokens` at a time; `x` holds them laid out pass by pass, each pass by
    block (`kernels.passes_by_block`).
    """
    _in_passes(blocks.reshape(-1), scales.reshape(-1), x, blocks.shape[1], PASS_TOKENS, out)


def bf16_matmul_passes(weights, x, out):
    """`out = x @ W.T` for BF16-bits `weights [R, C]` (C a multiple of 32; AVX-512) and T inputs, laid out by
    `lay_out_passes` in `BF16_ORDER` for passes of up to `DENSE_PASS_TOKENS`."""
    _in_passes(weights.reshape(-1), np.empty(0, np.uint8), x, weights.shape[1] // 32, DENSE_PASS_TOKENS, out)


@numba.njit(cache=CACHE)
def lay_out_passes(x, order, widest, out):
    """`kernels.passes_by_block` into `out`: `x [T, G*32]` pass after pass (`pass_tokens` of `widest`), each
    `[G, pass, 32]`, a block's 32 elements in `order` (`BLOCK_ORDER`, `BF16_ORDER`), in one pass over x (NumPy
    would need a reorder, then a transpose per pass)."""
    tokens, width = x.shape
    groups = width // 32
    t = 0
    while t < tokens:
        step = pass_tokens(tokens - t, widest)
        for g in range(groups):
            for u in range(step):
                target = (t * groups + g * step + u) * 32
                for j in range(32):
                    out[target + j] = x[t + u, g * 32 + order[j]]
        t += step


@numba.njit(nogil=True, cache=CACHE)
def reorder_steps(x, order, out):
    """`out [T, C]`: each row of `x [T, C]` with the elements of each whole step of `order.size` in `order` (out[s +
    i] = x[s + order[i]]), a last part shorter than a step as it is: `kernels.block_ordered`, `kernels.bf16_ordered`
    (NumPy's indexing spends more in its own overhead than on the copy, twice a layer for every token decoded)."""
    tokens, width = x.shape
    step = order.size
    body = width - width % step
    for t in range(tokens):
        for start in range(0, body, step):
            for i in range(step):
                out[t, start + i] = x[t, start + order[i]]
        for i in range(body, width):
            out[t, i] = x[t, i]


@numba.njit(parallel=True, cache=CACHE)
def swiglu_laid_out(gate_up, bias, bias_rows, alpha, limit, passes, out):
    """gpt-oss's clamped SwiGLU (`_swiglu`) of `gate_up [T, 2I] + bias[bias_rows[t]]`, gate and up interleaved,
    written where the next MXFP4 kernel reads its input: pass after pass as `lay_out_passes` writes (`passes`, for
    `mxfp4_matmul`), or row after row with each block's elements in `BLOCK_ORDER` (for `mxfp4_matvec`). Rows go to
    the threads, a block at a time in vector registers: one pass over the memory, where NumPy's clamps, exp and
    products took eight and the layout a ninth, on one core."""
    tokens, doubled = gate_up.shape
    groups = doubled // 64
    flat_gate_up, flat_bias = gate_up.reshape(-1), bias.reshape(-1)
    for t in prange(tokens):
        row = np.int64(t)  # prange's index is unsigned: mixed with signed, numba would index with a float
        start, step = _pass_holding(row, tokens) if passes else (row, np.int64(1))
        for g in range(groups):
            target = (start * groups + g * step + row - start) * 32
            _swiglu_block(flat_gate_up, (row * groups + g) * 64, flat_bias, (bias_rows[t] * groups + g) * 64, alpha,
                          limit, out, target)  # fmt: skip


@numba.njit(cache=CACHE)
def _pass_holding(row, tokens):
    """The first row and the width of the pass `lay_out_passes` puts row `row` of `tokens` in."""
    start, step = 0, pass_tokens(tokens)
    while start + step <= row:
        start += step
        step = pass_tokens(tokens - start)
    return start, step


@numba.njit(cache=CACHE)
def _starts(sizes):
    """Where each of the items of `sizes` starts in their concatenation, and (last) where it ends."""
    starts = np.zeros(sizes.size + 1, dtype=np.int64)
    for i in range(sizes.size):
        starts[i + 1] = starts[i] + sizes[i]
    return starts


@numba.njit(cache=CACHE)
def pass_tokens(remaining, widest=PASS_TOKENS):
    """How many of the `remaining` inputs the next pass takes: the fewest passes of at most `widest`, near-equal
    widths."""
    passes = (remaining + widest - 1) // widest
    return (remaining + passes - 1) // passes


@numba.njit(cache=CACHE)
def _row_tasks(weights, span):
    """`matvec`'s tasks: for each, its matrix, first row and first column of the output (`span` rows of one matrix,
    the matrices in turn)."""
    count = 0
    for m in range(len(weights)):
        count += (_matrix(weights, m).shape[0] + span - 1) // span
    matrix, first, column = np.empty(count, np.int64), np.empty(count, np.int64), np.empty(count, np.int64)
    task, offset = 0, 0
    for m in range(len(weights)):
        rows = _matrix(weights, m).shape[0]
        for r in range(0, rows, span):
            matrix[task], first[task], column[task] = m, r, offset + r
            task += 1
        offset += rows
    return matrix, first, column


@numba.njit(cache=CACHE)
def _matrix(weights, m):
    """`weights[m]`, a tuple indexed at run time: a function of its own, as numba's parallel loops cannot type it."""
    return weights[m]


def matvec_span(rows: int) -> int:
    """Rows a `matvec` task takes: up to MATVEC_ROWS, and at least four tasks a thread, so that a router's few rows,
    or a small matrix on many cores, still reach every thread."""
    return max(1, min(MATVEC_ROWS, rows // (4 * numba.get_num_threads())))


@numba.njit(parallel=True, cache=CACHE)
def matvec(weights, x, out, span):
    """`out = x @ W.T` for a tuple of float32 or BF16-bits matrices `[R_i, C]` of one type (C a multiple of 16) and a
    few rows `x [T, C]`, their outputs side by side in `out [T, sum of R_i]`: one parallel loop over all their rows,
    in tasks of `span` rows of one matrix (`matvec_span`), so that a step's q, k and v projections take one call."""
    tokens, cols = x.shape
    total = out.shape[1]
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    # Several rows (verifying drafted tokens): `DOT_ROWS` of them per load of a weight row, the rest one by one.
    grouped = tokens - tokens % DOT_ROWS
    matrix, first, column = _row_tasks(weights, span)
    for task in prange(matrix.size):
        weight = _matrix(weights, matrix[task])
        flat = weight.reshape(-1)
        for r in range(first[task], min(weight.shape[0], first[task] + span)):
            o = column[task] + r - first[task]
            for t in range(0, grouped, DOT_ROWS):
                _dot_rows(flat, r * cols, flat_x, t * cols, cols, cols, flat_out, t * total + o, total)
            for t in range(grouped, tokens):
                out[t, o] = _dot(flat, r * cols, x[t], 0, cols)


# Decoding's products with packed BF16 matrices (`mlx_oss.packed_bf16`): 96 bytes a group of 64 weights, 32 of 4-bit
# codes and 64 low bytes. A vector of codes looks up the row's 16 high bytes in one byte shuffle (`vpshufb`, within
# each 128-bit lane), the low and high bytes interleave into BF16 words (`vpunpcklbw`, `vpunpckhbw`), and each
# 32-bit pair of words gives two floats, as `_row_weights` widens BF16: x is laid out to match (`PACKED_ORDER`).
# Each row's few exceptions (weights stored as +0.0) are added after its sum, from x as it is.
PACKED_GROUP, PACKED_GROUP_BYTES = 64, 96
PACKED_VECTOR = 64 if ISA == "avx512" else 32  # bytes of a vector register
PACKED_AHEAD = 8192  # bytes ahead of its reads a row's stream asks for, into L2 (4096 kept too few in flight)


def _packed_order() -> np.ndarray:
    """The element of a group each lane of `_packed_weights`'s vectors holds, vector after vector."""
    order = []
    for part in range(0, PACKED_GROUP, PACKED_VECTOR):  # a vector of low bytes at a time
        for half in (0, 8):  # the interleave of each 128-bit lane's low eight bytes, then of its high eight
            words = [part + 16 * lane + half + i for lane in range(PACKED_VECTOR // 16) for i in range(8)]
            order += words[0::2] + words[1::2]  # a pair's first word shifted up, then its second masked
    return np.array(order)


PACKED_ORDER = _packed_order()


def _packed_weights(builder, group, table):
    """Yield the `<PACKED_VECTOR / 4 x float>` weights of the packed group at `group`, in `PACKED_ORDER`; `table` is
    the row's 16 high bytes repeated in every 128-bit lane."""
    vb, codes_type = ir.VectorType(I8, PACKED_VECTOR), ir.VectorType(I8, 32)
    lanes = PACKED_VECTOR // 4
    vi, vf = ir.VectorType(I32, lanes), ir.VectorType(F32, lanes)
    name = "llvm.x86.avx512.pshuf.b.512" if PACKED_VECTOR == 64 else "llvm.x86.avx2.pshuf.b"
    lookup = _function(builder, name, vb, vb, vb)
    codes = _load(builder, group, ir.Constant(I32, 0), codes_type)
    words16 = ir.VectorType(I16, 16)
    high_nibbles = builder.bitcast(builder.lshr(builder.bitcast(codes, words16), _vector(I16, [4] * 16)), codes_type)
    if PACKED_VECTOR == 64:  # weights 0-31's codes, then 32-63's, in one vector
        both = ir.Constant(ir.VectorType(I32, 64), list(range(64)))
        indices = [builder.shuffle_vector(codes, high_nibbles, both)]
    else:
        indices = [codes, high_nibbles]
    for part, index in enumerate(indices):
        high = builder.call(lookup, [table, builder.and_(index, _vector(I8, [0x0F] * PACKED_VECTOR))])
        low = _load(builder, group, ir.Constant(I32, 32 + part * PACKED_VECTOR), vb)
        for half in (0, 8):
            pairs = [(16 * lane + half + i, PACKED_VECTOR + 16 * lane + half + i)
                     for lane in range(PACKED_VECTOR // 16) for i in range(8)]  # fmt: skip
            mask = ir.Constant(ir.VectorType(I32, PACKED_VECTOR), [k for pair in pairs for k in pair])
            words = builder.bitcast(builder.shuffle_vector(low, high, mask), vi)
            yield builder.bitcast(builder.shl(words, _vector(I32, [16] * lanes)), vf)
            yield builder.bitcast(builder.and_(words, _vector(I32, [0xFFFF0000] * lanes)), vf)


@intrinsic
def _packed_dot(typingctx, packed, offset, tables, table_offset, x, x_offset, groups):
    """One packed BF16 row (`groups` groups from `packed[offset:]`, its table at `tables[table_offset:]`) dotted with
    `x[x_offset:]` laid out in `PACKED_ORDER`, its exceptions left out."""

    def codegen(context, builder, signature, args):
        p_arr, p_off, t_arr, t_off, x_arr, x_off, count = args
        pt, _, tt, _, xt, _, _ = signature.args
        pp = _pointer(context, builder, pt, p_arr, p_off, I8)
        xp = _pointer(context, builder, xt, x_arr, x_off, F32)
        lanes = PACKED_VECTOR // 4
        vf, fma = _fma(builder, lanes)
        tp = _pointer(context, builder, tt, t_arr, t_off, I8)
        row_table = _load(builder, tp, ir.Constant(I32, 0), ir.VectorType(I8, 16))
        spread = ir.Constant(ir.VectorType(I32, PACKED_VECTOR), [i % 16 for i in range(PACKED_VECTOR)])
        table = builder.shuffle_vector(row_table, row_table, spread)
        accs = _accumulators(builder, UNROLL, lanes)
        with cgutils.for_range(builder, count) as loop:
            g = loop.index
            group = builder.gep(pp, [builder.mul(g, ir.Constant(g.type, PACKED_GROUP_BYTES))])
            for line in (0, 64):
                _prefetch(builder, builder.gep(group, [ir.Constant(I32, PACKED_AHEAD + line)]), 2)
            group_x = builder.gep(xp, [builder.mul(g, ir.Constant(g.type, PACKED_GROUP))])
            for j, weights in enumerate(_packed_weights(builder, group, table)):
                acc = accs[j % UNROLL]
                inputs = _load(builder, group_x, ir.Constant(I32, j * lanes), vf)
                builder.store(builder.call(fma, [weights, inputs, builder.load(acc)]), acc)
        total = builder.load(accs[0])
        for acc in accs[1:]:
            total = builder.fadd(total, builder.load(acc))
        return _horizontal_sum(builder, total)

    return types.float32(packed, offset, tables, table_offset, x, x_offset, groups), codegen


@numba.njit(parallel=True, cache=CACHE)
def packed_matvec(packed, tables, row_starts, columns, values, x, x_plain, out, span):
    """`matvec` for a tuple of packed BF16 matrices (`packed`, `tables` and each one's exceptions: `row_starts`
    into `columns` and `values`, see `packed_bf16.PackedMatrix`): `x` in `PACKED_ORDER`, `x_plain` as it is."""
    tokens, cols = x.shape
    groups = cols // PACKED_GROUP
    flat_x = x.reshape(-1)
    matrix, first, column = _row_tasks(packed, span)
    for task in prange(matrix.size):
        m = matrix[task]
        weight = _matrix(packed, m)
        flat, flat_tables = weight.reshape(-1), _matrix(tables, m).reshape(-1)
        starts, where, exceptions = _matrix(row_starts, m), _matrix(columns, m), _matrix(values, m)
        width = weight.shape[1]
        for r in range(first[task], min(weight.shape[0], first[task] + span)):
            o = column[task] + r - first[task]
            for t in range(tokens):
                dot = _packed_dot(flat, r * width, flat_tables, r * 16, flat_x, t * cols, groups)
                for e in range(starts[r], starts[r + 1]):
                    dot += exceptions[e] * x_plain[t, where[e]]
                out[t, o] = dot


@intrinsic
def _unpack_row(typingctx, packed, offset, tables, table_offset, out, out_offset, groups):
    """The BF16 bits of one packed row (`groups` groups from `packed[offset:]`, its table at
    `tables[table_offset:]`) into `out[out_offset:]`: weight j < 32 of a group has the high byte its code's low
    nibble looks up (`vpshufb`, the table in each 128-bit lane) and low byte `32 + j`, weight 32 + j the high
    nibble's and low byte `64 + j`; bytes widened to words in order (`vpmovzxbw`)."""

    def codegen(context, builder, signature, args):
        p_arr, p_off, t_arr, t_off, o_arr, o_off, count = args
        pt, _, tt, _, ot, _, _ = signature.args
        pp = _pointer(context, builder, pt, p_arr, p_off, I8)
        op = _pointer(context, builder, ot, o_arr, o_off, I16)
        tp = _pointer(context, builder, tt, t_arr, t_off, I8)
        half = PACKED_GROUP // 2
        vb, vw = ir.VectorType(I8, half), ir.VectorType(I16, half)
        lookup = _function(builder, "llvm.x86.avx2.pshuf.b", vb, vb, vb)
        row_table = _load(builder, tp, ir.Constant(I32, 0), ir.VectorType(I8, 16))
        table = builder.shuffle_vector(
            row_table, row_table, ir.Constant(ir.VectorType(I32, half), [i % 16 for i in range(half)])
        )
        nibble = _vector(I8, [0x0F] * half)
        with cgutils.for_range(builder, count) as loop:
            g = loop.index
            group = builder.gep(pp, [builder.mul(g, ir.Constant(g.type, PACKED_GROUP_BYTES))])
            words = builder.gep(op, [builder.mul(g, ir.Constant(g.type, PACKED_GROUP))])
            codes = _load(builder, group, ir.Constant(I32, 0), vb)
            nibbles = (builder.and_(codes, nibble), builder.and_(builder.lshr(codes, _vector(I8, [4] * half)), nibble))
            for part, index in enumerate(nibbles):
                high = builder.zext(builder.call(lookup, [table, index]), vw)
                low = builder.zext(_load(builder, group, ir.Constant(I32, half * (part + 1)), vb), vw)
                word = builder.or_(builder.shl(high, _vector(I16, [8] * half)), low)
                builder.store(
                    word, builder.bitcast(builder.gep(words, [ir.Constant(I32, part * half)]), vw.as_pointer()), align=1
                )
        return context.get_dummy_value()

    return types.none(packed, offset, tables, table_offset, out, out_offset, groups), codegen


@numba.njit(parallel=True, cache=CACHE)
def unpack_packed(packed, tables, out):
    """The BF16 bits of packed rows into `out [R, C]`, exceptions aside (left as +0.0: see `packed_bf16`)."""
    rows, width = packed.shape
    groups = width // PACKED_GROUP_BYTES
    flat, flat_tables, flat_out = packed.reshape(-1), tables.reshape(-1), out.reshape(-1)
    for r in prange(rows):
        _unpack_row(flat, r * width, flat_tables, r * 16, flat_out, r * out.shape[1], groups)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the array types the model passes."""
    blocks = _read_only(np.zeros((1, 1, 1, 16), np.uint8))
    scales = _read_only(np.full((1, 1, 1), 127, np.uint8))
    xs = np.zeros((1, 16), np.float32)
    mxfp4_matvec(blocks, scales, np.zeros(1, np.int64), np.zeros((1, 32), np.float32), np.empty((1, 1), np.float32))
    if VNNI:
        quantized = np.empty((1, 384), np.int8), np.empty((1, 16), np.int32), np.empty((1, 16), np.float32)
        x = np.zeros((1, 128), np.float32)
        mxfp4_matvec_vnni(blocks, scales, np.zeros(1, np.int64), x, *quantized, np.empty((1, 1), np.float32))
    q, spans = np.zeros((1, 2, 4), np.float32), (np.zeros(1, np.int64), np.ones(1, np.int64))
    for dtype in (np.uint16, np.float32):  # the KV cache's float16 (as bits) and float32 buffers
        cached = np.zeros((1, 4, 1), dtype)
        attention(q, cached, cached, np.zeros(2, np.float32), 0, *spans, np.float32(1), np.empty_like(q))
    softmax_in_spans(np.zeros((2, 1, 1), np.float32), np.zeros(2, np.float32), *spans, np.empty((2, 1), np.float32))
    widen_half(np.zeros((1, 1), np.uint16), 0, np.empty((1, 1), np.float32))
    lay_out_passes(np.zeros((1, 32), np.float32), BLOCK_ORDER, PASS_TOKENS, np.empty(32, np.float32))
    reorder_steps(np.zeros((1, 32), np.float32), BLOCK_ORDER, np.empty((1, 32), np.float32))
    for passes in (True, False):
        swiglu_laid_out(np.zeros((1, 64), np.float32), np.zeros((1, 64), np.float32), np.zeros(1, np.int64),
                        np.float32(1), np.float32(1), passes, np.empty(32, np.float32))  # fmt: skip
    mxfp4_matmul(blocks[0], scales[0], np.zeros(32, np.float32), np.empty((1, 1), np.float32))
    if ISA == "avx512":
        bf16 = _read_only(np.zeros((1, 32), np.uint16))
        bf16_matmul_passes(bf16, np.zeros(32, np.float32), np.empty((1, 1), np.float32))
    packed = _read_only(np.zeros((1, PACKED_GROUP_BYTES), np.uint8)), _read_only(np.zeros((1, 16), np.uint8))
    exceptions = np.zeros(2, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    for count in (1, 3):  # a checkpoint's unembedding; its q, k and v
        parts = [(part,) * count for part in packed + exceptions]
        x = np.zeros((1, PACKED_GROUP), np.float32)
        packed_matvec(*parts, x, x, np.empty((1, count), np.float32), 1)
    unpack_packed(*packed, np.empty((1, PACKED_GROUP), np.uint16))
    for dtype in (np.uint16, np.float32):
        weight = _read_only(np.zeros((1, 16), dtype))
        matvec((weight,), xs, np.empty((1, 1), np.float32), 1)
        matvec((weight,) * 3, xs, np.empty((1, 3), np.float32), 1)  # q, k and v of a checkpoint in its own layout


def _read_only(array: np.ndarray) -> np.ndarray:
    """Checkpoint weights are read-only maps, a distinct array type to numba."""
    array.flags.writeable = False
    return array


@numba.njit(cache=CACHE)
def _task_heads(task, kv_heads, group):
    """A decoding-attention task's query and kv head, and the query heads it covers: those from `kv * group` to
    `tiles_end` go `HEAD_TILE` at a time, the rest up to `heads_end` one by one."""
    t = task // kv_heads
    kv = task - t * kv_heads
    return t, kv, kv * group + group - group % HEAD_TILE, (kv + 1) * group


@numba.njit(parallel=True, cache=CACHE)
def attention(q, k, v, sinks, base, first, last, scale, out):
    """`out[t, h] = softmax(scale * q[t, h] . keys, sink) . values` for a few queries (decoding), over keys
    `k [KV, D, capacity]` and values `v` alike, query t seeing the positions `base + first[t] .. base + last[t] - 1`
    of the buffers. Keys and values are float32, or float16 as their bits (uint16), widened as they are read.

    One (query, kv head) a task, its query heads together. It walks the positions `POSITION_CHUNK` at a time: the
    chunk's scores (`_scores_tile`, each key read once for `HEAD_TILE` heads) stay in a scratch row per head, in
    L1, where they become weights (an online softmax: the running largest score starts at the sink, and the sums
    so far are rescaled when it grows) and are multiplied into the values (`_mix_tile`). Keys and values are read
    once, the scores never leave the cache, and it is one parallel loop, not three.
    """
    tokens, heads, dim = q.shape
    kv_heads, _, capacity = k.shape
    group = heads // kv_heads
    rows_end = dim - dim % MIX_ROWS
    flat_q = q.reshape(-1)
    flat_k = k.reshape(-1)
    flat_v = v.reshape(-1)
    for task in prange(tokens * kv_heads):
        t, kv, tiles_end, heads_end = _task_heads(task, kv_heads, group)
        h0 = kv * group
        weights = np.empty(group * POSITION_CHUNK, np.float32)
        sums = np.zeros(group * dim, np.float32)
        peaks = sinks[h0:heads_end].copy()
        totals = np.ones(group, np.float32)  # the sink's share, exp(sink - peak)
        for start in range(base + first[t], base + last[t], POSITION_CHUNK):
            count = min(POSITION_CHUNK, base + last[t] - start)
            body = count - count % 16
            for j in range(0, body, 16):
                keys = kv * dim * capacity + start + j
                for h in range(h0, tiles_end, HEAD_TILE):
                    row = (h - h0) * POSITION_CHUNK + j
                    _scores_tile(flat_k, keys, capacity, flat_q, (t * heads + h) * dim, dim, scale, weights, row,
                                 POSITION_CHUNK)  # fmt: skip
                for h in range(tiles_end, heads_end):
                    row = (h - h0) * POSITION_CHUNK + j
                    _scores_head(flat_k, keys, capacity, flat_q, (t * heads + h) * dim, dim, scale, weights, row,
                                 POSITION_CHUNK)  # fmt: skip
            for h in range(h0, heads_end):
                for j in range(body, count):
                    total = np.float32(0)
                    for d in range(dim):
                        total += q[t, h, d] * _widened(k[kv, d, start + j])
                    weights[(h - h0) * POSITION_CHUNK + j] = total * scale
            for i in range(heads_end - h0):
                peak, total = _exps(weights, i * POSITION_CHUNK, count, peaks[i])
                factor = np.exp(peaks[i] - peak)
                totals[i] = totals[i] * factor + total
                sums[i * dim : (i + 1) * dim] *= factor
                peaks[i] = peak
            blocks = body // 16
            for d in range(0, rows_end, MIX_ROWS):
                values = (kv * dim + d) * capacity + start
                for h in range(h0, tiles_end, HEAD_TILE):
                    i = h - h0
                    _mix_tile(flat_v, values, capacity, weights, i * POSITION_CHUNK, POSITION_CHUNK, sums, i * dim + d,
                              dim, blocks)  # fmt: skip
                for h in range(tiles_end, heads_end):
                    i = h - h0
                    _mix_head(flat_v, values, capacity, weights, i * POSITION_CHUNK, POSITION_CHUNK, sums, i * dim + d,
                              dim, blocks)  # fmt: skip
            for d in range(rows_end, dim):
                values = (kv * dim + d) * capacity + start
                for h in range(h0, tiles_end, HEAD_TILE):
                    i = h - h0
                    _mix_tile_row(flat_v, values, capacity, weights, i * POSITION_CHUNK, POSITION_CHUNK, sums,
                                  i * dim + d, dim, blocks)  # fmt: skip
                for h in range(tiles_end, heads_end):
                    i = h - h0
                    _mix_head_row(flat_v, values, capacity, weights, i * POSITION_CHUNK, POSITION_CHUNK, sums,
                                  i * dim + d, dim, blocks)  # fmt: skip
            for i in range(heads_end - h0):
                for d in range(dim):
                    for j in range(body, count):
                        sums[i * dim + d] += weights[i * POSITION_CHUNK + j] * _widened(v[kv, d, start + j])
        for i in range(heads_end - h0):
            for d in range(dim):
                out[t, h0 + i, d] = sums[i * dim + d] / totals[i]

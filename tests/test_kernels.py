"""The compiled kernels (`cpu/kernels.py`) against the plain NumPy functions they replace, which the reference
tests check against transformers; and the whole model on the AVX2 kernels against transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_variant

import mlx_oss
from mlx_oss.cpu import kernels
from mlx_oss.cpu.layers import attention, clamped_swiglu, softmax_in_spans, softmax_with_sink, visible_spans
from mlx_oss.mxfp4 import dequantize
from mlx_oss.packed_bf16 import PackedMatrix, pack_rows
from mlx_oss.safetensors_io import bf16_to_f32

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no compiled kernels: {kernels.DESCRIPTION}")
TESTS = Path(__file__).parent


def read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # as the checkpoint's maps are
    return array


def mxfp4_weights(rng, experts: int, rows: int, groups: int):
    blocks = rng.integers(0, 256, (experts, rows, groups, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (experts, rows, groups), dtype=np.uint8)
    scales[0, 0, 0] = 0  # the smallest E8M0 scale, 2**-127: a subnormal float32
    scales[-1, -1, -1] = 160
    blocks[0, 0, 0] = np.arange(16) * 17  # every nibble, low and high
    return read_only(blocks), read_only(scales)


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_the_instruction_set_can_be_forced_for_tests():
    forced = os.environ.get("MLX_OSS_KERNELS")
    assert ("avx2" if forced == "avx2" else kernels.ISA) == kernels.ISA
    assert kernels.ISA in ("avx2", "avx512")
    if forced in ("avx2", "avx512"):
        assert not kernels.AMX


# Decoding's MXFP4 products on VNNI's integer dot products where the CPU has them, and on float32's FMAs.
MATVEC_PATHS = [True, False] if kernels.VNNI else [False]


@pytest.mark.parametrize("vnni", MATVEC_PATHS)
@pytest.mark.parametrize("groups", [1, 3, 4, 90])  # all in float32, one round of VNNI's four blocks, rounds and two
def test_matvec_equals_decoding_then_multiplying(groups, vnni, monkeypatch):
    monkeypatch.setattr(kernels, "VNNI", vnni)
    rng = np.random.default_rng(groups)
    blocks, scales = mxfp4_weights(rng, 5, 24, groups)
    experts = np.array([4, 0, 4, 2])
    x = rng.standard_normal((4, groups * 32)).astype(np.float32)
    x[1, :32] *= 1e4  # blocks of inputs far apart in size
    x[2, -32:] = 0
    expected = np.stack([dequantize(blocks[e], scales[e]) @ x[p] for p, e in enumerate(experts)])
    assert_close(kernels.mxfp4_matvec(blocks, scales, experts, x), expected)


@pytest.mark.skipif(not kernels.VNNI, reason="no AVX512-VNNI on this CPU")
def test_vnni_inputs_are_three_bytes_within_half_a_unit_of_2_to_the_minus_22_of_their_blocks_largest():
    """`quantize_rounds` against its contract, recomputed here: X = round(x * 2**(22 - e)) per block of 32 (e the
    exponent of the largest magnitude), split into three signed bytes; minus the weights' offset (12) times each
    lane's 8 inputs; the blocks' scales 2**(e - 23). Blocks of sizes from about 2**-100 to 2**100, and of zeros."""
    rng = np.random.default_rng(7)
    blocks = 4 * 3
    x = rng.standard_normal((blocks, 32)) * np.ldexp(1.0, rng.integers(-100, 100, (blocks, 1)))
    x[3] = 0
    x[5] = rng.standard_normal(32) * 1e-30  # the smallest a block's scale holds: 2**-103 and up
    x = kernels.block_ordered(x.astype(np.float32).reshape(-1))
    parts, corrections, scales = (a[0] for a in kernels._quantized_buffers((1, x.size)))
    assert kernels._compiled.quantize_rounds(x, parts, corrections, scales)
    by_block = parts.astype(np.int64).reshape(blocks // 4, 3, 2, 4, 16)  # round, byte, nibble half, block, element
    integers = (by_block[:, 0] << 16) + (by_block[:, 1] << 8) + by_block[:, 2]
    integers = integers.transpose(0, 2, 1, 3).reshape(blocks, 32)  # as x: each block's low then high nibbles'
    exponents = np.frexp(np.abs(x.reshape(blocks, 32)).max(axis=1))[1]
    exponents[3] = 0
    unit = np.ldexp(1.0, exponents - 22)[:, None]
    assert np.all(np.abs(integers * unit - x.reshape(blocks, 32)) <= unit / 2)
    assert np.abs(integers).max() <= 1 << 22 and np.abs(by_block[:, 0]).max() <= 64  # no int32 sum overflows
    assert np.abs(integers[1]).max() > 1 << 21  # the largest input uses the bits
    lanes = integers.reshape(blocks, 2, 4, 4).sum(axis=(1, 3))  # each lane: 4 low-nibble and 4 high-nibble inputs
    np.testing.assert_array_equal(corrections, -12 * lanes.reshape(-1))
    np.testing.assert_array_equal(scales, np.repeat(np.ldexp(1.0, exponents - 23), 4).astype(np.float32))


@pytest.mark.skipif(not kernels.VNNI, reason="no AVX512-VNNI on this CPU")
def test_vnni_matvec_leaves_rows_of_x_it_cannot_scale_to_float32(monkeypatch):
    """A row of x with an infinity or NaN, or with a block too small for a float32 scale, goes through float32's
    kernel: its outputs as float32 gives them (infinities, NaN, tiny values); the other rows by VNNI."""
    rng = np.random.default_rng(5)
    blocks, scales = mxfp4_weights(rng, 2, 24, 8)
    experts = np.array([1, 0, 1, 1])
    x = rng.standard_normal((4, 8 * 32)).astype(np.float32)
    x[0, 40] = np.inf
    x[1, 7] = np.nan
    x[2, 64:96] = np.float32(1e-35)
    ours = kernels.mxfp4_matvec(blocks, scales, experts, x)
    monkeypatch.setattr(kernels, "VNNI", False)
    float32 = kernels.mxfp4_matvec(blocks, scales, experts, x)
    np.testing.assert_array_equal(ours[:3], float32[:3])
    assert np.isnan(ours[1]).all() and not np.isfinite(ours[0]).all()
    assert not np.array_equal(ours[3], float32[3])  # by the integer products: rounded otherwise
    assert_close(ours[3], dequantize(blocks[1], scales[1]) @ x[3])


@pytest.mark.skipif(not kernels.VNNI, reason="no AVX512-VNNI on this CPU")
def test_vnni_matvec_takes_rows_with_a_scale_of_0_in_float32():
    """A scale of 0 is the subnormal 2**-127, which VNNI's scale vectors (built from exponent bits) would make 0: a
    row with one, inside the rounds of four blocks, is summed again in float32. Each row against float64, relative
    to its own size: one whose every scale is 0, one with a single 0 among large scales, one without."""
    rng = np.random.default_rng(9)
    blocks = read_only(rng.integers(0, 256, (1, 3, 8, 16), dtype=np.uint8))
    scales = np.full((1, 3, 8), 130, np.uint8)
    scales[0, 0] = 0
    scales[0, 1, 5] = 0
    scales = read_only(scales)
    x = rng.standard_normal((3, 8 * 32)).astype(np.float32)
    expected = np.stack([x[r].astype(np.float64) @ dequantize(blocks[0], scales[0]).astype(np.float64)[r]
                         for r in range(3)])  # fmt: skip
    ours = kernels.mxfp4_matvec(blocks, scales, np.zeros(3, np.int64), x)
    rows = np.arange(3)
    np.testing.assert_allclose(ours[rows, rows] / np.abs(expected), expected / np.abs(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("lowest", "inputs"), [(0, 1.0), (127, 2.0**-14)])  # small inputs for large scales
def test_every_scale_decodes_through_its_own_table(lowest, inputs):
    """The kernels decode a block by a table of the E2M1 values times its scale: a row for each scale, against
    float64, up to 252 (above it 6 * 2**(e - 127) overflows float32, as in `mxfp4.dequantize` and transformers'
    BF16), the smallest ones subnormal."""
    rng = np.random.default_rng(lowest)
    exponents = np.arange(lowest, min(lowest + 127, 253))
    scales = read_only(exponents.astype(np.uint8).reshape(1, -1, 1))
    blocks = rng.integers(0, 256, (1, exponents.size, 1, 16), dtype=np.uint8)
    blocks[0, :, 0, 0] = 0x71  # a 6 and a 0.5 in every row: the largest and smallest magnitudes
    blocks = read_only(blocks)
    x = (rng.standard_normal((3, 32)) * inputs).astype(np.float32)
    weights = dequantize(blocks[0], np.full(scales[0].shape, 127, np.uint8)).astype(np.float64)
    expected = x.astype(np.float64) @ (weights * np.ldexp(1.0, exponents - 127)[:, None]).T
    row_size = np.abs(expected).max(axis=0)
    for ours in (
        kernels.mxfp4_matvec(blocks, scales, np.zeros(3, np.int64), x),
        kernels.mxfp4_matmul(blocks[0], scales[0], x),
    ):
        np.testing.assert_allclose(ours / row_size, expected / row_size, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tokens", [*range(1, 17), 17, 23, 40])  # every width of a pass, on AVX2 and AVX-512
def test_matmul_equals_decoding_then_multiplying(tokens):
    rng = np.random.default_rng(tokens)
    blocks, scales = mxfp4_weights(rng, 1, 37, 20)  # rows and groups that are not multiples of the tiles
    x = rng.standard_normal((tokens, 20 * 32)).astype(np.float32)
    assert_close(kernels.mxfp4_matmul(blocks[0], scales[0], x), x @ dequantize(blocks[0], scales[0]).T)


def test_a_prompts_inputs_go_through_in_the_fewest_passes_of_near_equal_widths():
    """Padding an expert's inputs to fixed pass widths wasted up to a third of its products."""
    widest = kernels._compiled.PASS_TOKENS
    for tokens in range(1, 5 * widest):
        widths, left = [], tokens
        while left:
            widths.append(int(kernels._compiled.pass_tokens(left)))
            left -= widths[-1]
        assert len(widths) == -(-tokens // widest), (tokens, widths)
        assert max(widths) <= widest and max(widths) - min(widths) <= 1, (tokens, widths)


def test_a_prompts_tile_of_inputs_leaves_a_quarter_of_l1():
    tile_blocks = kernels._compiled.tile_blocks
    assert tile_blocks(32 << 10, 16) == 12  # Zen 4 (and Skylake-X) with AVX-512: 24 KB of a 32 KB L1
    assert tile_blocks(48 << 10, 16) == 16  # a 48 KB L1: at most 16 blocks
    assert tile_blocks(32 << 10, 8) == 16  # AVX2's passes of 8
    assert tile_blocks(4 << 10, 16) == 4
    here = tile_blocks(kernels._target.l1_data_bytes(), kernels._compiled.PASS_TOKENS)
    assert here == kernels._compiled.GROUP_CHUNK


def test_the_l1_data_cache_is_read_from_linux_s_description(tmp_path):
    l1_data_bytes = kernels._target.l1_data_bytes
    caches = [("1", "Instruction", "64K"), ("1", "Data", "32K"), ("2", "Unified", "1M")]
    for index, (level, kind, size) in enumerate(caches):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (entry / name).write_text(text + "\n")
    assert l1_data_bytes(tmp_path) == 32 << 10
    (tmp_path / "index1" / "size").write_text("lots\n")
    assert l1_data_bytes(tmp_path, default=1234) == 1234
    assert l1_data_bytes(tmp_path / "missing", default=1234) == 1234


@pytest.mark.parametrize("passes", [True, False])
@pytest.mark.parametrize("tokens", [1, 4, 17, 40])  # one pass, a partial one, several of unequal widths
def test_swiglu_laid_out_is_the_clamped_swiglu_where_the_down_projection_reads_it(tokens, passes):
    """The experts' SwiGLU, fused with the gate/up bias and the down projection's input layout, against NumPy's
    `clamped_swiglu` laid out by `passes_by_block` or `block_ordered`, and through the kernel that reads it."""
    rng = np.random.default_rng(tokens)
    groups = 3
    gate_up = (rng.standard_normal((tokens, 64 * groups)) * 6).astype(np.float32)  # past the clamp of 7 at times
    bias = rng.standard_normal((5, 64 * groups)).astype(np.float32)
    rows = rng.integers(0, 5, tokens)
    with_bias = gate_up + bias[rows]
    act = clamped_swiglu(with_bias[:, 0::2], with_bias[:, 1::2], 1.702, 7.0)
    laid_out = kernels.swiglu_laid_out(gate_up, bias, rows, 1.702, 7.0, passes=passes)
    expected = kernels.passes_by_block(act) if passes else kernels.block_ordered(act).reshape(-1)
    np.testing.assert_allclose(laid_out.ordered, expected, rtol=1e-6, atol=1e-7)  # exp may differ by an ulp
    blocks, scales = mxfp4_weights(rng, 1, 9, groups)
    if passes:
        assert_close(kernels.mxfp4_matmul(blocks[0], scales[0], laid_out), act @ dequantize(blocks[0], scales[0]).T)
    else:
        experts = np.zeros(tokens, dtype=np.int64)
        assert_close(kernels.mxfp4_matvec(blocks, scales, experts, laid_out), act @ dequantize(blocks[0], scales[0]).T)
    with pytest.raises(ValueError, match="for the other kernel"):  # a layout read by the wrong kernel is refused
        if passes:
            kernels.mxfp4_matvec(blocks, scales, np.zeros(tokens, dtype=np.int64), laid_out)
        else:
            kernels.mxfp4_matmul(blocks[0], scales[0], laid_out)
    if not passes:  # the rows back in their own order, as the AMX tiles read the down projection's input
        np.testing.assert_allclose(kernels._plain(laid_out), act, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("columns", [160, 176])  # BF16 rows go 32 at a time, with a last 16 where they do not divide
@pytest.mark.parametrize("tokens", [1, 3])
def test_matvec_equals_widening_then_multiplying(columns, tokens):
    rng = np.random.default_rng(3)
    weights = read_only(rng.integers(0, 1 << 16, (50, columns), dtype=np.uint16) & 0xBFFF)  # no NaN or inf bits
    x = rng.standard_normal((tokens, columns)).astype(np.float32)
    assert_close(kernels.matvec(weights, x), x @ bf16_to_f32(weights).T)
    wide = read_only(bf16_to_f32(weights) * np.float32(1.001))
    assert_close(kernels.matvec(wide, x), x @ wide.T)


@pytest.mark.parametrize("tokens", [2, 3, 4, 5, 8])
def test_matvec_gives_each_row_the_bits_of_a_one_row_call(tokens):
    """Verifying drafted tokens multiplies a few rows at once; each must come out as the one-token step would give
    it, to the bit, so that speculative greedy decoding picks what plain decoding picks."""
    rng = np.random.default_rng(tokens)
    weights = read_only(rng.integers(0, 1 << 16, (70, 2896), dtype=np.uint16) & 0xBFFF)  # 16 past a multiple of 32
    x = rng.standard_normal((tokens, 2896)).astype(np.float32)
    for w in (weights, read_only(bf16_to_f32(weights))):
        together = kernels.matvec(w, x)
        alone = np.concatenate([kernels.matvec(w, x[t : t + 1]) for t in range(tokens)])
        np.testing.assert_array_equal(together, alone)
        assert_close(together, x @ bf16_to_f32(weights).T)


@pytest.mark.parametrize("tokens", [1, 3])
def test_matrices_side_by_side_give_each_matrix_s_own_product(tokens):
    """A step's q, k and v projections in one call: each matrix's columns of the output, to the bit, as its own call
    gives them (row counts that are not multiples of a task's 64 rows), and a Dense's bias added to its own."""
    from mlx_oss.cpu.dense import Dense, side_by_side

    rng = np.random.default_rng(tokens)
    weights = [read_only(rng.integers(0, 1 << 16, (rows, 96), dtype=np.uint16) & 0xBFFF) for rows in (130, 16, 65)]
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    together = kernels.matvec(weights, x)
    np.testing.assert_array_equal(together, np.concatenate([kernels.matvec(w, x) for w in weights], axis=1))
    assert_close(together, x @ bf16_to_f32(np.concatenate(weights)).T)
    layers = [Dense(w, rng.standard_normal(w.shape[0]).astype(np.float32), uses_kernels=True) for w in weights]
    layers[1].bias = None
    np.testing.assert_array_equal(side_by_side(layers, x), np.concatenate([layer(x) for layer in layers], axis=1))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.matvec([weights[0], read_only(bf16_to_f32(weights[1]))], x)
    with pytest.raises(ValueError, match="does not match"):  # it would read past each weight row
        kernels.matvec(weights, np.zeros((1, 112), np.float32))


def packed_matrix(rng, rows: int, columns: int) -> tuple[np.ndarray, PackedMatrix]:
    """BF16 weights (a few outliers among them, which pack as exceptions) and their packed, read-only form."""
    bits = (rng.standard_normal((rows, columns)).astype(np.float32) * 0.02).view(np.uint32) >> 16
    bits = bits.astype(np.uint16)
    bits[rows // 2, :20] = np.ldexp(np.ones(20, np.float32), np.arange(20) * 4 - 40).view(np.uint32) >> 16
    packed, tables, exceptions = pack_rows(bits)
    assert len(exceptions) > 0
    return bits, PackedMatrix(read_only(packed), read_only(tables), read_only(exceptions))


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_packed_matvec_equals_unpacking_then_multiplying(tokens):
    """Packed BF16 matrices side by side (q, k and v), exceptions included: each row as the BF16 kernel's to
    rounding, and to the bit as a one-row call gives it (drafted tokens are verified several rows at once)."""
    rng = np.random.default_rng(tokens)
    weights = [packed_matrix(rng, rows, 192) for rows in (130, 16, 65)]
    x = rng.standard_normal((tokens, 192)).astype(np.float32)
    together = kernels.packed_matvec([m for _, m in weights], x)
    bits = np.concatenate([b for b, _ in weights])
    assert_close(together, (x.astype(np.float64) @ bf16_to_f32(bits).T.astype(np.float64)).astype(np.float32))
    alone = np.concatenate([kernels.packed_matvec([m for _, m in weights], x[t : t + 1]) for t in range(tokens)])
    np.testing.assert_array_equal(together, alone)
    for b, m in weights:
        np.testing.assert_array_equal(kernels.unpacked(m, 0, b.shape[0]), b)
        np.testing.assert_array_equal(kernels.unpacked(m, 3, 9), b[3:9])
    with pytest.raises(ValueError, match="does not match"):
        kernels.packed_matvec([m for _, m in weights], np.zeros((1, 128), np.float32))


def test_a_dense_layer_of_packed_weights_gives_the_bf16_layers_products():
    """Decoding reads the packed rows (`packed_matvec`); a prompt's rows go through the BF16 paths on blocks
    unpacked as it goes (`UNPACK_ROWS` at a time)."""
    from mlx_oss.cpu import dense
    from mlx_oss.cpu.dense import Dense, side_by_side

    rng = np.random.default_rng(9)
    weights = [packed_matrix(rng, rows, 128) for rows in (70, 20)]
    bias = rng.standard_normal(70).astype(np.float32)
    for tokens in (1, 40):
        x = rng.standard_normal((tokens, 128)).astype(np.float32)
        for uses_kernels in (True, False):
            packed = [Dense(m, bias if i == 0 else None, uses_kernels) for i, (_, m) in enumerate(weights)]
            plain = [Dense(read_only(b), bias if i == 0 else None, uses_kernels) for i, (b, _) in enumerate(weights)]
            assert_close(side_by_side(packed, x), side_by_side(plain, x))
            assert_close(packed[0](x), plain[0](x))
    old = dense.UNPACK_ROWS
    try:
        dense.UNPACK_ROWS = 16  # several blocks, a last one short
        assert_close(Dense(weights[0][1], None, True)(x), x @ bf16_to_f32(weights[0][0]).T)
    finally:
        dense.UNPACK_ROWS = old


def test_warm_up_compiles_what_a_decoding_step_calls():
    """A kernel compiled at the first token would hold the GIL in the serving process (`warm_up` runs in a child):
    one matrix, and q, k and v side by side, for BF16 and float32 maps."""
    kernels.warm_up()
    compiled = {str(signature[0]) for signature in kernels._compiled.matvec.signatures}
    for dtype in ("uint16", "float32"):
        for count in (1, 3):
            assert f"UniTuple(readonly array({dtype}, 2d, C) x {count})" in compiled
    packed = {str(signature[0]) for signature in kernels._compiled.packed_matvec.signatures}
    assert {f"UniTuple(readonly array(uint8, 2d, C) x {count})" for count in (1, 3)} <= packed


@pytest.mark.parametrize("window", [None, 4, 64])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("long", [False, True])
@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_attention_equals_the_numpy_attention(window, queries, long, half):
    """Short: fewer heads than a tile, one at a time. Long: a tile of heads plus one, over several chunks of
    positions and a tail shorter than a 16-position block, and a head size that leaves value rows out of the
    weighted sum's groups of `MIX_ROWS` rows. Float16 buffers (as their uint16 bits, as the KV cache hands them
    over) give the attention over their values widened to float32."""
    from mlx_oss.cpu import _numba_kernels as compiled

    group, length, dim = (compiled.HEAD_TILE + 1, 2 * compiled.POSITION_CHUNK + 7, 17) if long else (4, 37, 16)
    rng = np.random.default_rng(queries)
    kv_heads, capacity = 2, length + 13
    q = rng.standard_normal((queries, kv_heads * group, dim)).astype(np.float32)
    keys = rng.standard_normal((kv_heads, dim, capacity)).astype(np.float16 if half else np.float32)
    values = rng.standard_normal((kv_heads, dim, capacity)).astype(keys.dtype)
    sinks = rng.standard_normal(kv_heads * group).astype(np.float32)
    start = length - queries
    wide_keys, wide_values = (x[..., :length].astype(np.float32) for x in (keys, values))
    expected = attention(q, wide_keys, wide_values, sinks, start, window)
    if half:
        keys, values = keys.view(np.uint16), values.view(np.uint16)
    assert_close(kernels.attention(q, keys, values, sinks, start, window), expected)


def test_widening_a_float16_cache_buffer_equals_numpys_cast():
    """Every float16 bit pattern (subnormals, zeros of both signs, infinities, NaNs) at an offset into a buffer
    whose rows are longer than the positions asked for."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    buffer = np.zeros((2, 4, (1 << 14) + 37), np.float16)
    buffer[..., 5 : 5 + (1 << 13)] = every.reshape(2, 4, 1 << 13)
    wide = kernels.widened(buffer, 5, 5 + (1 << 13) + 3)
    expected = buffer[..., 5 : 5 + (1 << 13) + 3].astype(np.float32)
    assert wide.dtype == np.float32 and wide.shape == expected.shape
    nan = np.isnan(expected)
    assert nan.sum() == 2 * 1023 and np.isnan(wide[nan]).all()  # a signalling NaN widens quiet: payloads may differ
    np.testing.assert_array_equal(wide[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # the rest bit for bit


@pytest.mark.parametrize("length", [5, 16, 37, 1029])
def test_compiled_softmax_matches_numpy_to_an_ulp_over_exps_whole_range(length):
    """Log-weights from 0 down past float32's underflow (below its smallest normal, weights flush to 0), masked
    (-inf) ones and a row masked whole, whose weight all goes to the sink; a tail shorter than a vector takes the C
    library's exp."""
    rng = np.random.default_rng(length)
    scores = (rng.standard_normal((3, 2, length)) * 40).astype(np.float32)
    scores[1, 0, ::3] = -np.inf
    scores[2, 1] = -np.inf
    sinks = rng.standard_normal(3).astype(np.float32)
    expected, expected_denominator = softmax_with_sink(scores.copy(), sinks[:, None])
    whole_rows = np.zeros(2, np.int64), np.full(2, length)
    denominator = kernels.softmax_in_spans(scores, sinks, *whole_rows)
    assert (scores[expected == 0] == 0).all()
    np.testing.assert_allclose(scores, expected, rtol=3e-7, atol=np.finfo(np.float32).tiny)
    np.testing.assert_allclose(denominator, expected_denominator, rtol=1e-6)


@pytest.mark.parametrize("count", [5, 16, 37, 300])
@pytest.mark.parametrize("window", [None, 3, 20])
def test_softmax_in_spans_matches_numpy(count, window):
    """A prompt chunk's rows, each over the keys its query sees: spans from one key to the whole row, shorter than a
    vector, widened past the row's end (moved left), and in rows shorter than a vector (a scalar tail)."""
    rng = np.random.default_rng(count)
    queries, groups = min(count, 7), 3
    first, last = visible_spans(count - queries, queries, 0, window)
    scores = (rng.standard_normal((groups, queries, count)) * 30).astype(np.float32)
    sink = rng.standard_normal(groups).astype(np.float32)
    expected = scores.copy()
    expected_denominators = softmax_in_spans(expected, sink, first, last)
    denominators = kernels.softmax_in_spans(scores, sink, first, last)
    visible = (np.arange(count) >= first[:, None]) & (np.arange(count) < last[:, None])
    assert (scores[:, ~visible] == 0).all() and (scores[:, visible] > 0).any()
    np.testing.assert_allclose(scores, expected, rtol=3e-7, atol=np.finfo(np.float32).tiny)
    np.testing.assert_allclose(denominators, expected_denominators, rtol=1e-6)


needs_amx = pytest.mark.skipif(
    not kernels.AMX, reason="no AMX on this CPU (or switched off): the tile kernels are not built"
)


@needs_amx
@pytest.mark.parametrize("sizes", [[1], [16], [17, 2, 33], [64, 65, 5], [130]])
def test_tile_matmul_of_groups_equals_decoding_then_multiplying(sizes):
    """Prompts' expert products on AMX: groups of rows, each through its expert; sizes across tiles (16), passes
    (64) and a partly filled last tile."""
    rng = np.random.default_rng(len(sizes))
    blocks, scales = mxfp4_weights(rng, 4, 48, 5)
    experts = rng.integers(0, 4, len(sizes))
    x = rng.standard_normal((sum(sizes), 5 * 32)).astype(np.float32)
    expected, start = [], 0
    for e, size in zip(experts, sizes, strict=True):
        expected.append(x[start : start + size] @ dequantize(blocks[e], scales[e]).T)
        start += size
    assert_close(kernels.mxfp4_matmul_groups(blocks, scales, experts, sizes, x), np.concatenate(expected))


@needs_amx
@pytest.mark.parametrize("tokens", [9, 16, 70])
def test_bf16_tile_matmul_equals_widening_then_multiplying(tokens):
    rng = np.random.default_rng(tokens)
    weights = read_only(rng.integers(0, 1 << 16, (48, 96), dtype=np.uint16) & 0xBFFF)  # no NaN or inf bits
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    assert kernels.bf16_tiles_fit(weights)
    assert_close(kernels.bf16_matmul(weights, x), x @ bf16_to_f32(weights).T)


@pytest.mark.parametrize(
    ("rows", "columns", "tokens"),
    [(35, 544, t) for t in [1, 12, 13, 70]]  # a chunk's odd last row, 17 blocks; two unequal passes, two pieces
    + [(48, 32, t) for t in range(1, 13)],  # every width of a pass
)
def test_bf16_pass_matmul_equals_widening_then_multiplying(rows, columns, tokens):
    rng = np.random.default_rng(rows + tokens)
    weights = read_only(rng.integers(0, 1 << 16, (rows, columns), dtype=np.uint16) & 0xBFFF)  # no NaN or inf bits
    x = rng.standard_normal((tokens, columns)).astype(np.float32)
    if kernels.ISA != "avx512":  # built for AVX-512's 32 registers only: AVX2 keeps BLAS
        assert not kernels.bf16_passes_fit(weights, tokens)
        return
    assert kernels.bf16_passes_fit(weights, tokens)
    assert_close(kernels.bf16_matmul_passes(weights, x), x @ bf16_to_f32(weights).T)


def test_bf16_pass_matmul_takes_only_what_it_can():
    weights = np.zeros((16, 64), np.uint16)
    assert kernels.bf16_passes_fit(weights, 1) == (kernels.ISA == "avx512")
    assert not kernels.bf16_passes_fit(weights, kernels.DENSE_PROMPT_ROWS + 1)  # BLAS's widening pays off there
    assert not kernels.bf16_passes_fit(np.zeros((16, 48), np.uint16), 1)  # 32 weights a block
    assert not kernels.bf16_passes_fit(np.zeros((16, 128), np.uint16)[:, :64], 1)  # rows apart in memory
    assert not kernels.bf16_passes_fit(weights.astype(np.float32), 1)
    with pytest.raises(ValueError, match="bf16_matmul_passes"):
        kernels.bf16_matmul_passes(weights, np.zeros((2, 32), np.float32))


@needs_amx
def test_tile_inputs_are_split_exactly_into_three_bf16_parts():
    """The tiles multiply BF16 numbers; a float32 input must be the exact sum of its three parts, so that AMX sums
    float32's products (not rounded inputs'), whatever the input's exponent."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20, 64)) * np.exp2(rng.integers(-60, 60, (20, 64)))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-30, np.float32(np.nextafter(np.float32(1), np.float32(2)))]
    layout = kernels.tiles_by_block(x, [20]).view(np.uint32).reshape(2, 2, 3, 16, 16)  # [block, tile, part, k, n]
    halves = np.stack([layout & 0xFFFF, layout >> 16], axis=-1).astype(np.uint32) << 16  # [..., k, n, 2]
    parts = halves.view(np.float32).astype(np.float64)  # [block, tile, part, k, n, 2]
    summed = parts.sum(axis=2).transpose(1, 3, 0, 2, 4).reshape(32, 64)  # [tile, n, block, k, 2] -> [input, element]
    np.testing.assert_array_equal(summed[:20], x.astype(np.float64))
    assert not summed[20:].any()  # the partly filled tile is padded with zeros


needs_vnni_prompts = pytest.mark.skipif(
    not kernels.VNNI_PROMPTS, reason="no AVX512-VNNI on this CPU, or AMX takes prompts: the VNNI tiles are not built"
)


def vnni_rounding_bound(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What rounding x to 16 bits per block of 32 (`_vnni_tiles.quantized_tiles`) may move `x @ W.T` by, at most:
    half a unit, 2**(e - 16) for a block whose largest magnitude is in [2**(e-1), 2**e), times the block's weights'
    magnitudes; plus float32's own rounding of the sums (1e-6 of the products' magnitudes)."""
    peaks = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2).astype(np.float64)  # [T, G]
    half_units = np.ldexp(1.0, np.frexp(peaks)[1] - 16) * (peaks > 0)
    magnitudes = np.abs(weights.astype(np.float64)).reshape(weights.shape[0], -1, 32).sum(axis=2)  # [R, G]
    return half_units @ magnitudes.T + 1e-6 * (np.abs(x.astype(np.float64)) @ np.abs(weights.T.astype(np.float64)))


@needs_vnni_prompts
@pytest.mark.parametrize("sizes", [[1], [16], [17, 2, 33], [64, 65, 5], [130]])
def test_vnni_tile_matmul_of_groups_is_within_its_rounding_of_x(sizes):
    """Prompts' expert products on VNNI: groups of rows, each through its expert; sizes across tiles (16), passes
    (64) and a partly filled last tile, inputs of blocks far apart in size. The result is off float64's by no more
    than rounding x to 16 bits per block allows."""
    rng = np.random.default_rng(len(sizes))
    blocks, scales = mxfp4_weights(rng, 4, 48, 5)
    experts = rng.integers(0, 4, len(sizes))
    x = rng.standard_normal((sum(sizes), 5 * 32)).astype(np.float32)
    x[0, :32] *= 1e4
    x[-1, 32:64] = 0
    ours = kernels.mxfp4_matmul_groups(blocks, scales, experts, sizes, x)
    start = 0
    for e, size in zip(experts, sizes, strict=True):
        weights = dequantize(blocks[e], scales[e])
        rows = x[start : start + size]
        error = np.abs(ours[start : start + size] - rows.astype(np.float64) @ weights.T.astype(np.float64))
        bound = vnni_rounding_bound(rows, weights)
        assert (error <= bound).all(), np.max(error / bound)
        start += size


@needs_vnni_prompts
def test_vnni_tiles_take_the_swiglu_layout_as_its_rows():
    """The down projection's input comes from `swiglu_laid_out` (each block in the decoding kernels' order): the
    same product as from the plain rows."""
    rng = np.random.default_rng(3)
    blocks, scales = mxfp4_weights(rng, 2, 16, 3)
    gate_up = rng.standard_normal((20, 192)).astype(np.float32)
    bias = np.zeros((2, 192), np.float32)
    experts, sizes = np.array([1, 0]), [12, 8]
    bias_rows = np.repeat(experts, sizes)
    laid_out = kernels.swiglu_laid_out(gate_up, bias, bias_rows, 1.702, 7.0, passes=False)
    plain = clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], 1.702, 7.0)
    ours = kernels.mxfp4_matmul_groups(blocks, scales, experts, sizes, laid_out)
    np.testing.assert_array_equal(ours, kernels.mxfp4_matmul_groups(blocks, scales, experts, sizes, plain))


@needs_vnni_prompts
def test_vnni_tile_inputs_are_16_bit_within_half_a_unit_of_2_to_the_minus_15_of_their_blocks_largest():
    """`quantized_tiles` against its contract, recomputed here: for each block of 32 of a row, the scale 2**(e - 15)
    (e the exponent of its largest magnitude) and X = round(x / scale), |X| <= 32767, laid out [tile, block, pair j,
    lane]; a last tile of 8 rows or fewer holds each in two lanes; zeros for a block of zeros and for the padding
    rows, a NaN scale for a block holding a NaN or infinity."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((20, 96)) * np.ldexp(1.0, rng.integers(-60, 60, (20, 3)).repeat(32, axis=1))
    x[2, :32] = 0
    x[3, 40] = np.inf
    x[4, 70] = np.nan
    x[5, :32] = np.float32(1.0 - 2**-24)  # rounds up to 2**15: kept to 32767
    x = x.astype(np.float32)
    pairs, scales = kernels.quantized_tiles(x, [20])
    words = pairs.view(np.int16).reshape(2, 3, 16, 16, 2)  # [tile, block, j, lane, low/high]
    lanes = words.transpose(0, 3, 1, 2, 4).reshape(32, 96).astype(np.float64)  # [tile and lane, element]
    lane_scales = scales.reshape(2, 3, 16).transpose(0, 2, 1).reshape(32, 3)
    # Rows 0-15 fill the first tile; rows 16-19 the second, a half tile: row 16 + n in lanes 2n and 2n + 1.
    np.testing.assert_array_equal(lanes[16:24:2], lanes[17:24:2])
    np.testing.assert_array_equal(lane_scales[16:24:2], lane_scales[17:24:2])
    values, scales = (
        np.concatenate([lanes[:16], lanes[16:24:2]]),
        np.concatenate([lane_scales[:16], lane_scales[16:24:2]]),
    )
    assert not lanes[24:].any() and not lane_scales[24:].any()
    peaks = np.abs(x.astype(np.float64)).reshape(20, 3, 32).max(axis=2)
    finite = np.isfinite(peaks)
    expected = np.where(peaks > 0, np.ldexp(1.0, np.frexp(np.where(finite, peaks, 1))[1] - 15), 0)
    np.testing.assert_array_equal(scales[:20][finite], expected[finite])
    assert np.isnan(scales[3, 1]) and np.isnan(scales[4, 2]) and not values[3, 32:64].any()
    assert not values[2, :32].any() and scales[2, 0] == 0
    assert np.abs(values).max() <= 32767 and values[5, :32].max() == 32767
    rebuilt = values[:20] * np.repeat(np.where(finite, scales[:20], 0), 32, axis=1)
    half_unit = np.repeat(np.where(finite, scales[:20], 0), 32, axis=1) / 2
    close = np.repeat(finite, 32, axis=1)
    close[5, :32] = False  # the one clamped block: off by a unit
    assert (np.abs(rebuilt - x)[close] <= half_unit[close]).all()


@needs_vnni_prompts
def test_prompts_go_through_the_vnni_tiles_and_match_transformers(tiny_checkpoint, monkeypatch):
    """The tiny preset's 8 experts with a 64-token prompt: groups of about 32 tokens go through the VNNI tiles, the
    rounding of x within them keeps the logits within the reference tolerance."""
    from reference import assert_logits_match, reference_logits

    calls = []
    original = kernels.mxfp4_matmul_groups

    def counted(*args):
        calls.append(args[3])
        return original(*args)

    monkeypatch.setattr(kernels, "mxfp4_matmul_groups", counted)
    model = mlx_oss.load(tiny_checkpoint, backend="numpy")
    tokens = np.random.default_rng(5).integers(0, model.config.vocab_size, 64)
    assert_logits_match(model.logits(tokens), reference_logits(tiny_checkpoint, tokens))
    assert calls and sum(int(np.sum(sizes)) for sizes in calls) >= 64 * 4  # every layer's, both projections


@needs_amx
def test_avx512_kernels_without_amx_match_transformers():
    """Machines without AMX (AMD's, Intel's before Sapphire Rapids) run prompts on the AVX-512 kernels: check them
    here too, forced, in a fresh interpreter."""
    env = {**os.environ, "MLX_OSS_KERNELS": "avx512"}
    selection = [
        str(TESTS / "test_kernels.py"),
        str(TESTS / "test_reference.py") + "::test_tiny_preset_matches_transformers",
        str(TESTS / "test_reference.py") + "::test_logits_match_transformers",
    ]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
    out = subprocess.run(
        [*command, "-k", "not plain and not mlx and not avx2_kernels and not tile and not amx"],
        env=env,
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-500:]


@pytest.mark.skipif(os.environ.get("MLX_OSS_KERNELS") == "avx2", reason="already the AVX2 run")
def test_avx2_kernels_match_transformers():
    """This machine may have AVX-512; most laptops have only AVX2. Run the kernel tests and the reference test
    of the tiny preset with the AVX2 kernels forced, in a fresh interpreter (the width is chosen at import)."""
    env = {**os.environ, "MLX_OSS_KERNELS": "avx2"}
    selection = [
        str(TESTS / "test_kernels.py"),
        str(TESTS / "test_reference.py") + "::test_tiny_preset_matches_transformers",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *selection,
            "-k",
            "not plain and not mlx and not avx2_kernels and not tile and not amx and not vnni",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-500:]


def test_a_kernel_build_failure_falls_back_to_plain_numpy(synthetic_checkpoint, monkeypatch):
    path = synthetic_checkpoint(num_hidden_layers=2, vocab_size=300)

    def broken():
        raise RuntimeError("LLVM ERROR: cannot select")

    expected = load_variant(path, "numpy-plain").logits([1, 2, 3])
    monkeypatch.setattr(kernels, "warm_up", broken)
    model = mlx_oss.load(path, backend="numpy")
    assert not model.uses_kernels and "kernels failed to build: LLVM ERROR: cannot select" in model.backend_reason
    np.testing.assert_array_equal(model.logits([1, 2, 3]), expected)


def test_python_m_mlx_oss_cpu_compiles_the_kernels_into_numbas_cache(tmp_path):
    """What `kernels.warm_up` runs as a child process off the main thread (in a bundle through its launcher)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "mlx_oss.cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("compiled: numba kernels for AVX"), out.stdout + out.stderr
    assert "Warning" not in out.stderr, out.stderr
    assert list(tmp_path.rglob("_numba_kernels.mxfp4_matvec-*.nbi"))  # the index a later load reads

    env[kernels.DISABLE_VARIABLE] = "off"
    out = subprocess.run([sys.executable, "-m", "mlx_oss.cpu"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "switched off by MLX_OSS_KERNELS" in out.stdout


def test_without_a_writable_cache_folder_the_kernels_compile_in_each_process():
    """numba refuses `cache=True` where it finds no writable folder (a read-only install and home directory)."""
    code = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # as if no cache folder were writable\n"
        "from mlx_oss.cpu import kernels\n"
        "kernels.warm_up()\n"
        "print(kernels.CACHE, kernels.available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.split() == ["False", "True"], out.stdout + out.stderr[-2000:]


def test_the_benchmarks_memory_speed_is_read_through_the_kernels():
    """`--bandwidth` streams a buffer through `kernels.matvec` (a plain sum read a fifth slower: no prefetches)."""
    from mlx_oss.bench_machine import read_bandwidth_gb_s

    speed = read_bandwidth_gb_s(8 << 20, rounds=1)
    assert (speed is None) == (kernels.ISA is None)
    assert speed is None or 0.1 < speed < 10_000

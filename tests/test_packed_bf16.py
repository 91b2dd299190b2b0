"""BF16 matrices packed into 12 bits a weight (`mlx_oss.packed_bf16`): lossless for any bits, compact for weights."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_oss.packed_bf16 import (
    GROUP,
    PackedMatrix,
    check_packed,
    exception_count,
    pack_rows,
    packed_width,
    unpack_rows,
)


def bf16(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def hostile_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    special = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x807F, 0x7F7F], np.uint16)
    every_high_byte = (np.arange(256, dtype=np.uint16) << 8 | 0x5A).reshape(1, 256)
    return {
        "any bits": rng.integers(0, 1 << 16, (37, 192), dtype=np.uint16),
        "weights": bf16(rng.standard_normal((64, 2880)) * 0.02),
        "zeros": np.zeros((3, 64), np.uint16),
        "specials": np.tile(special, (4, 64))[:, :512],
        "every high byte": every_high_byte,
    }


@pytest.mark.parametrize("name", list(hostile_rows()))
def test_packing_is_lossless_for_any_bits(name):
    bits = hostile_rows()[name]
    packed, tables, exceptions = pack_rows(bits)
    rows, columns = bits.shape
    assert packed.shape == (rows, packed_width(columns)) == (rows, columns * 3 // 2)
    assert tables.shape == (rows, 16) and (tables[:, 0] == 0).all()
    assert exceptions.shape == (exception_count(bits), 2)
    np.testing.assert_array_equal(unpack_rows(packed, tables, exceptions), bits)
    matrix = PackedMatrix(packed, tables, exceptions)
    assert matrix.shape == bits.shape and check_packed(matrix) is None
    for start, stop in ((0, rows), (rows // 2, rows), (1, min(rows, 3))):
        np.testing.assert_array_equal(matrix.rows(start, stop), bits[start:stop])
    # the decoding kernel's view of the exceptions: per row, their columns and float32 values
    for r in range(rows):
        first, last = matrix.row_starts[r], matrix.row_starts[r + 1]
        values = matrix.exception_values[first:last].view(np.uint32) >> 16
        np.testing.assert_array_equal(values, bits[r, matrix.exception_columns[first:last]])


def test_weights_pack_into_three_quarters_with_few_exceptions():
    """Trained-like weights (a row spans a few octaves): a handful of exceptions per million weights."""
    bits = hostile_rows()["weights"]
    packed, tables, exceptions = pack_rows(bits)
    assert packed.nbytes == bits.nbytes * 3 // 4  # and 16 bytes of table a row
    assert len(exceptions) < 1e-3 * bits.size
    # a row of 16 far outliers: more high bytes than its table holds, so some become exceptions, and come back
    bits = bits.copy()
    bits[5, :16] = bf16(np.ldexp(1.0, np.arange(40, 120, 5)))
    packed, tables, exceptions = pack_rows(bits)
    assert np.isin(np.arange(16) + 5 * bits.shape[1], exceptions[:, 0]).sum() >= 2
    np.testing.assert_array_equal(unpack_rows(packed, tables, exceptions), bits)


def test_only_whole_groups_pack():
    with pytest.raises(ValueError, match=f"multiple of {GROUP} columns, not 96"):
        pack_rows(np.zeros((2, 96), np.uint16))


def test_a_stored_matrix_that_breaks_the_format_is_named():
    """What the decoding kernel relies on (an exception's place holds +0.0, which it adds the exception to) is
    checked, as are the list's order, range and values."""
    bits = hostile_rows()["any bits"][:, :128]
    packed, tables, exceptions = pack_rows(bits)
    assert len(exceptions) > 2

    def problem(packed=packed, tables=tables, exceptions=exceptions):
        return check_packed(PackedMatrix(packed, tables, exceptions))

    assert problem() is None
    assert "out of order" in problem(exceptions=exceptions[::-1].copy())
    assert "outside the matrix" in problem(exceptions=np.array([[bits.size, 1]], np.int64))
    assert "16-bit" in problem(exceptions=np.concatenate([exceptions[:1, :1], [[1 << 16]]], axis=1))
    wrong_table = tables.copy()
    wrong_table[3, 0] = 0x3F
    assert problem(tables=wrong_table).startswith("tables: ")
    r, c = divmod(int(exceptions[0, 0]), bits.shape[1])
    for byte in (c // 64 * 96 + c % 64 % 32, c // 64 * 96 + 32 + c % 64):  # its code's byte, then its low byte
        damaged = packed.copy()
        damaged[r, byte] = 0xFF
        assert "where a weight other than +0.0 is stored" in problem(packed=damaged)

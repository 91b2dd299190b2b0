"""BF16 matrices packed losslessly into 12 bits a weight, for the CPU's decoding steps, which read every attention
projection and the unembedding whole for each token and are bound by how fast memory delivers them.

A BF16 weight is a high byte (the sign and the exponent's upper seven bits) and a low byte (the exponent's last bit
and the seven mantissa bits). Trained weights in a row span a few octaves, so their high bytes take few values: each
row keeps a table of 16, and each weight a 4-bit code into it beside its low byte. A weight whose high byte is not
in its row's table (a value far smaller or larger than the rest) is stored as code 0, low byte 0, which decodes to
+0.0, and listed with its bits as an exception: the matrix decodes exactly, whatever it holds (NaN, infinities,
subnormals included). Table entry 0 is the high byte 0x00, so zeros and +0.0's neighbours need no exception.

Layout of a matrix `[R, C]` (C a multiple of `GROUP`), in three tensors named after its weight's base name:

- `{base}.packed` uint8 `[R, C // 64 * 96]`: each row in groups of 64 weights, each group 32 bytes of codes (byte j
  holds weight j's code in its low nibble, weight j + 32's in its high one), then the 64 low bytes in order.
- `{base}.tables` uint8 `[R, 16]`: the high byte each code stands for, row by row.
- `{base}.exceptions` int64 `[n, 2]`: each exception's flat index `r * C + c` (in increasing order) and its BF16 bits.

The compiled kernels decode a group with one byte shuffle (the row's table, indexed by the codes) and two byte
interleaves; see `cpu/_numba_kernels.py`. A checkpoint may hold any of its packable matrices packed
(`layouts.packable`); `Checkpoint.packed` reads them, and every other reader gets their BF16 rows back unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GROUP = 64  # weights a group packs
GROUP_BYTES = GROUP // 2 + GROUP  # its codes, then its low bytes
CODES = 16
PARTS = ("packed", "tables", "exceptions")
# A matrix with more exceptions than this share of its weights stays BF16. Each costs a decoding step a product of
# its own, about the time of 16 packed weights, and 16 bytes; past about 2 % packing would lose. Trained and
# synthetic rows have a few in 100,000.
MAX_EXCEPTION_SHARE = 1 / 256


def packable_width(columns: int) -> bool:
    return columns > 0 and columns % GROUP == 0


def packed_width(columns: int) -> int:
    """Bytes a packed row of `columns` weights takes."""
    return columns // GROUP * GROUP_BYTES


def pack_rows(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BF16 bits `[R, C]` (uint16) as `(packed, tables, exceptions)`, the exceptions' indices flat within these rows."""
    rows, columns = bits.shape
    if not packable_width(columns):
        raise ValueError(f"a packed BF16 matrix needs a multiple of {GROUP} columns, not {columns}")
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    high = (bits >> 8).astype(np.uint8)
    low = (bits & 0xFF).astype(np.uint8)
    tables, _ = _tables(high)
    codes_of = np.full((rows, 256), CODES, np.uint8)  # CODES: not in the row's table
    codes_of[np.arange(rows)[:, None], tables] = np.arange(CODES, dtype=np.uint8)
    codes = codes_of[np.arange(rows)[:, None], high]
    outside = codes == CODES
    exceptions = np.stack([np.flatnonzero(outside), bits[outside].astype(np.int64)], axis=1)
    codes[outside] = 0
    low[outside] = 0
    grouped = codes.reshape(rows, columns // GROUP, 2, GROUP // 2)
    code_bytes = grouped[:, :, 0] | (grouped[:, :, 1] << 4)
    packed = np.concatenate([code_bytes, low.reshape(rows, columns // GROUP, GROUP)], axis=2)
    return packed.reshape(rows, packed_width(columns)), tables, exceptions


def exception_count(bits: np.ndarray) -> int:
    """How many exceptions `pack_rows(bits)` would list, from the rows' high bytes alone."""
    high = (np.asarray(bits, dtype=np.uint16) >> 8).astype(np.uint8)
    tables, counts = _tables(high)
    counts[:, 0] = (high == 0).sum(axis=1)
    return high.size - int(np.take_along_axis(counts, tables.astype(np.int64), axis=1).sum())


def _tables(high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's table (0x00, then its 15 most frequent other high bytes) and its count of each high byte (the
    count of 0x00 replaced by -1)."""
    rows = high.shape[0]
    row_offsets = (np.arange(rows, dtype=np.int64) * 256)[:, None]
    counts = np.bincount((high + row_offsets).ravel(), minlength=rows * 256).reshape(rows, 256)
    counts[:, 0] = -1  # entry 0 is 0x00 whatever the counts; the 15 most frequent of the rest follow
    tables = np.zeros((rows, CODES), np.uint8)
    tables[:, 1:] = np.argsort(-counts, axis=1, kind="stable")[:, : CODES - 1]
    return tables, counts


def unpack_rows(packed: np.ndarray, tables: np.ndarray, exceptions: np.ndarray) -> np.ndarray:
    """The BF16 bits `[R, C]` of packed rows, their exceptions' indices flat within these rows."""
    rows = packed.shape[0]
    columns = packed.shape[1] // GROUP_BYTES * GROUP
    groups = packed.reshape(rows, columns // GROUP, GROUP_BYTES)
    code_bytes = groups[:, :, : GROUP // 2]
    codes = np.concatenate([code_bytes & 0x0F, code_bytes >> 4], axis=2).reshape(rows, columns)
    high = tables[np.arange(rows)[:, None], codes].astype(np.uint16)
    bits = (high << 8) | groups[:, :, GROUP // 2 :].reshape(rows, columns)
    _overlay(bits, exceptions, 0)
    return bits


def _overlay(bits: np.ndarray, exceptions: np.ndarray, first: int) -> None:
    """Write `exceptions` (flat indices from `first` on) into the unpacked `bits` that start there."""
    bits.reshape(-1)[exceptions[:, 0] - first] = exceptions[:, 1].astype(np.uint16)


@dataclass
class PackedMatrix:
    """A packed BF16 matrix as the checkpoint maps it (see the module's docstring)."""

    packed: np.ndarray  # uint8 [R, C // 64 * 96]
    tables: np.ndarray  # uint8 [R, 16]
    exceptions: np.ndarray  # int64 [n, 2]: flat index, BF16 bits
    # Each row's exceptions, for the decoding kernel: `row_starts [R + 1]` into `exception_columns` and
    # `exception_values` (float32), made once on load from `exceptions`.
    row_starts: np.ndarray = field(init=False, repr=False)
    exception_columns: np.ndarray = field(init=False, repr=False)
    exception_values: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rows, columns = self.shape
        index = self.exceptions[:, 0]
        self.row_starts = np.searchsorted(index, np.arange(rows + 1, dtype=np.int64) * columns).astype(np.int64)
        self.exception_columns = index % columns
        self.exception_values = (self.exceptions[:, 1].astype(np.uint32) << 16).view(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] // GROUP_BYTES * GROUP

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.tables.nbytes + self.exceptions.nbytes

    def rows(self, start: int, stop: int) -> np.ndarray:
        """BF16 bits of rows `start:stop`, unpacked."""
        bits = unpack_rows(self.packed[start:stop], self.tables[start:stop], np.zeros((0, 2), np.int64))
        self.overlay_exceptions(bits, start, stop)
        return bits

    def overlay_exceptions(self, bits: np.ndarray, start: int, stop: int) -> None:
        """Write the exceptions of rows `start:stop` into their unpacked bits `bits`."""
        _overlay(bits, self.exceptions[self.row_starts[start] : self.row_starts[stop]], start * self.shape[1])


def check_packed(matrix: PackedMatrix) -> str | None:
    """Why a stored packed matrix breaks the format (and would decode one way in the decoding kernel, which adds each
    exception to a +0.0, and another unpacked, where it replaces it), or None: its tables start with 0x00, and its
    exceptions are in increasing order within the matrix, 16-bit, each where code 0 and low byte 0 are stored."""
    rows, columns = matrix.shape
    if rows and (matrix.tables[:, 0] != 0).any():
        return "tables: an entry 0 is not 0x00"
    exceptions = matrix.exceptions
    index = exceptions[:, 0]
    if not index.size:
        return None
    if index[0] < 0 or index[-1] >= rows * columns or (np.diff(index) <= 0).any():
        return "exceptions: lists indices out of order or outside the matrix"
    if ((exceptions[:, 1] < 0) | (exceptions[:, 1] > 0xFFFF)).any():
        return "exceptions: lists values that are not 16-bit BF16 bits"
    row, column = np.divmod(index, columns)
    group, within = np.divmod(column, GROUP)
    at = group * GROUP_BYTES
    codes = matrix.packed[row, at + within % (GROUP // 2)] >> np.where(within < GROUP // 2, 0, 4).astype(np.uint8)
    if ((codes & 0x0F) != 0).any() or (matrix.packed[row, at + GROUP // 2 + within] != 0).any():
        return "exceptions: one lies where a weight other than +0.0 is stored"
    return None

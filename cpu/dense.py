"""A dense layer `x @ W.T + b` whose weight is float32, BF16 bits left as the checkpoint stores them, or BF16
packed into 12 bits a weight (`packed_bf16`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlx_oss.packed_bf16 import PackedMatrix

from . import kernels
from .workers import Workers

WIDEN_BYTES = 4 << 20  # float32 bytes of BF16 weight widened at once for BLAS: a block that stays in cache
UNPACK_ROWS = 1024  # rows of a packed matrix unpacked to BF16 at once for a prompt (6 MB at 2880 columns)


@dataclass
class Dense:
    weight: np.ndarray | PackedMatrix  # [out, in]: float32, BF16 bits as uint16, or packed BF16
    bias: np.ndarray | None
    uses_kernels: bool  # whether the compiled kernels may be used
    workers: Workers | None = None  # threads that widen BF16 blocks side by side

    def __call__(self, x: np.ndarray, laid_out: list[np.ndarray] | None = None) -> np.ndarray:
        """`x @ W.T + b`. `laid_out`, where given, keeps x as the BF16 passes read it (`kernels.bf16_pieces`) for
        the next call with the same x: filled by the first that takes them."""
        if _decoding([self], x):
            y = _matvec([self.weight], x)
        elif isinstance(self.weight, PackedMatrix):
            y = self._unpacked(x, [] if laid_out is None else laid_out)
        elif self.uses_kernels and kernels.bf16_tiles_fit(self.weight):
            y = kernels.bf16_matmul(self.weight, x)
        elif self.uses_kernels and kernels.bf16_passes_fit(self.weight, x.shape[0]):
            if laid_out is not None and not laid_out:
                laid_out += kernels.bf16_pieces(x)
            y = kernels.bf16_matmul_passes(self.weight, x, laid_out or None)
        elif self.weight.dtype == np.float32:
            y = x @ self.weight.T
        else:
            y = self._widened(x)
        if self.bias is not None:
            y += self.bias
        return y

    def _unpacked(self, x: np.ndarray, laid_out: list[np.ndarray]) -> np.ndarray:
        """`x @ W.T` for packed W, unpacked to BF16 `UNPACK_ROWS` rows at a time, each block through the BF16 path
        (a prompt's products take far longer than unpacking; decoding takes the packed rows as they are)."""
        rows = self.weight.shape[0]
        y = np.empty((x.shape[0], rows), dtype=np.float32)
        unpacked = kernels.unpacked if self.uses_kernels else PackedMatrix.rows
        for r0 in range(0, rows, UNPACK_ROWS):
            r1 = min(rows, r0 + UNPACK_ROWS)
            block = unpacked(self.weight, r0, r1)
            block.flags.writeable = False  # the type the kernels were built for: a checkpoint's read-only map
            y[:, r0:r1] = Dense(block, None, self.uses_kernels, self.workers)(x, laid_out)
        return y

    def _widened(self, x: np.ndarray) -> np.ndarray:
        """`x @ W.T` for BF16 W, widened to float32 a cache-sized block of rows at a time; with `workers`, each
        thread takes every n-th block (widening is a one-core ufunc that takes as long as the multiply)."""
        out_features, in_features = self.weight.shape
        y = np.empty((x.shape[0], out_features), dtype=np.float32)
        rows = max(1, WIDEN_BYTES // (4 * in_features))
        starts = range(0, out_features, rows)

        def widen_and_multiply(share: range) -> None:
            scratch = np.empty((min(rows, out_features), in_features), dtype=np.uint32)
            for r0 in share:
                r1 = min(out_features, r0 + rows)
                block = scratch[: r1 - r0]
                np.left_shift(self.weight[r0:r1], np.uint32(16), out=block, dtype=np.uint32)  # BF16 -> float32 bits
                np.matmul(x, block.view(np.float32).T, out=y[:, r0:r1])

        if self.workers is None or len(starts) == 1:
            widen_and_multiply(starts)
        else:
            n = self.workers.count
            self.workers.map(widen_and_multiply, [starts[i::n] for i in range(n)])
        return y


def side_by_side(layers: Sequence[Dense], x: np.ndarray) -> np.ndarray:
    """The outputs of `layers` (one input) side by side, `[T, sum of their outputs]`. A decoding step's come from one
    `kernels.matvec` call: one launch of the threads and one reordering of x for a step's q, k and v projections in a
    checkpoint's own layout, k's and v's small matrices read alongside q's instead of in parallel loops of their own."""
    if len(layers) == 1:
        return layers[0](x)
    if not _decoding(layers, x):
        laid_out: list[np.ndarray] = []  # x laid out once for all of them (and their blocks)
        return np.concatenate([layer(x, laid_out) for layer in layers], axis=1)
    y = _matvec([layer.weight for layer in layers], x)
    start = 0
    for layer in layers:
        end = start + layer.weight.shape[0]
        if layer.bias is not None:
            y[:, start:end] += layer.bias
        start = end
    return y


def _decoding(layers: Sequence[Dense], x: np.ndarray) -> bool:
    """Whether `x` is a decoding step's few rows, which the kernels multiply through the layers' weights in one
    `kernels.matvec` (or `kernels.packed_matvec`) call, reading each weight once."""
    weights = [layer.weight for layer in layers]
    if not all(layer.uses_kernels for layer in layers) or x.shape[0] > kernels.DECODE_ROWS:
        return False
    if all(isinstance(w, PackedMatrix) for w in weights):
        return len({w.shape[1] for w in weights}) == 1
    return not any(isinstance(w, PackedMatrix) for w in weights) and kernels.stackable(weights)


def _matvec(weights: list, x: np.ndarray) -> np.ndarray:
    """The decoding kernel for these weights (all packed, or all stackable: `_decoding`)."""
    if isinstance(weights[0], PackedMatrix):
        return kernels.packed_matvec(weights, x)
    return kernels.matvec(weights, x)

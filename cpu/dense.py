"""A dense layer `x @ W.T + b` whose weight is float32, or BF16 bits left as the checkpoint stores them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import kernels
from .workers import Workers

WIDEN_BYTES = 4 << 20  # float32 bytes of BF16 weight widened at once for BLAS: a block that stays in cache


@dataclass
class Dense:
    weight: np.ndarray  # [out, in]: float32, or BF16 bits as uint16
    bias: np.ndarray | None
    uses_kernels: bool  # whether the compiled kernels may be used
    workers: Workers | None = None  # threads that widen BF16 blocks side by side

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if _decoding([self], x):
            y = kernels.matvec(self.weight, x)
        elif self.uses_kernels and kernels.bf16_tiles_fit(self.weight):
            y = kernels.bf16_matmul(self.weight, x)
        elif self.uses_kernels and kernels.bf16_passes_fit(self.weight, x.shape[0]):
            y = kernels.bf16_matmul_passes(self.weight, x)
        elif self.weight.dtype == np.float32:
            y = x @ self.weight.T
        else:
            y = self._widened(x)
        if self.bias is not None:
            y += self.bias
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
        return np.concatenate([layer(x) for layer in layers], axis=1)
    y = kernels.matvec([layer.weight for layer in layers], x)
    start = 0
    for layer in layers:
        end = start + layer.weight.shape[0]
        if layer.bias is not None:
            y[:, start:end] += layer.bias
        start = end
    return y


def _decoding(layers: Sequence[Dense], x: np.ndarray) -> bool:
    """Whether `x` is a decoding step's few rows, which the kernels multiply through the layers' weights in one
    `kernels.matvec` call, reading each weight once."""
    weights = [layer.weight for layer in layers]
    return (
        all(layer.uses_kernels for layer in layers) and x.shape[0] <= kernels.DECODE_ROWS and kernels.stackable(weights)
    )

"""A dense layer `x @ W.T + b` whose weight is float32, or BF16 bits left as the checkpoint stores them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels

WIDEN_BYTES = 4 << 20  # float32 bytes of BF16 weight widened at once for BLAS: a block that stays in cache


@dataclass
class Dense:
    weight: np.ndarray  # [out, in]: float32, or BF16 bits as uint16
    bias: np.ndarray | None
    kernels: bool  # whether the compiled kernels may be used

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out_features, in_features = self.weight.shape
        if self.kernels and x.shape[0] <= kernels.FEW_TOKENS and in_features % 16 == 0:
            y = kernels.matvec(self.weight, x)
        elif self.weight.dtype == np.float32:
            y = x @ self.weight.T
        else:
            y = np.empty((x.shape[0], out_features), dtype=np.float32)
            rows = max(1, WIDEN_BYTES // (4 * in_features))
            scratch = np.empty((min(rows, out_features), in_features), dtype=np.uint32)
            for r0 in range(0, out_features, rows):
                r1 = min(out_features, r0 + rows)
                block = scratch[: r1 - r0]
                np.left_shift(self.weight[r0:r1], np.uint32(16), out=block, dtype=np.uint32)  # BF16 -> float32 bits
                np.matmul(x, block.view(np.float32).T, out=y[:, r0:r1])
        if self.bias is not None:
            y += self.bias
        return y

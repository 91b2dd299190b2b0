"""A layer's experts: each token through the experts the router chose for it, over the MXFP4 weights as stored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .layers import clamped_swiglu, mxfp4_linear
from .workers import Workers


@dataclass
class Experts:
    """One layer's experts, MXFP4-packed and memory-mapped (biases in float32), and the way they run.

    Work is per (token, expert) pair. With the kernels, the pairs whose expert no other token chose (all of them
    while decoding) go through the packed weights together in one call, and an expert chosen by several tokens
    decodes each block once for all of them (on AMX or VNNI, every such expert in one call; on VNNI only those chosen
    by `kernels.TILED_GROUP_TOKENS` tokens or more). Plain NumPy decodes a chosen
    expert to float32 a slice at a time, for BLAS, experts side by side in `workers`.
    """

    gate_up_blocks: np.ndarray  # [E, 2 * intermediate, hidden / 32, 16] uint8: rows gate0, up0, gate1, up1, ...
    gate_up_scales: np.ndarray  # [E, 2 * intermediate, hidden / 32] uint8
    gate_up_bias: np.ndarray  # [E, 2 * intermediate]
    down_blocks: np.ndarray  # [E, hidden, intermediate / 32, 16] uint8
    down_scales: np.ndarray
    down_bias: np.ndarray  # [E, hidden]
    alpha: float  # the clamped SwiGLU's
    limit: float
    uses_kernels: bool  # whether the compiled kernels may be used
    workers: Workers

    def __call__(self, x: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """Each token `x [T, hidden]` through its chosen experts `chosen [T, k]`: `[T, k, hidden]`."""
        tokens, k = chosen.shape
        pair_expert = chosen.reshape(-1)
        pair_token = np.repeat(np.arange(tokens), k)
        if self.uses_kernels:
            alone = np.bincount(pair_expert)[pair_expert] == 1
        else:
            alone = np.zeros(pair_expert.size, dtype=bool)
        if alone.all():  # decoding a token: no grouping to do
            return self._alone(pair_expert, x[pair_token]).reshape(tokens, k, -1)
        return self._grouped(x, pair_expert, pair_token, alone).reshape(tokens, k, -1)

    def _grouped(self, x, pair_expert, pair_token, alone) -> np.ndarray:
        """The output of every (token, expert) pair: the `alone` ones through `_alone`, the rest grouped by expert
        so that each expert's weights are read once for all its tokens."""
        y = np.empty((pair_expert.size, self.down_bias.shape[1]), dtype=np.float32)
        if alone.any():
            y[alone] = self._alone(pair_expert[alone], x[pair_token[alone]])
        groups = [(e, np.nonzero(pair_expert == e)[0]) for e in np.unique(pair_expert[~alone])]
        if self.uses_kernels and kernels.tiles_fit(self.gate_up_blocks) and kernels.tiles_fit(self.down_blocks):
            tiled = [g for g in groups if g[1].size >= kernels.TILED_GROUP_TOKENS]
            if tiled:
                pairs = np.concatenate([p for _, p in tiled])
                experts, sizes = np.array([e for e, _ in tiled]), [p.size for _, p in tiled]
                y[pairs] = self._tiled(experts, sizes, x[pair_token[pairs]])
            groups = [g for g in groups if g[1].size < kernels.TILED_GROUP_TOKENS]
        groups.sort(key=lambda g: -g[1].size)  # the largest first, so that the threads finish together

        def expert(group):
            return self._expert(group[0], x[pair_token[group[1]]])

        # The kernels use every core within each call. Plain NumPy spends most of an expert's time decoding its
        # weights (`np.take`, the scale multiply) on one core per call, so experts run in threads, BLAS on one
        # thread each (its own threads on top would oversubscribe the cores).
        outputs = map(expert, groups) if self.uses_kernels else self.workers.map(expert, groups)
        for (_, pairs), out in zip(groups, outputs, strict=True):
            y[pairs] = out
        return y

    def _alone(self, experts: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Pair p through expert `experts[p]` with input `x[p]`, by the kernels on the packed weights."""
        gate_up = kernels.mxfp4_matvec(self.gate_up_blocks, self.gate_up_scales, experts, x)
        act = kernels.swiglu_laid_out(gate_up, self.gate_up_bias, experts, self.alpha, self.limit, passes=False)
        out = kernels.mxfp4_matvec(self.down_blocks, self.down_scales, experts, act)
        out += self.down_bias[experts]
        return out

    def _tiled(self, experts: np.ndarray, sizes: list[int], x: np.ndarray) -> np.ndarray:
        """Consecutive groups of `sizes` rows of `x`, group i through expert `experts[i]`, every expert at once on
        AMX or VNNI tiles (`kernels.mxfp4_matmul_groups`)."""
        bias_rows = np.repeat(experts, sizes)
        gate_up = kernels.mxfp4_matmul_groups(self.gate_up_blocks, self.gate_up_scales, experts, sizes, x)
        act = kernels.swiglu_laid_out(gate_up, self.gate_up_bias, bias_rows, self.alpha, self.limit, passes=False)
        out = kernels.mxfp4_matmul_groups(self.down_blocks, self.down_scales, experts, sizes, act)
        out += self.down_bias[bias_rows]
        return out

    def _expert(self, e: int, x: np.ndarray) -> np.ndarray:
        """Expert `e` on the rows of `x`."""
        if self.uses_kernels:
            gate_up = kernels.mxfp4_matmul(self.gate_up_blocks[e], self.gate_up_scales[e], x)
            bias_rows = np.full(x.shape[0], e)
            act = kernels.swiglu_laid_out(gate_up, self.gate_up_bias, bias_rows, self.alpha, self.limit, passes=True)
            return kernels.mxfp4_matmul(self.down_blocks[e], self.down_scales[e], act) + self.down_bias[e]
        gate_up = mxfp4_linear(x, self.gate_up_blocks[e], self.gate_up_scales[e], self.gate_up_bias[e])
        act = clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], self.alpha, self.limit)
        return mxfp4_linear(act, self.down_blocks[e], self.down_scales[e], self.down_bias[e])

"""Rotary position embeddings with YaRN scaling, as gpt-oss uses them.

YaRN (Peng et al., 2023, arXiv:2309.00071) keeps high-frequency dimensions as trained, divides the
low-frequency ones by `factor`, and ramps linearly in between; gpt-oss does not round the ramp's
ends (`truncate: false`). The cos and sin tables are both scaled by the attention "concentration"
0.1 * ln(factor) + 1, which multiplies every attention score by its square.
"""

from __future__ import annotations

import math

import numpy as np

from .config import RopeConfig


def _correction_dim(rotations: float, dim: int, theta: float, original_max: int) -> float:
    """The dimension index whose wavelength completes `rotations` turns over the original context."""
    return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[head_dim // 2]` (float32) and the concentration factor."""
    freqs = rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    if rope.kind == "default":
        return (1.0 / freqs).astype(np.float32), 1.0
    low = _correction_dim(rope.beta_fast, head_dim, rope.theta, rope.original_max_position_embeddings)
    high = _correction_dim(rope.beta_slow, head_dim, rope.theta, rope.original_max_position_embeddings)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    inv_freq = (1 - ramp) / freqs + ramp / (rope.factor * freqs)
    concentration = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
    return inv_freq.astype(np.float32), concentration


def rope_tables(rope: RopeConfig, head_dim: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables `[len(positions), head_dim // 2]`, concentration included."""
    inv_freq, concentration = yarn_frequencies(rope, head_dim)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles) * np.float32(concentration), np.sin(angles) * np.float32(concentration)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate `x [T, heads, head_dim]` in the half-split (NeoX) layout gpt-oss uses."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

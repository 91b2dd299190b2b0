"""MXFP4 (OCP microscaling FP4) decoding, as the gpt-oss checkpoints store their experts.

Each block of 32 values along a weight's input dimension is 16 bytes of E2M1 nibbles plus one
E8M0 scale byte. In byte j the low nibble is element 2j and the high nibble element 2j+1;
a value is `FP4_VALUES[nibble] * 2**(scale - 127)`. Blocks `[..., rows, G, 16]` with scales
`[..., rows, G]` decode to `[..., rows, G * 32]`, the nn.Linear (out x in) layout.
"""

from __future__ import annotations

import sys

import numpy as np

FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
# byte -> (value of its low nibble, value of its high nibble): one lookup decodes two elements.
BYTE_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], axis=1)
# two little-endian bytes (a uint16) -> their four values, in order: one lookup decodes four elements.
_WORDS = np.arange(65536)
WORD_QUADS = np.concatenate([BYTE_PAIRS[_WORDS & 0xFF], BYTE_PAIRS[_WORDS >> 8]], axis=1)
_QUAD_ITEMS = WORD_QUADS.view(np.complex128).reshape(-1)  # each row of four float32 as one 16-byte item
# E8M0 scale byte -> 2**(byte - 127) as float32 (255 is NaN in the spec; it overflows to inf here).
with np.errstate(over="ignore"):
    SCALE_VALUES = np.ldexp(np.float64(1.0), np.arange(256) - 127).astype(np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode MXFP4 `blocks [..., G, 16]` and `scales [..., G]` to float32 `[..., G * 32]` (into `out` if given)."""
    out = decode_unscaled(blocks, out)
    values = out.reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])
    values *= SCALE_VALUES[scales][..., None]
    return out


def decode_unscaled(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The E2M1 values of `blocks [..., G, 16]` as float32 `[..., G * 32]`, without their blocks' scales.

    Two bytes at a time through a 65536-entry table of four values, each entry moved as one 16-byte item by
    `np.take` in `wrap` mode (which skips the bounds check a uint16 index cannot fail): about 0.5 ns a value on
    this project's 2-core test machine, against 6.5 for indexing the byte table with the blocks.
    """
    *lead, groups, width = blocks.shape
    if out is None:
        out = np.empty((*lead, groups * 2 * width), dtype=np.float32)
    if sys.byteorder == "little" and out.flags.c_contiguous:
        pairs = np.ascontiguousarray(blocks).view(np.uint16).reshape(-1)
        np.take(_QUAD_ITEMS, pairs, out=out.reshape(-1).view(np.complex128), mode="wrap")
    else:
        out[...] = np.take(BYTE_PAIRS, blocks, axis=0).reshape(out.shape)
    return out


def quantize(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode float `weights [..., in]` (in a multiple of 32) to MXFP4 blocks and scales.

    Each block's scale is the smallest power of two that fits its largest magnitude into 6; values round to the
    nearest E2M1 level (a tie to the even one; what rounds to zero is +0). Lossless for values that are
    already MXFP4, as a dequantized checkpoint's are.
    """
    *lead, width = weights.shape
    groups = width // 32
    w = np.asarray(weights, dtype=np.float32).reshape(*lead, groups, 32)
    peak = np.abs(w).max(axis=-1)
    with np.errstate(divide="ignore"):
        exponent = np.where(peak > 0, np.ceil(np.log2(peak / np.float32(6.0))), 0)
    exponent = np.clip(exponent, -127, 127).astype(np.int32)
    scaled = w * np.ldexp(np.float32(1), -exponent)[..., None]
    # A value's level (its index among the magnitudes) is the number of midpoints below it, a tie going to the even
    # level (roundTiesToEven, as the OCP spec converts): a sum of compares, 8x as quick as np.searchsorted.
    magnitude = np.abs(scaled)
    level = np.zeros(magnitude.shape, dtype=np.uint8)
    for below, midpoint in enumerate(_MIDPOINTS):
        level += magnitude >= midpoint if below % 2 else magnitude > midpoint
    nibbles = level | np.where((scaled < 0) & (level > 0), np.uint8(8), np.uint8(0))
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return blocks.astype(np.uint8), (exponent + 127).astype(np.uint8)


# Halfway between consecutive E2M1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6): a magnitude's level is how many lie below.
_MIDPOINTS = (FP4_VALUES[1:8] + FP4_VALUES[:7]) / 2

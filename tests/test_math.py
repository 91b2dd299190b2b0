"""MXFP4 decoding and YaRN checked against the format's definition and transformers' own code."""

from __future__ import annotations

import math

import numpy as np
import torch

from mlx_oss.config import RopeConfig
from mlx_oss.mxfp4 import FP4_VALUES, dequantize, quantize
from mlx_oss.rope import yarn_frequencies


def test_dequantize_follows_the_spec_element_by_element():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 2, 16), dtype=np.uint8)
    scales = rng.integers(120, 135, (3, 2), dtype=np.uint8)
    out = dequantize(blocks, scales)
    assert out.shape == (3, 64) and out.dtype == np.float32
    for r in range(3):
        for g in range(2):
            for j in range(16):
                byte = int(blocks[r, g, j])
                scale = 2.0 ** (int(scales[r, g]) - 127)
                assert out[r, g * 32 + 2 * j] == FP4_VALUES[byte & 15] * scale  # low nibble first
                assert out[r, g * 32 + 2 * j + 1] == FP4_VALUES[byte >> 4] * scale


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (2, 6, 3, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (2, 6, 3), dtype=np.uint8)
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    # transformers returns [E, in, out]; ours is the nn.Linear [E, out, in] layout.
    np.testing.assert_array_equal(dequantize(blocks, scales), theirs.transpose(1, 2).numpy())


def test_quantize_round_trips_representable_values():
    rng = np.random.default_rng(2)
    exact = rng.choice(FP4_VALUES, size=(4, 64)) * np.float32(2.0**-5)
    blocks, scales = quantize(exact)
    np.testing.assert_array_equal(dequantize(blocks, scales), exact)


def test_yarn_matches_transformers_and_the_published_constants():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = GptOssConfig(num_hidden_layers=2)
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours, our_scale = yarn_frequencies(RopeConfig(), 64)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert our_scale == their_scale == 0.1 * math.log(32) + 1
    # gpt-oss-facts: dims up to 8 keep their frequency, dims from 18 on are divided by 32.
    base = 150000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(ours[:9], base[:9], rtol=1e-6)
    np.testing.assert_allclose(ours[18:], base[18:] / 32, rtol=1e-6)


def test_truncated_yarn_rounds_the_ramp():
    smooth, _ = yarn_frequencies(RopeConfig(truncate=False), 64)
    rounded, _ = yarn_frequencies(RopeConfig(truncate=True), 64)
    assert not np.allclose(smooth, rounded)
    np.testing.assert_allclose(smooth[:8], rounded[:8])


def test_a_bf16_layer_widened_in_threads_matches_torch(monkeypatch):
    """The plain path's BF16 `Dense`: blocks of rows widened and multiplied, shared out over threads unevenly."""
    from mlx_oss.cpu import dense
    from mlx_oss.cpu.dense import Dense
    from mlx_oss.cpu.workers import Workers

    rng = np.random.default_rng(3)
    weight = torch.from_numpy(rng.standard_normal((1000, 96)).astype(np.float32)).bfloat16()
    bias = rng.standard_normal(1000).astype(np.float32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    expected = torch.nn.functional.linear(torch.from_numpy(x), weight.float(), torch.from_numpy(bias)).numpy()
    monkeypatch.setattr(dense, "WIDEN_BYTES", 96 * 4 * 70)  # 70 rows a block: 15 blocks, the last of 20 rows
    bits = weight.view(torch.int16).numpy().view(np.uint16)
    for workers in (None, Workers(2), Workers(3)):
        got = Dense(bits, bias, uses_kernels=False, workers=workers)(x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_quantize_rounds_to_the_nearest_level_by_the_definition():
    """Values that are not MXFP4 (a fine-tune's): the scale fits the block's peak into 6, each value goes to the
    nearest E2M1 level, a tie to the even one (the OCP spec's roundTiesToEven), and what rounds to zero is +0."""
    rng = np.random.default_rng(7)
    weights = rng.standard_normal((16, 64)).astype(np.float32)
    weights[0, :32] = np.array([6, 0.25, -0.25, 0.75, -1.25, 2.5, -3.5, 5] * 4, dtype=np.float32)  # exact ties
    weights[1, :32] = 0
    blocks, scales = quantize(weights)
    values = dequantize(blocks, scales).reshape(16, 2, 32)
    w = weights.reshape(16, 2, 32)
    scale = 2.0 ** (scales.astype(np.float64) - 127)
    peak = np.abs(w).max(axis=-1)
    assert np.all((peak <= 6 * scale) & ((peak > 3 * scale) | (peak == 0)))  # the smallest power of two that fits
    levels = np.unique(np.abs(FP4_VALUES))
    for index in np.ndindex(w.shape):
        x = w[index] / scale[index[:2]]
        distance = np.abs(levels - abs(x))
        tied = np.flatnonzero(distance == distance.min())
        even = tied[tied % 2 == 0]  # a level's index is its code's, whose last bit is the mantissa
        nearest = levels[tied[0] if tied.size == 1 else even[0]]
        assert values[index] == math.copysign(nearest, x if nearest else 1.0) * scale[index[:2]], (index, x)
    assert values[0, 0, :8].tolist() == [6, 0, 0, 1, -1, 2, -4, 4]
    assert not np.signbit(values[1, 0]).any() and not np.signbit(values[0, 0, 2])  # -0.25 rounds to +0

"""Both backends, on the Hugging Face directory and on their converted layouts, against transformers'
GptOssForCausalLM on the same synthetic files."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_oss
from mlx_oss.cpu import experts as cpu_experts
from reference import assert_logits_match, reference_logits

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=96)

CASES = {
    # 40 tokens through a 6-token window: sliding layers see only part of the prefix.
    "longer-than-window": (dict(num_hidden_layers=4, sliding_window=6, **SMALL), dict(), 40),
    # Gate/up biases of several units drive the SwiGLU inputs past the +-7 clamp.
    "clamp-active": (dict(num_hidden_layers=2, **SMALL), dict(expert_bias_std=8.0), 24),
    "odd-layer-count": (dict(num_hidden_layers=3, sliding_window=8, **SMALL), dict(seed=3), 20),
    "wide-groups": (
        dict(
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            num_local_experts=16,
            num_experts_per_tok=3,
            **SMALL,
        ),
        dict(seed=5, single_file=True),
        18,
    ),
}


@pytest.mark.parametrize("layout", ["hf", "converted", "packed"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, backend, layout, synthetic_checkpoint, converted):
    shape, options, length = CASES[case]
    path = synthetic_checkpoint(**shape, **options)
    model_dir = path if layout == "hf" else converted(path, backend if layout == "converted" else "packed")
    model = mlx_oss.load(model_dir, backend=backend)
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, length)
    assert_logits_match(model.logits(tokens), reference_logits(path, tokens))


@pytest.mark.parametrize("layout", ["hf", "packed"])
def test_tiny_preset_matches_transformers(tiny_checkpoint, backend, layout, converted):
    model = mlx_oss.load(tiny_checkpoint if layout == "hf" else converted(tiny_checkpoint, "packed"), backend=backend)
    tokens = [200006, 17360, 200008, 13225, 11, 1495, 553, 481, 30, 200007, 200006, 173781]
    assert_logits_match(model.logits(tokens), reference_logits(tiny_checkpoint, tokens))


def test_clamp_case_really_clamps(synthetic_checkpoint, monkeypatch):
    """Guards the clamp case above: with large biases, gate or up values do pass +-limit (seen through the plain
    path's `clamped_swiglu`; the kernels fuse their own)."""
    monkeypatch.setenv("MLX_OSS_KERNELS", "off")
    shape, options, length = CASES["clamp-active"]
    model = mlx_oss.load(synthetic_checkpoint(**shape, **options), backend="numpy")
    seen = []
    original = cpu_experts.clamped_swiglu

    def recording(gate, up, alpha, limit):
        seen.append((np.abs(np.stack([gate, up])) > limit).mean())
        return original(gate, up, alpha, limit)

    monkeypatch.setattr(cpu_experts, "clamped_swiglu", recording)
    model.logits(np.arange(length))
    assert np.mean(seen) > 0.2


def test_sliding_window_changes_the_answer(synthetic_checkpoint):
    """A window smaller than the sequence must matter; otherwise the long case tests nothing."""
    shape, options, length = CASES["longer-than-window"]
    windowed = mlx_oss.load(synthetic_checkpoint(**shape, **options), backend="numpy")
    wide = mlx_oss.load(synthetic_checkpoint(**{**shape, "sliding_window": 128}, **options), backend="numpy")
    tokens = np.random.default_rng(1).integers(0, 1000, length)
    a, b = windowed.logits(tokens), wide.logits(tokens)
    window = shape["sliding_window"]
    np.testing.assert_allclose(a[:window], b[:window], rtol=1e-4, atol=1e-4)
    assert np.abs(a[window:] - b[window:]).max() > 1e-2

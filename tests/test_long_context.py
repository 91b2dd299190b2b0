"""A context past the sliding window and past YaRN's original 4096 positions: the caches grow as they go, and a
chunked prefill plus decoding gives the logits of one full pass (both backends)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import load_variant

from mlx_oss.generate import PREFILL_CHUNK

LENGTH = 4200  # beyond rope.original_max_position_embeddings (4096) of the tiny preset, and its 16-token window


@pytest.mark.parametrize("variant", ["numpy", "numpy-float16", "mlx"])
def test_a_long_context_decodes_like_one_full_pass(synthetic_checkpoint, variant):
    """On NumPy with a float16 cache too (`--kv-bits 16`), whose attention kernels widen keys and values as they
    read them: to the reference tests' tolerance, as its rounding may round two keys a float32 rounding apart on
    the two routes to neighbouring values."""
    model = load_variant(synthetic_checkpoint(num_hidden_layers=2, vocab_size=500, seed=3), variant.split("-")[0])
    model.kv_bits = 16 if variant == "numpy-float16" else None
    c = model.config
    assert c.rope.original_max_position_embeddings < LENGTH and c.sliding_window < LENGTH
    seq = np.random.default_rng(0).integers(0, c.vocab_size, LENGTH)
    full = model.logits(seq)[-4:]
    cache = model.new_cache()
    for start in range(0, LENGTH - 4, PREFILL_CHUNK):
        model.forward(seq[start : min(start + PREFILL_CHUNK, LENGTH - 4)], cache, last_only=True)
    stepped = np.concatenate([model.forward(seq[i : i + 1], cache) for i in range(LENGTH - 4, LENGTH)])
    assert cache.length == LENGTH
    rel = 1e-3 if variant == "numpy-float16" else 1e-4
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=rel * np.abs(full).max())


POSITIONS = np.array([0, 1, 4095, 4096, 4097, 8191, 32768, 65535, 100000, 131071])


def transformers_rope(config, positions):
    """cos and sin of transformers' GptOssRotaryEmbedding (YaRN, attention scaling included) for `config`."""
    torch = pytest.importorskip("torch")
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    rotary = GptOssRotaryEmbedding(GptOssConfig(**config.to_hf_dict()))
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(positions)[None])
    return cos[0].numpy(), sin[0].numpy()


def float32_angle_tolerance(config, positions) -> np.ndarray:
    """`[positions, head_dim // 2]`: how far two float32 YaRN tables may honestly differ. Both sides compute the
    inverse frequencies in float32 (transformers with torch's `pow`, not correctly rounded either), so they may be a
    rounding (2 units in the last place) apart, and an angle `position * inv_freq` carries that times the position:
    up to 4e-3 radians at 131k. A wrong ramp or interpolation differs by whole radians."""
    from mlx_oss.rope import yarn_frequencies

    inv_freq, concentration = yarn_frequencies(config.rope, config.head_dim)
    angles = positions[:, None].astype(np.float32) * inv_freq[None, :]
    # plus the rounding of the angle itself, a float32 of up to 131071 radians
    return concentration * (positions[:, None] * 2 * np.spacing(inv_freq)[None, :] + np.spacing(angles)) + 2e-6


@pytest.mark.parametrize("preset", ["tiny", "20b"])
def test_yarn_up_to_131k_positions_matches_transformers(preset):
    from converters.synthetic import preset_config
    from mlx_oss.rope import rope_tables

    c = preset_config(preset)
    cos, sin = rope_tables(c.rope, c.head_dim, POSITIONS)
    ref_cos, ref_sin = transformers_rope(c, POSITIONS)
    assert ref_cos.shape == cos.shape == (len(POSITIONS), c.head_dim // 2)
    allowed = float32_angle_tolerance(c, POSITIONS)
    assert (np.abs(cos - ref_cos) <= allowed).all() and (np.abs(sin - ref_sin) <= allowed).all()
    # the tolerance tells YaRN apart: RoPE without its interpolation misses it at long positions
    plain, _ = rope_tables(dataclasses.replace(c.rope, factor=1.0), c.head_dim, POSITIONS)
    assert (np.abs(plain - ref_cos) > allowed)[POSITIONS > 4096].any()


def test_mlx_rope_at_long_offsets_matches_transformers():
    """The MLX backend rotates with `mx.fast.rope` at the cache's offset: the same angles as transformers'."""
    mx = pytest.importorskip("mlx.core")
    from converters.synthetic import preset_config
    from mlx_oss.rope import apply_rope, yarn_frequencies

    c = preset_config("20b")
    inv_freq, concentration = yarn_frequencies(c.rope, c.head_dim)
    x = np.random.default_rng(0).standard_normal((1, 1, 1, c.head_dim)).astype(np.float32)
    ref_cos, ref_sin = transformers_rope(c, POSITIONS)
    for i, p in enumerate(POSITIONS.tolist()):
        ours = mx.fast.rope(
            mx.array(x), c.head_dim, traditional=False, base=None, scale=1.0, offset=p, freqs=mx.array(1.0 / inv_freq)
        )
        ours = np.asarray(ours).reshape(c.head_dim) * concentration  # the MLX model folds it into the score scale
        expected = apply_rope(x.reshape(1, 1, -1), ref_cos[i : i + 1], ref_sin[i : i + 1]).reshape(-1)
        # the tolerance of the tables above, on each rotated pair's two values
        bound = float32_angle_tolerance(c, POSITIONS[i : i + 1])[0] * np.abs(x).max() * 2 + 1e-5
        assert (np.abs(ours - expected) <= np.tile(bound, 2)).all(), f"position {p}"


def test_logits_past_yarn_s_original_context_match_transformers(synthetic_checkpoint, backend):
    """The whole model at 4200 positions against transformers' (eager attention, float32)."""
    pytest.importorskip("transformers")
    import mlx_oss
    from reference import assert_logits_match, reference_logits

    path = synthetic_checkpoint(num_hidden_layers=2, vocab_size=500, seed=3)
    model = mlx_oss.load(path, backend=backend)
    seq = np.random.default_rng(1).integers(0, 500, LENGTH)
    cache = model.new_cache()
    model.forward(seq[:-8], cache, last_only=True)
    ours = np.concatenate([model.forward(seq[i : i + 1], cache) for i in range(LENGTH - 8, LENGTH)])
    assert_logits_match(ours, reference_logits(path, seq)[-8:])

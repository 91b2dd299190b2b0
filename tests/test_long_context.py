"""A context past the sliding window and past YaRN's original 4096 positions: the caches grow as they go, and a
chunked prefill plus decoding gives the logits of one full pass (both backends)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_variant

from mlx_oss.generate import PREFILL_CHUNK

LENGTH = 4200  # beyond rope.original_max_position_embeddings (4096) of the tiny preset, and its 16-token window


@pytest.mark.parametrize("variant", ["numpy", "mlx"])
def test_a_long_context_decodes_like_one_full_pass(synthetic_checkpoint, variant):
    model = load_variant(synthetic_checkpoint(num_hidden_layers=2, vocab_size=500, seed=3), variant)
    c = model.config
    assert c.rope.original_max_position_embeddings < LENGTH and c.sliding_window < LENGTH
    seq = np.random.default_rng(0).integers(0, c.vocab_size, LENGTH)
    full = model.logits(seq)[-4:]
    cache = model.new_cache()
    for start in range(0, LENGTH - 4, PREFILL_CHUNK):
        model.forward(seq[start : min(start + PREFILL_CHUNK, LENGTH - 4)], cache, last_only=True)
    stepped = np.concatenate([model.forward(seq[i : i + 1], cache) for i in range(LENGTH - 4, LENGTH)])
    assert cache.length == LENGTH
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())

"""Decoding with the KV cache gives the logits of one full-sequence pass."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_oss


@pytest.fixture(scope="module")
def model(synthetic_checkpoint):
    path = synthetic_checkpoint(num_hidden_layers=3, sliding_window=5, vocab_size=500, seed=7)
    return mlx_oss.load(path, backend="numpy")


def tokens(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, n)


def test_token_by_token_equals_full_pass(model):
    seq = tokens(23)  # several times the 5-token window
    full = model.logits(seq)
    cache = model.new_cache()
    stepped = np.concatenate([model.forward([t], cache) for t in seq])
    assert cache.length == len(seq)
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_prefill_then_decode_equals_full_pass(model):
    seq = tokens(19, seed=4)
    full = model.logits(seq)
    cache = model.new_cache()
    first = model.forward(seq[:11], cache)
    rest = np.concatenate([model.forward(seq[i : i + 3], cache) for i in range(11, 19, 3)])
    np.testing.assert_allclose(np.concatenate([first, rest]), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_last_only_returns_the_last_row(model):
    seq = tokens(9)
    full = model.logits(seq)
    last = model.forward(seq, model.new_cache(), last_only=True)
    assert last.shape == (1, model.config.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)


def test_truncate_then_extend_equals_fresh_prefill(model):
    shared, old_tail, new_tail = tokens(12, 5), tokens(6, 6), tokens(7, 8)
    cache = model.new_cache()
    model.forward(np.concatenate([shared, old_tail]), cache)
    cache.truncate(len(shared))
    reused = model.forward(new_tail, cache)
    fresh = model.logits(np.concatenate([shared, new_tail]))[len(shared) :]
    np.testing.assert_allclose(reused, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())


def test_cache_grows_past_its_initial_capacity(model):
    cache = model.new_cache()
    seq = tokens(300, 9)
    model.forward(seq[:290], cache)
    out = model.forward(seq[290:], cache)
    np.testing.assert_allclose(out[-1], model.logits(seq)[-1], rtol=1e-4, atol=1e-3)


def test_bad_token_ids_are_refused(model):
    with pytest.raises(ValueError, match=r"\[0, 500\)"):
        model.logits([1, 500])
    with pytest.raises(ValueError, match="at least one token"):
        model.logits([])

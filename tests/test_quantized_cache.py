"""The 8-bit KV caches (`--kv-bits 8`) against the backend contract, and their logits' distance from the float
cache's at a context several windows long.

A quantized cache is its own reference for the contract: truncating, copying and continuing must give what a fresh
prefill of the same tokens into a new quantized cache gives (quantization is per position, so that is exact up to
float rounding). Against the float cache the logits move by the int8 rounding of keys and values.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_variant

from mlx_oss.backend import Cache

SHAPE = dict(num_hidden_layers=3, sliding_window=5, vocab_size=500, seed=7)


@pytest.fixture(scope="module", params=["numpy", "numpy-plain", "mlx"])
def model(request, synthetic_checkpoint):
    return load_variant(synthetic_checkpoint(**SHAPE), request.param)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], n)


def prefilled(model, seq) -> Cache:
    cache = model.new_cache(kv_bits=8)
    model.forward(seq, cache)
    return cache


def assert_same(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_the_contract(model):
    cache = model.new_cache(kv_bits=8)
    assert isinstance(cache, Cache) and type(cache).__name__ == "QuantizedKVCache" and cache.length == 0
    seq, tail = tokens(30, 1), tokens(3, 2)
    model.forward(seq, cache)
    assert cache.length == 30 and cache.nbytes() > 0
    float_cache = prefilled_float(model, seq)
    assert cache.nbytes() < float_cache.nbytes() / 3  # int8 plus a scale per 16-value head (the test shape's)
    kept = cache.truncate(20)
    assert kept <= 20 and cache.length == kept
    fresh = model.forward(tail, prefilled(model, seq[:20]))
    assert_same(model.forward(np.concatenate([seq[kept:20], tail]), cache)[-len(tail) :], fresh)
    with pytest.raises(ValueError):
        cache.truncate(cache.length + 1)


def prefilled_float(model, seq):
    cache = model.new_cache()
    model.forward(seq, cache)
    return cache


def test_a_copy_is_independent(model):
    prefix, a, b = tokens(30, 3), tokens(4, 4), tokens(6, 5)
    original = prefilled(model, prefix)
    copied = original.copy()
    out_a = model.forward(a, original)
    out_b = model.forward(b, copied)
    assert (original.length, copied.length) == (34, 36)
    assert_same(out_a, model.forward(a, prefilled(model, prefix)))
    assert_same(out_b, model.forward(b, prefilled(model, prefix)))
    assert model.new_cache(kv_bits=8).copy().length == 0


def test_decoding_matches_a_prefill_of_the_same_tokens(model):
    """Token by token (the decode kernels' path on NumPy) against one pass, both on quantized caches."""
    seq = tokens(40, 6)
    cache = prefilled(model, seq[:30])
    stepped = np.concatenate([model.forward(seq[i : i + 1], cache) for i in range(30, 40)])
    assert_same(stepped, model.forward(seq[30:], prefilled(model, seq[:30])))


def test_logits_stay_near_the_float_cache_beyond_the_window(model):
    """Several windows long: the distance int8 keys and values make, well inside the logits' scale."""
    seq = tokens(200, 8)
    q = model.forward(seq[150:], prefilled(model, seq[:150]))
    f = model.forward(seq[150:], prefilled_float(model, seq[:150]))
    assert np.abs(q - f).max() < 0.02 * np.abs(f).max()
    assert (q.argmax(-1) == f.argmax(-1)).mean() >= 0.9


def bounded_cache(model):
    """A quantized cache whose sliding layers keep only 3 positions beyond their window (as a long conversation
    makes the default one, 2048 beyond)."""
    c = model.config
    windows = [c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)]
    if model.backend == "mlx":
        from mlx_oss.mlx_backend.quantized_kv_cache import QuantizedKVCache

        return QuantizedKVCache(windows, 8, rewind=3, step=4)
    from mlx_oss.cpu.quantized_kv_cache import QuantizedKVCache

    return QuantizedKVCache(windows, c.num_key_value_heads, c.head_dim, 8, rewind=3, step=4)


def test_sliding_layers_drop_old_keys_and_attend_the_same(model):
    seq = tokens(60, 10)
    bounded, whole = bounded_cache(model), model.new_cache(kv_bits=8)
    model.forward(seq[:20], bounded)
    model.forward(seq[:20], whole)
    steps = [(model.forward(seq[i : i + 1], bounded), model.forward(seq[i : i + 1], whole)) for i in range(20, 60)]
    for ours, theirs in steps:
        assert_same(ours, theirs)
    for start in range(60, 300, 20):  # a longer conversation: the sliding layers' buffers stop growing
        model.forward(tokens(20, start), bounded)
        model.forward(tokens(20, start), whole)
    assert bounded.nbytes() < whole.nbytes()
    assert bounded.truncate(298) == 298  # within the rewind: kept
    kept = bounded.truncate(250)  # past what the sliding layers kept: nothing, the caller prefills again
    assert kept == 0 and bounded.length == 0
    assert_same(model.forward(seq[:25], bounded), model.forward(seq[:25], model.new_cache(kv_bits=8)))

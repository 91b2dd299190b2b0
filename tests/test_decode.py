"""Decoding with the KV cache gives the logits of one full-sequence pass, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_variant, need_backend

import mlx_oss
from mlx_oss.bench_cache import fill_random
from reference import assert_logits_match

SHAPE = dict(num_hidden_layers=3, sliding_window=5, vocab_size=500, seed=7)


@pytest.fixture(scope="module", params=["numpy", "numpy-plain", "mlx"])
def model(request, synthetic_checkpoint):
    return load_variant(synthetic_checkpoint(**SHAPE), request.param)


@pytest.fixture(scope="module")
def mlx_model(synthetic_checkpoint):
    need_backend("mlx")
    return mlx_oss.load(synthetic_checkpoint(**SHAPE), backend="mlx")


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


def test_truncate_then_extend_past_the_spare_room(model):
    """A long prompt after a step back must grow buffers from the kept length (MLX once crashed here)."""
    first, then = tokens(300, 11), tokens(600, 10)
    cache = model.new_cache()
    model.forward(first, cache)
    assert cache.truncate(100) == 100
    out = model.forward(then, cache, last_only=True)
    np.testing.assert_allclose(out[0], model.logits(np.concatenate([first[:100], then]))[-1], rtol=1e-4, atol=1e-3)


def test_random_fill_extends_the_cache_for_benchmarks(model):
    cache = model.new_cache()
    model.forward(tokens(3), cache)
    fill_random(model, cache, 500)
    assert cache.length == 503
    logits = model.forward(tokens(2), cache)
    assert cache.length == 505 and logits.shape == (2, 500) and np.isfinite(logits).all()


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


@pytest.fixture
def bounded_cache(mlx_model):
    """An MLX cache whose sliding layers keep only 3 positions beyond their 5-token window (and trim in
    steps of 4), so a short test sequence already makes them drop keys."""
    from mlx_oss.mlx_backend.kv_cache import KVCache

    c = mlx_model.config
    return KVCache([c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)], 3, step=4)


def test_bounded_sliding_cache_decodes_like_the_full_pass(mlx_model, bounded_cache):
    seq = tokens(40, 11)
    full = mlx_model.logits(seq)
    stepped = np.concatenate(
        [mlx_model.forward(seq[:7], bounded_cache)] + [mlx_model.forward([t], bounded_cache) for t in seq[7:]]
    )
    np.testing.assert_allclose(stepped, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    sliding = [layer for layer in bounded_cache.layers if layer.window is not None]
    assert sliding and all(layer.start > 0 and layer.stored <= 5 - 1 + 3 + 4 for layer in sliding)
    full_layers = [layer for layer in bounded_cache.layers if layer.window is None]
    assert all(layer.start == 0 and layer.stored == 40 for layer in full_layers)


def test_bounded_cache_steps_back_within_its_rewind_and_restarts_beyond(mlx_model, bounded_cache):
    seq = tokens(30, 12)
    mlx_model.forward(seq, bounded_cache)
    earliest = max(layer.earliest_truncation() for layer in bounded_cache.layers)
    assert 0 < earliest < 30
    assert bounded_cache.truncate(earliest) == earliest
    tail = tokens(4, 13)
    np.testing.assert_allclose(
        mlx_model.forward(tail, bounded_cache),
        mlx_model.logits(np.concatenate([seq[:earliest], tail]))[earliest:],
        rtol=1e-4,
        atol=1e-4,
    )
    assert bounded_cache.truncate(earliest - 1) == 0  # keys it would need are gone: start over
    np.testing.assert_allclose(
        mlx_model.forward(seq[:9], bounded_cache), mlx_model.logits(seq[:9]), rtol=1e-4, atol=1e-4
    )


def test_numpy_prompt_keeps_blas_to_one_thread_and_shares_attention_heads(
    synthetic_checkpoint, monkeypatch, float32_activations
):
    """OpenBLAS's threads spin on after each call and take a core from the kernels or workers that run next: the
    NumPy model's forward runs BLAS on one thread, restores the caller's setting after, and a prompt's attention
    runs its kv heads in the workers' threads instead, giving the logits of one call over all heads."""
    import threading

    from threadpoolctl import threadpool_info

    from mlx_oss.cpu import layers
    from mlx_oss.cpu import model as numpy_model

    model = load_variant(synthetic_checkpoint(**SHAPE), "numpy")
    seen = []

    def attention(q, k, *args):
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        seen.append((threading.current_thread().name, q.shape[1], k.shape[0], blas))
        return layers.attention(q, k, *args)

    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    seq = tokens(12)
    split = model.forward(seq, model.new_cache())
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before
    monkeypatch.setattr(numpy_model, "attention", attention)
    model._workers.count = 2  # two shares even on a one-core machine
    np.testing.assert_allclose(model.forward(seq, model.new_cache()), split, rtol=1e-6, atol=1e-6)
    layers_count, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert len(seen) == 2 * layers_count and all(blas == [1] * len(blas) for *_, blas in seen), seen
    assert {name for name, *_ in seen} <= {t.name for t in threading.enumerate()} - {threading.current_thread().name}
    assert sum(heads for _, _, heads, _ in seen) == layers_count * kv_heads
    unsplit = layers.attention  # one call over all heads gives the same logits
    monkeypatch.setattr(model, "_attention_in_threads", lambda q, k, v, *rest: unsplit(q, k, v, *rest))
    np.testing.assert_allclose(model.forward(seq, model.new_cache()), split, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("requested", [1, 16, 256, 640, 1024, 5120, 10752, 20480])
def test_the_caches_rows_are_an_odd_number_of_cache_lines_apart(requested, half):
    """A decoding step reads the same positions of a kv head's 64 rows at once: rows an even number of 64-byte
    lines apart (4 KB, 2 KB) would share cache sets and evict each other. So also once the cache has grown."""
    from mlx_oss.cpu.kv_cache import KVCache

    cache = KVCache(num_layers=1, kv_heads=2, head_dim=64, capacity=requested, half=half)
    for grown in (False, True):
        if grown:
            rows = np.zeros((3 * requested + 5, 2, 64), np.float32)
            cache.append(0, rows, rows)
        for buffer in cache.buffers(0):
            assert buffer.shape[-1] >= requested
            assert buffer.strides[1] % 64 == 0 and (buffer.strides[1] // 64) % 2 == 1


@pytest.fixture(scope="module", params=["numpy", "numpy-plain"])
def half_cache_model(request, synthetic_checkpoint):
    """A NumPy variant with a float16 cache (`--kv-bits 16`)."""
    model = load_variant(synthetic_checkpoint(**SHAPE), request.param)
    model.kv_bits = 16
    return model


def test_the_float16_cache_decodes_like_a_full_pass(half_cache_model):
    """Token by token, and a prompt then decoding after a truncation, through the float16 cache: the logits of a
    full pass within the reference tests' tolerance (not the bookkeeping tests' 1e-4: float16 may round two keys a
    float32 rounding apart on the two routes to neighbouring values); the full pass rounds them the same way."""
    from mlx_oss.cpu.kv_cache import KVCache

    model = half_cache_model
    seq = tokens(23)
    full = model.logits(seq)
    cache = model.new_cache()
    assert isinstance(cache, KVCache) and cache.buffers(0)[0].dtype == np.uint16  # float16 bits, for the kernels
    stepped = np.concatenate([model.forward([t], cache) for t in seq])
    assert_logits_match(stepped, full)
    cache.truncate(9)
    assert_logits_match(model.forward(seq[9:], cache), full[9:])


def test_the_float16_cache_is_what_a_pass_without_a_cache_attends_over(half_cache_model):
    """The stored keys are the float32 ones rounded to float16: a full pass with float32 keys differs from the
    cached one by more than the bookkeeping tests' 1e-4 (the rounding is real), and agrees once its keys are
    rounded too (`as_stored`)."""
    model = half_cache_model
    seq = tokens(12, seed=5)
    cached = model.forward(seq, model.new_cache())
    rounded = model.logits(seq)
    np.testing.assert_allclose(cached, rounded, rtol=1e-5, atol=1e-5 * np.abs(rounded).max())
    model.kv_bits = None
    try:
        unrounded = model.logits(seq)
    finally:
        model.kv_bits = 16
    assert np.abs(unrounded - rounded).max() > 1e-6 * np.abs(rounded).max()
    assert_logits_match(rounded, unrounded, rel=1e-3)


def test_a_layer_beyond_float16s_range_stays_float32_and_exact():
    from mlx_oss.cpu.kv_cache import HALF_LIMIT, KVCache, as_stored

    rng = np.random.default_rng(0)
    cache = KVCache(num_layers=2, kv_heads=2, head_dim=16, half=True)
    small = rng.standard_normal((3, 2, 16)).astype(np.float32)
    for layer in range(2):
        cache.append(layer, small, small)
    cache.advance(3)
    large = small * np.float32(4 * HALF_LIMIT)  # would be infinities in float16
    cache.append(0, large, small)
    cache.append(1, small, small)
    cache.advance(3)
    keys, values, first = cache.held(0)
    assert first == 0 and keys.dtype == np.float32 and cache.buffers(0)[0].dtype == np.float32
    np.testing.assert_array_equal(keys[..., 3:], large.transpose(1, 2, 0))  # exact, not infinities
    np.testing.assert_array_equal(keys[..., :3], small.astype(np.float16).astype(np.float32).transpose(1, 2, 0))
    assert cache.buffers(1)[0].dtype == np.uint16  # the other layer stays float16
    assert np.isfinite(cache.held(1)[0]).all()
    k, v = as_stored(large, small)
    assert k is large and v is small  # a pass without a cache leaves such a layer unrounded too
    restored = KVCache.from_state(cache.state(), 2, 2, 16, half=True)
    for layer in range(2):
        for a, b in zip(restored.held(layer), cache.held(layer), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_float32_state_of_an_earlier_version_restores_as_a_fresh_prefill_would_store_it(half_cache_model):
    from mlx_oss.backend import CacheState

    model = half_cache_model
    seq, tail = tokens(10, seed=8), tokens(3, seed=9)
    model.kv_bits = None
    try:
        old = model.new_cache()  # float32, as every version before the float16 cache stored it
        model.forward(seq, old)
        state = old.state()
    finally:
        model.kv_bits = 16
    assert {a.dtype for a in state.arrays.values()} == {np.dtype(np.float32)}
    restored = model.restore_cache(CacheState("numpy-f32/1", state.length, state.arrays))
    fresh = model.new_cache()
    model.forward(seq, fresh)
    for a, b in zip(restored.held(0), fresh.held(0), strict=True):  # the first layer's keys: the same float32 ones
        np.testing.assert_array_equal(a, b)
    assert restored.buffers(0)[0].dtype == np.uint16
    assert_logits_match(model.forward(tail, restored), model.forward(tail, fresh))

"""Every backend's model and KV cache against the contract of `mlx_oss.backend`: `length`, `truncate` returning what
it kept (the caller then runs the rest again), `copy`, `nbytes`, and `state` with the model's `restore_cache`.

The MLX cache is also tried bounded (sliding layers keep 3 positions beyond their window), as a long conversation
makes it: that is where `truncate` keeps less than asked.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_variant

from mlx_oss.backend import Cache, CacheState, Model

SHAPE = dict(num_hidden_layers=3, sliding_window=5, vocab_size=500, seed=7)
BOUNDED_REWIND = 3


@pytest.fixture(scope="module")
def models(synthetic_checkpoint):
    loaded = {}

    def model(variant: str):
        if variant not in loaded:
            loaded[variant] = load_variant(synthetic_checkpoint(**SHAPE), variant)
        return loaded[variant]

    return model


@pytest.fixture(scope="module", params=["numpy", "numpy-plain", "mlx", "mlx-bounded"])
def subject(request, models):
    """(model, a function making an empty cache, how far back its `truncate` always keeps what is asked)."""
    if request.param != "mlx-bounded":
        model = models(request.param)
        rewind = None
        if model.backend == "mlx":
            from mlx_oss.mlx_backend.kv_cache import REWIND as rewind
        return model, model.new_cache, rewind
    model = models("mlx")
    from mlx_oss.mlx_backend.kv_cache import KVCache

    c = model.config
    windows = [c.sliding_window if c.is_sliding(i) else None for i in range(c.num_hidden_layers)]
    return model, lambda: KVCache(windows, BOUNDED_REWIND, step=4), BOUNDED_REWIND


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], n)


def assert_continues_like_a_fresh_pass(model, cache, before: np.ndarray, tail: np.ndarray) -> None:
    """`cache` holds the positions of `before`; running `tail` on it gives the logits of a fresh pass."""
    assert cache.length == len(before)
    fresh = model.logits(np.concatenate([before, tail]))[len(before) :]
    np.testing.assert_allclose(model.forward(tail, cache), fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())


def test_model_and_cache_implement_the_contract(subject):
    model, new_cache, _ = subject
    cache = new_cache()
    assert isinstance(model, Model) and isinstance(cache, Cache)
    assert cache.length == 0
    model.forward(tokens(4, 1), cache)
    model.forward(tokens(3, 2), cache, last_only=True)
    assert cache.length == 7


def test_truncate_keeps_at_most_what_is_asked_and_the_caller_runs_the_rest(subject):
    model, new_cache, rewind = subject
    seq, tail = tokens(30, 3), tokens(3, 4)
    kept_less = False
    for length in (29, 27, 20, 12, 1, 0):
        cache = new_cache()
        model.forward(seq, cache)
        kept = cache.truncate(length)
        assert 0 <= kept <= length and cache.length == kept
        if rewind is None or length >= len(seq) - rewind:
            assert kept == length
        kept_less |= kept < length
        assert_continues_like_a_fresh_pass(model, cache, seq[:kept], np.concatenate([seq[kept:length], tail]))
    assert kept_less == (rewind == BOUNDED_REWIND)  # only the bounded cache, beyond its rewind


def test_truncate_outside_the_cache_is_refused(subject):
    model, new_cache, _ = subject
    cache = new_cache()
    model.forward(tokens(5, 5), cache)
    for length in (-1, 6):
        with pytest.raises(ValueError, match="cannot truncate"):
            cache.truncate(length)
    assert cache.length == 5


def test_rejected_drafted_tokens_are_stepped_back_over(subject):
    """Speculative decoding: run drafted tokens, go back over the rejected ones, run the right token."""
    model, new_cache, _ = subject
    seq = tokens(24, 6)
    cache = new_cache()
    model.forward(seq[:8], cache)
    for at in range(8, 20):
        model.forward(np.concatenate([seq[at : at + 1], tokens(3, at)]), cache)  # one accepted, three drafted
        assert cache.truncate(at + 1) == at + 1  # within every cache's rewind
    assert_continues_like_a_fresh_pass(model, cache, seq[:20], seq[20:])


def test_a_copy_is_independent_and_continues_like_the_original(subject):
    model, new_cache, _ = subject
    prefix, a, b = tokens(30, 7), tokens(4, 8), tokens(6, 9)
    original = new_cache()
    model.forward(prefix, original)
    copied = original.copy()
    assert copied.length == original.length and 0 < copied.nbytes() <= original.nbytes()
    same = original.copy()
    np.testing.assert_array_equal(model.forward(a, same), model.forward(a, original.copy()))

    assert_continues_like_a_fresh_pass(model, original, prefix, a)  # the original extended, then the copy
    assert_continues_like_a_fresh_pass(model, copied, prefix, b)
    kept = copied.truncate(28)
    assert_continues_like_a_fresh_pass(model, copied, prefix[:kept], np.concatenate([prefix[kept:28], a]))
    assert_continues_like_a_fresh_pass(model, original, np.concatenate([prefix, a]), b)  # untouched by the copy


def test_an_empty_cache_copies(subject):
    model, new_cache, _ = subject
    copied = new_cache().copy()
    assert copied.length == 0
    assert_continues_like_a_fresh_pass(model, copied, tokens(0, 0), tokens(6, 10))


def test_a_restored_state_continues_like_the_original(subject):
    model, new_cache, _ = subject
    prefix, a, b = tokens(30, 11), tokens(4, 12), tokens(5, 13)
    original = new_cache()
    model.forward(prefix, original)
    state = original.state()
    saved = CacheState(state.kind, state.length, {n: np.array(x) for n, x in state.arrays.items()}, dict(state.info))
    model.forward(a, original)  # the state was copied before the cache changed, as a writer does
    restored = model.restore_cache(saved)
    assert isinstance(restored, Cache) and restored.length == 30
    assert restored.nbytes() > 0 and saved.nbytes() > 0
    assert_continues_like_a_fresh_pass(model, restored, prefix, b)
    again = model.restore_cache(saved)
    kept = again.truncate(27)
    assert_continues_like_a_fresh_pass(model, again, prefix[:kept], np.concatenate([prefix[kept:27], a]))


def test_an_empty_cache_state_restores(subject):
    model, new_cache, _ = subject
    restored = model.restore_cache(new_cache().state())
    assert restored.length == 0
    assert_continues_like_a_fresh_pass(model, restored, tokens(0, 0), tokens(5, 14))


def test_a_state_that_does_not_fit_the_model_is_refused(subject):
    model, new_cache, _ = subject
    cache = new_cache()
    model.forward(tokens(10, 15), cache)
    state = cache.state()
    name = sorted(state.arrays)[0]
    other = {n: x for n, x in state.arrays.items() if n != name}
    wrong = [
        CacheState("another-kind/1", state.length, state.arrays, state.info),
        CacheState(state.kind, state.length, other, state.info),
        CacheState(state.kind, state.length, {**state.arrays, name: state.arrays[name][..., :2]}, state.info),
        CacheState(state.kind, state.length + 1, state.arrays, state.info),
        CacheState(state.kind, state.length, {**state.arrays, "k.99": state.arrays[name]}, state.info),
        CacheState(state.kind, state.length, {**state.arrays, name: state.arrays[name].astype(np.float64)}, state.info),
    ]
    for bad in wrong:
        with pytest.raises(ValueError):
            model.restore_cache(bad)

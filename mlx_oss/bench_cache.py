"""Random keys and values appended to a model's KV cache, so the benchmark can decode at a long context.

A prefill of thousands of tokens would take minutes on the NumPy backend, and a decoding step costs the same
whatever the cached keys are. Kept out of the caches themselves: production code never fills one this way.
"""

from __future__ import annotations

import numpy as np


def fill_random(model, cache, count: int, seed: int = 0) -> None:
    """Append `count` positions of random keys and values to every layer of `cache` (one of `model`'s), as if
    that many tokens had been read."""
    c = model.config
    if model.backend == "mlx":
        _fill_mlx(cache, count, c.num_key_value_heads, c.head_dim, seed)
    else:
        _fill_numpy(cache, count, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, seed)


FILL_CHUNK = 16384  # positions appended at once: the random floats (and a quantized cache's rounding) stay small


def _fill_numpy(cache, count: int, layers: int, kv_heads: int, head_dim: int, seed: int) -> None:
    """In chunks, so that the bench's peak memory is the cache's, not a whole layer of random floats beside it."""
    rng = np.random.default_rng(seed)
    for start in range(0, count, FILL_CHUNK):
        shape = (min(FILL_CHUNK, count - start), kv_heads, head_dim)
        for layer in range(layers):
            cache.append(layer, rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
        cache.advance(shape[0])


def _fill_mlx(cache, count: int, kv_heads: int, head_dim: int, seed: int) -> None:
    import mlx.core as mx

    key = mx.random.key(seed)
    shape = (1, kv_heads, count, head_dim)
    for layer in cache.layers:
        key, k_key, v_key = mx.random.split(key, 3)
        layer.update(mx.random.normal(shape, key=k_key), mx.random.normal(shape, key=v_key), cache.length)
        mx.eval(*cache.arrays())  # the float or the quantized cache's buffers
    cache.advance(count)

"""Keys and values of the tokens seen so far, one growing buffer per layer."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Per-layer key/value buffers `[capacity, kv_heads, head_dim]`, grown by doubling.

    Every layer keeps all positions, sliding ones included, so the cache can be cut back to any
    common prefix (`truncate`) and extended again with the same results as a fresh prefill.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int = 256):
        self.length = 0
        self._k = [np.empty((capacity, kv_heads, head_dim), np.float32) for _ in range(num_layers)]
        self._v = [np.empty((capacity, kv_heads, head_dim), np.float32) for _ in range(num_layers)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store new keys/values at positions `length ..` and return all keys/values so far."""
        end = self.length + k.shape[0]
        if end > self._k[layer].shape[0]:
            capacity = max(end, 2 * self._k[layer].shape[0])
            for buffers in (self._k, self._v):
                grown = np.empty((capacity, *buffers[layer].shape[1:]), np.float32)
                grown[: self.length] = buffers[layer][: self.length]
                buffers[layer] = grown
        self._k[layer][self.length : end] = k
        self._v[layer][self.length : end] = v
        return self._k[layer][:end], self._v[layer][:end]

    def advance(self, count: int) -> None:
        """Mark `count` appended positions as part of the cache (after every layer stored them)."""
        self.length += count

    def truncate(self, length: int) -> int:
        """Forget every position from `length` on; returns `length` (this cache can always go back)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        return length

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._k + self._v)

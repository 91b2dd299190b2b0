"""Keys and values of the tokens seen so far, one growing buffer per layer: the NumPy backend's `Cache`.

Its `truncate` always keeps what is asked (the contract allows less): every layer keeps every position.
"""

from __future__ import annotations

import numpy as np

from mlx_oss.backend import Cache, CacheState

KIND = "numpy-f32/1"  # the state's layout: per layer `k.i` and `v.i`, float32 `[kv_heads, head_dim, length]`
COPY_ROOM = 256  # positions a copy can grow by before its buffers are grown (a copy holds no doubled capacity)


class KVCache(Cache):
    """Per-layer keys and values, each `[kv_heads, head_dim, capacity]`, grown by doubling.

    Stored transposed (positions last) so that a query's scores, and its weighted sum of values, run along
    positions, contiguously.

    Every layer keeps all positions, sliding ones included, so the cache can be cut back to any
    common prefix (`truncate`) and extended again with the same results as a fresh prefill.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int = 256):
        self.length = 0
        self._k = [_buffer((kv_heads, head_dim), capacity) for _ in range(num_layers)]
        self._v = [_buffer((kv_heads, head_dim), capacity) for _ in range(num_layers)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store new keys/values `[T, kv_heads, head_dim]` at positions `length ..`; return all so far,
        transposed: `[kv_heads, head_dim, positions]`."""
        end = self.length + k.shape[0]
        if end > self._k[layer].shape[-1]:
            capacity = max(end + end // 4, 2 * self._k[layer].shape[-1])  # room to decode on without a copy
            for buffers in (self._k, self._v):
                grown = _buffer(buffers[layer].shape[:2], capacity)
                grown[..., : self.length] = buffers[layer][..., : self.length]
                buffers[layer] = grown
        self._k[layer][..., self.length : end] = k.transpose(1, 2, 0)
        self._v[layer][..., self.length : end] = v.transpose(1, 2, 0)
        return self._k[layer][..., :end], self._v[layer][..., :end]

    def buffers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's whole key and value buffers (C-contiguous, positions up to their capacity)."""
        return self._k[layer], self._v[layer]

    def advance(self, count: int) -> None:
        """Mark `count` appended positions as part of the cache (after every layer stored them)."""
        self.length += count

    def truncate(self, length: int) -> int:
        """Forget every position from `length` on; returns `length` (this cache can always go back)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        return length

    def copy(self) -> KVCache:
        """An independent cache of the same positions, in buffers of `COPY_ROOM` positions beyond them (at most the
        original's capacity): a copy kept in a prompt cache counts only what it holds, and one extended by a few
        drafted tokens does not regrow."""
        new = object.__new__(KVCache)
        new.length = self.length
        new._k, new._v = ([_copy_held(b, self.length) for b in buffers] for buffers in (self._k, self._v))
        return new

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._k + self._v)

    def state(self) -> CacheState:
        arrays = {}
        for i, (k, v) in enumerate(zip(self._k, self._v, strict=True)):
            arrays[f"k.{i}"], arrays[f"v.{i}"] = k[..., : self.length], v[..., : self.length]
        return CacheState(KIND, self.length, arrays)

    @classmethod
    def from_state(cls, state: CacheState, num_layers: int, kv_heads: int, head_dim: int) -> KVCache:
        """The cache `state` describes, checked against the model's shape (ValueError when it does not fit)."""
        if state.kind != KIND:
            raise ValueError(f"a cache state of kind {state.kind!r}, not {KIND!r}")
        names = {f"{p}.{i}" for i in range(num_layers) for p in "kv"}
        if set(state.arrays) != names:
            raise ValueError(f"a cache state's arrays are not those of {num_layers} layers")
        shape = (kv_heads, head_dim, state.length)
        new = cls(num_layers, kv_heads, head_dim, capacity=state.length + COPY_ROOM)
        for name, array in state.arrays.items():
            if array.shape != shape or array.dtype != np.float32:
                raise ValueError(f"cache state array {name}: {array.dtype} {array.shape}, expected float32 {shape}")
            buffers = new._k if name[0] == "k" else new._v
            buffers[int(name[2:])][..., : state.length] = array
        new.length = state.length
        return new


def _buffer(shape: tuple[int, int], capacity: int) -> np.ndarray:
    """A `[*shape, capacity]` float32 buffer whose rows are an odd number of 64-byte cache lines apart.

    A decoding step's scores read the same positions of all of a kv head's `head_dim` rows at once. Rows a large
    power of two of lines apart share the core's cache sets (4 KB apart, all of them one set; 2 KB apart, two) and
    evict each other; an odd number of lines apart puts up to 64 rows of a head in as many different sets.
    """
    lines = -(-capacity // 16)
    return np.empty((*shape, 16 * (lines + 1 - lines % 2)), np.float32)


def _copy_held(buffer: np.ndarray, length: int) -> np.ndarray:
    copied = _buffer(buffer.shape[:2], min(buffer.shape[-1], length + COPY_ROOM))
    copied[..., :length] = buffer[..., :length]
    return copied

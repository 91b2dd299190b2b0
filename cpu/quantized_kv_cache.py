"""Keys and values stored as int8 with one float32 scale per position and head: the NumPy backend's `Cache` at
`--kv-bits 8`, a quarter of the float cache plus its scales (68 bytes a head and position instead of 256 at
head_dim 64).

Symmetric per-block quantization: each position's head vector of `head_dim` values is scaled by its largest
magnitude over 127 and rounded. Attention runs on the widened keys and values of one layer at a time (`append`
returns them and `buffers` hands the same to the decode kernels), so float copies never outlive their layer.
Like the float cache, every layer keeps every position, so `truncate` always keeps what is asked.
"""

from __future__ import annotations

import numpy as np

from mlx_oss.backend import Cache

LEVELS = 127  # int8's symmetric range


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`x [KV, D, T]` as int8 values `[KV, D, T]` and float32 scales `[KV, T]` (per head and position)."""
    scales = np.abs(x).max(axis=1) / np.float32(LEVELS)
    safe = np.where(scales > 0, scales, np.float32(1))
    values = np.rint(x / safe[:, None, :]).astype(np.int8)
    return values, scales.astype(np.float32)


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 `[KV, D, T]` (C-contiguous) from int8 values and their scales."""
    return values.astype(np.float32) * scales[:, None, :]


class QuantizedKVCache(Cache):
    """Per-layer int8 keys and values `[kv_heads, head_dim, capacity]` and scales `[kv_heads, capacity]`."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, bits: int = 8, capacity: int = 256):
        if bits != 8:
            raise ValueError(f"the NumPy backend quantizes its KV cache to 8 bits, not {bits}")
        self.bits = bits
        self.length = 0
        self._values = [
            [np.empty((kv_heads, head_dim, capacity), np.int8) for _ in range(2)] for _ in range(num_layers)
        ]
        self._scales = [[np.empty((kv_heads, capacity), np.float32) for _ in range(2)] for _ in range(num_layers)]
        self._widened: tuple[int, np.ndarray, np.ndarray] | None = None  # the last appended layer's float k, v

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store new keys/values `[T, kv_heads, head_dim]` at positions `length ..`; return all so far, widened to
        float32 and transposed: `[kv_heads, head_dim, positions]`."""
        end = self.length + k.shape[0]
        values, scales = self._values[layer], self._scales[layer]
        if end > values[0].shape[-1]:
            capacity = max(end + end // 4, 2 * values[0].shape[-1])
            for i in range(2):
                grown = np.empty((*values[i].shape[:2], capacity), np.int8)
                grown[..., : self.length] = values[i][..., : self.length]
                values[i] = grown
                grown_scales = np.empty((scales[i].shape[0], capacity), np.float32)
                grown_scales[:, : self.length] = scales[i][:, : self.length]
                scales[i] = grown_scales
        for i, x in enumerate((k, v)):
            values[i][..., self.length : end], scales[i][:, self.length : end] = quantize(x.transpose(1, 2, 0))
        widened = [dequantize(values[i][..., :end], scales[i][:, :end]) for i in range(2)]
        self._widened = (layer, *widened)
        return widened[0], widened[1]

    def buffers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's keys and values widened by the `append` just before (C-contiguous, the positions held)."""
        if self._widened is None or self._widened[0] != layer:
            raise RuntimeError(f"buffers({layer}) must follow append({layer})")
        return self._widened[1], self._widened[2]

    def advance(self, count: int) -> None:
        self.length += count
        self._widened = None

    def truncate(self, length: int) -> int:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        self._widened = None
        return length

    def copy(self) -> QuantizedKVCache:
        new = object.__new__(QuantizedKVCache)
        new.bits, new.length, new._widened = self.bits, self.length, None
        new._values = [[_copy_held(b, self.length) for b in pair] for pair in self._values]
        new._scales = [[_copy_held(b, self.length) for b in pair] for pair in self._scales]
        return new

    def nbytes(self) -> int:
        return sum(b.nbytes for pairs in (self._values, self._scales) for pair in pairs for b in pair)


def _copy_held(buffer: np.ndarray, length: int) -> np.ndarray:
    copied = np.empty_like(buffer)
    copied[..., :length] = buffer[..., :length]
    return copied

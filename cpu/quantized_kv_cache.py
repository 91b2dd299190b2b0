"""Keys and values stored as int8 with one float32 scale per position and head: the NumPy backend's `Cache` at
`--kv-bits 8`, a quarter of the float cache plus its scales (68 bytes a head and position instead of 256 at
head_dim 64).

Symmetric per-block quantization: each position's head vector of `head_dim` values is scaled by its largest
magnitude over 127 and rounded. Attention runs on the widened keys and values of one layer at a time (`append`
returns them and `buffers` hands the same to the decode kernels), so float copies never outlive their layer.

Sliding layers keep only their window plus `REWIND` positions, as the MLX cache does (memory stays bounded on long
conversations): `truncate` back further than that keeps nothing, and the caller prefills again. `first_held`
tells attention which position a layer's widened keys start at.
"""

from __future__ import annotations

import numpy as np

from mlx_oss.backend import Cache, bounded_truncation, earliest_truncation, sliding_drop

LEVELS = 127  # int8's symmetric range
REWIND = 2048  # positions a sliding layer keeps beyond its window, so truncation can step back that far
STEP = 256  # positions a sliding layer may hold past that before the oldest are dropped (not every token)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`x [KV, D, T]` as int8 values `[KV, D, T]` and float32 scales `[KV, T]` (per head and position)."""
    scales = np.abs(x).max(axis=1) / np.float32(LEVELS)
    safe = np.where(scales > 0, scales, np.float32(1))
    values = np.rint(x / safe[:, None, :]).astype(np.int8)
    return values, scales.astype(np.float32)


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 `[KV, D, T]` (C-contiguous) from int8 values and their scales."""
    widened = values.astype(np.float32)
    widened *= scales[:, None, :]  # in place: a long layer's float copy is the largest buffer of a step
    return widened


class QuantizedLayer:
    """One layer's int8 keys and values `[2][KV, D, capacity]` and scales `[2][KV, capacity]` for positions
    `start ..`, grown by doubling."""

    def __init__(self, kv_heads: int, head_dim: int, window: int | None, rewind: int, step: int, capacity: int):
        self.window, self.rewind, self.step = window, rewind, step
        self.start = 0
        self.values = [np.empty((kv_heads, head_dim, capacity), np.int8) for _ in range(2)]
        self.scales = [np.empty((kv_heads, capacity), np.float32) for _ in range(2)]

    def append(self, length: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Store k, v `[T, KV, D]` at positions `length ..`; the widened keys and values of positions `first ..`
        up to the new end, and `first`."""
        held, end = length - self.start, length - self.start + k.shape[0]
        if end > self.values[0].shape[-1]:
            capacity = max(end + end // 4, 2 * self.values[0].shape[-1])  # room to decode on without a copy
            for parts in (self.values, self.scales):
                for i, part in enumerate(parts):
                    grown = np.empty((*part.shape[:-1], capacity), part.dtype)
                    grown[..., :held] = part[..., :held]
                    parts[i] = grown
        for i, x in enumerate((k, v)):
            self.values[i][..., held:end], self.scales[i][:, held:end] = quantize(x.transpose(1, 2, 0))
        first = self.start
        keys, values = (dequantize(self.values[i][..., :end], self.scales[i][:, :end]) for i in range(2))
        self._trim(end)
        return keys, values, first

    def _trim(self, held: int) -> None:
        """Drop a sliding layer's oldest positions once it holds `step` more than its window and rewind need."""
        drop = sliding_drop(held, self.window, self.rewind, self.step)
        if drop:
            keep = held - drop
            for parts in (self.values, self.scales):
                for part in parts:
                    part[..., :keep] = part[..., drop:held].copy()
            self.start += drop

    def earliest_truncation(self) -> int:
        """The smallest cache length this layer can go back to (besides 0) and still attend correctly."""
        return earliest_truncation(self.start, self.window)

    def copy(self, length: int) -> QuantizedLayer:
        new = object.__new__(QuantizedLayer)
        new.window, new.rewind, new.step, new.start = self.window, self.rewind, self.step, self.start
        held = length - self.start
        new.values, new.scales = ([_copy_held(p, held) for p in parts] for parts in (self.values, self.scales))
        return new

    def nbytes(self) -> int:
        return sum(p.nbytes for parts in (self.values, self.scales) for p in parts)


class QuantizedKVCache(Cache):
    """The quantized layers and the number of positions they hold."""

    def __init__(
        self,
        windows: list[int | None],
        kv_heads: int,
        head_dim: int,
        bits: int = 8,
        rewind: int = REWIND,
        step: int = STEP,
        capacity: int = 256,
    ):
        if bits != 8:
            raise ValueError(f"the NumPy backend quantizes its KV cache to 8 bits, not {bits}")
        self.bits = bits
        self.length = 0
        self.layers = [QuantizedLayer(kv_heads, head_dim, w, rewind, step, capacity) for w in windows]
        self._widened: tuple[int, np.ndarray, np.ndarray, int] | None = None  # the last appended layer's

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store new keys/values `[T, kv_heads, head_dim]` at positions `length ..`, and widen the layer's keys and
        values to float32 for `held` and `buffers`."""
        keys, values, first = self.layers[layer].append(self.length, k, v)
        self._widened = (layer, keys, values, first)

    def held(self, layer: int, first: int = 0, widen=None) -> tuple[np.ndarray, np.ndarray, int]:
        """The keys and values `append` just widened, `[kv_heads, head_dim, positions]`, and the position of the
        first (`first_held`; `first` is where attention will start reading, at or after it). `widen` is
        `KVCache.held`'s, for float16 buffers: this cache holds none."""
        _, keys, values, held_from = self._last(layer)
        return keys, values, held_from

    def first_held(self, layer: int) -> int:
        """The position of the first key `append` just widened for `layer`."""
        return self._last(layer)[3]

    def buffers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's keys and values widened by the `append` just before (C-contiguous)."""
        widened = self._last(layer)
        return widened[1], widened[2]

    def _last(self, layer: int):
        if self._widened is None or self._widened[0] != layer:
            raise RuntimeError(f"the widened keys of layer {layer} are asked for before it appended any")
        return self._widened

    def advance(self, count: int) -> None:
        self.length += count
        self._widened = None

    def truncate(self, length: int) -> int:
        """Forget every position from `length` on; returns the length kept (0 where a sliding layer has already
        dropped keys the shorter cache would need)."""
        length = bounded_truncation(self.length, length, (layer.earliest_truncation() for layer in self.layers))
        if length == 0:
            for layer in self.layers:
                layer.start = 0
        self.length = length
        self._widened = None
        return length

    def copy(self) -> QuantizedKVCache:
        new = object.__new__(QuantizedKVCache)
        new.bits, new.length, new._widened = self.bits, self.length, None
        new.layers = [layer.copy(self.length) for layer in self.layers]
        return new

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def state(self):
        """Not offered: the prompt cache keeps 8-bit caches in memory only (`Engine` saves none to disk)."""
        raise NotImplementedError("an 8-bit KV cache is not saved to disk")


def _copy_held(buffer: np.ndarray, held: int) -> np.ndarray:
    copied = np.empty_like(buffer)
    copied[..., :held] = buffer[..., :held]
    return copied

"""Keys and values stored as int8 with one float32 scale per position and head: the MLX backend's `Cache` at
`--kv-bits 8`, the same layout of positions as the float cache (`kv_cache`): full-attention layers keep every
position; sliding layers their window plus `REWIND` positions, so memory stays bounded on long conversations.

Each position's head vector is scaled by its largest magnitude over 127 and rounded (the NumPy backend's scheme,
`cpu.quantized_kv_cache`), so both backends' quantized caches agree. Attention reads the widened keys and values of
the positions it sees; they are temporaries of one layer's step.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_oss.backend import Cache, bounded_truncation, earliest_truncation, sliding_drop

from .kv_cache import REWIND, STEP, attended_from

LEVELS = 127


def quantize(x: mx.array) -> tuple[mx.array, mx.array]:
    """`x [1, KV, T, D]` as int8 values and float32 scales `[1, KV, T, 1]`."""
    scales = mx.max(mx.abs(x), axis=-1, keepdims=True) / LEVELS
    safe = mx.where(scales > 0, scales, 1.0)
    return mx.round(x / safe).astype(mx.int8), scales.astype(mx.float32)


def dequantize(values: mx.array, scales: mx.array) -> mx.array:
    return values.astype(mx.float32) * scales


class QuantizedLayerCache:
    """One layer's int8 keys and values `[1, KV, positions, D]` and scales `[1, KV, positions, 1]`, for positions
    `start .. start + stored - 1`."""

    def __init__(self, window: int | None, rewind: int = REWIND, step: int = STEP):
        self.window, self.rewind, self.step = window, rewind, step
        self.start = 0
        self.stored = 0
        self.parts: list[mx.array] | None = None  # key values, key scales, value values, value scales

    def update(self, k: mx.array, v: mx.array, length: int) -> tuple[mx.array, mx.array, int]:
        """Store k, v (`[1, KV, T, D]`) at positions `length ..`; return the widened keys/values to attend to and
        the position of the first of them."""
        self.stored = length - self.start
        T = k.shape[2]
        needed = self.stored + T
        new = [*quantize(k), *quantize(v)]
        if self.parts is None or needed > self.parts[0].shape[2]:
            capacity = (needed + self.step - 1) // self.step * self.step
            kept = 0 if self.parts is None else self.stored
            grown = []
            for i, part in enumerate(new):
                extra = mx.zeros((1, part.shape[1], capacity - kept, part.shape[3]), part.dtype)
                grown.append(extra if self.parts is None else mx.concatenate([self.parts[i][:, :, :kept], extra], 2))
            self.parts = grown
        for part, values in zip(self.parts, new, strict=True):
            part[:, :, self.stored : needed] = values
        self.stored = needed
        first = attended_from(self.start, length, self.window, T)
        lo = first - self.start
        keys = dequantize(self.parts[0][:, :, lo:needed], self.parts[1][:, :, lo:needed])
        values = dequantize(self.parts[2][:, :, lo:needed], self.parts[3][:, :, lo:needed])
        self._trim()
        return keys, values, first

    def _trim(self) -> None:
        drop = sliding_drop(self.stored, self.window, self.rewind, self.step)
        if drop:
            self.parts = [part[:, :, drop:] for part in self.parts]
            self.start += drop
            self.stored -= drop

    def earliest_truncation(self) -> int:
        return earliest_truncation(self.start, self.window)

    def reset(self) -> None:
        self.start = 0
        self.stored = 0

    def copy(self) -> QuantizedLayerCache:
        new = QuantizedLayerCache(self.window, self.rewind, self.step)
        new.start, new.stored = self.start, self.stored
        if self.parts is not None:
            new.parts = [part[:] for part in self.parts]  # MLX arrays are values: a write gives the writer its own
        return new


class QuantizedKVCache(Cache):
    """The quantized caches of all layers and the number of positions they hold (the float `KVCache`'s rules)."""

    def __init__(self, windows: list[int | None], bits: int = 8, rewind: int = REWIND, step: int = STEP):
        if bits != 8:
            raise ValueError(f"the MLX backend quantizes its KV cache to 8 bits, not {bits}")
        self.bits = bits
        self.layers = [QuantizedLayerCache(w, rewind, step) for w in windows]
        self.length = 0

    def advance(self, count: int) -> None:
        self.length += count

    def truncate(self, length: int) -> int:
        length = bounded_truncation(self.length, length, (layer.earliest_truncation() for layer in self.layers))
        if length == 0:
            for layer in self.layers:
                layer.reset()
        self.length = length
        return length

    def copy(self) -> QuantizedKVCache:
        new = object.__new__(QuantizedKVCache)
        new.bits, new.length = self.bits, self.length
        new.layers = [layer.copy() for layer in self.layers]
        return new

    def arrays(self) -> list[mx.array]:
        return [part for layer in self.layers if layer.parts is not None for part in layer.parts]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def state(self):
        """Not offered: the prompt cache keeps 8-bit caches in memory only (`Engine` saves none to disk)."""
        raise NotImplementedError("an 8-bit KV cache is not saved to disk")

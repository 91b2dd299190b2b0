"""Keys and values of the tokens seen so far, in MLX buffers that grow in steps: the MLX backend's `Cache`.

Full-attention layers keep every position. Sliding layers need only the last `window - 1` keys to go on, so
their buffers are cut back to that plus `rewind` positions: memory stays bounded on long conversations while
the engine can still step back over a turn's end to reuse the prefix it shares with the next prompt. This is the
contract's `truncate` keeping less than asked: going back at most `rewind` positions always keeps what is asked,
further may keep nothing.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_oss.backend import Cache, CacheState, bounded_truncation, earliest_truncation, sliding_drop

# The state's layout: per layer that holds positions `k.i` and `v.i`, `[1, kv_heads, held, head_dim]` (bfloat16 as
# its uint16 bits, NumPy having no bfloat16), the first position held in info `start.i`, the dtype in `dtype`.
KIND = "mlx/1"

STEP = 256  # positions added to a buffer when it is full
REWIND = 2048  # positions a sliding layer keeps beyond its window, so truncation can step back that far


def attended_from(start: int, length: int, window: int | None, tokens: int) -> int:
    """The first position `tokens` new queries after `length` attend to, of a layer holding positions from `start`:
    a decode step of a sliding layer sees only the last `window` keys; a prompt's queries get them all (the mask
    picks)."""
    if window is not None and tokens == 1:
        return max(start, length + 1 - window)
    return start


class LayerCache:
    """One layer's keys and values `[1, kv_heads, positions, head_dim]` for positions `start .. length - 1`."""

    def __init__(self, window: int | None, rewind: int = REWIND, step: int = STEP):
        self.window = window
        self.rewind = rewind
        self.step = step
        self.start = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.stored = 0  # positions held, from `start`

    def update(self, k: mx.array, v: mx.array, length: int) -> tuple[mx.array, mx.array, int]:
        """Store k, v (`[1, KV, T, D]`) at positions `length ..`; return the keys/values to attend to and the
        position of the first of them."""
        self.stored = length - self.start
        T = k.shape[2]
        needed = self.stored + T
        if self.keys is None or needed > self.keys.shape[2]:
            capacity = (needed + self.step - 1) // self.step * self.step
            grow = (1, k.shape[1], capacity - (0 if self.keys is None else self.stored), k.shape[3])
            extra_k, extra_v = mx.zeros(grow, k.dtype), mx.zeros(grow, v.dtype)
            if self.keys is None:
                self.keys, self.values = extra_k, extra_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.stored, :], extra_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.stored, :], extra_v], axis=2)
        self.keys[..., self.stored : needed, :] = k
        self.values[..., self.stored : needed, :] = v
        self.stored = needed
        first = attended_from(self.start, length, self.window, T)
        keys = self.keys[..., first - self.start : needed, :]
        values = self.values[..., first - self.start : needed, :]
        self._trim()
        return keys, values, first

    def _trim(self) -> None:
        drop = sliding_drop(self.stored, self.window, self.rewind, self.step)
        if drop:
            self.keys = self.keys[..., drop:, :]
            self.values = self.values[..., drop:, :]
            self.start += drop
            self.stored -= drop

    def earliest_truncation(self) -> int:
        """The smallest cache length this layer can go back to (besides 0) and still attend correctly."""
        return earliest_truncation(self.start, self.window)

    def reset(self) -> None:
        self.start = 0
        self.stored = 0

    def copy(self) -> LayerCache:
        """An independent copy. Its arrays are views of the same data (MLX arrays are values, so writing into
        one, as `update` does, never changes the other): MLX gives the one written first a buffer of its own, so a
        copy costs memory only once either is extended."""
        new = LayerCache(self.window, self.rewind, self.step)
        new.start, new.stored = self.start, self.stored
        if self.keys is not None:
            new.keys, new.values = self.keys[:], self.values[:]
        return new


class KVCache(Cache):
    """The caches of all layers and the number of positions they hold."""

    def __init__(self, windows: list[int | None], rewind: int = REWIND, step: int = STEP):
        self.layers = [LayerCache(w, rewind, step) for w in windows]
        self.length = 0

    def advance(self, count: int) -> None:
        self.length += count

    def truncate(self, length: int) -> int:
        """Forget every position from `length` on; returns the length kept.

        A sliding layer that has already dropped keys the shorter cache would need cannot step back that far:
        then everything is forgotten and 0 is returned, so the caller prefills from the start.
        """
        length = bounded_truncation(self.length, length, (layer.earliest_truncation() for layer in self.layers))
        if length == 0:
            for layer in self.layers:
                layer.reset()
        self.length = length
        return length

    def copy(self) -> KVCache:
        new = object.__new__(KVCache)
        new.layers = [layer.copy() for layer in self.layers]
        new.length = self.length
        return new

    def arrays(self) -> list[mx.array]:
        return [a for layer in self.layers if layer.keys is not None for a in (layer.keys, layer.values)]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def state(self) -> CacheState:
        arrays, info, dtype = {}, {}, None
        for i, layer in enumerate(self.layers):
            held = self.length - layer.start
            info[f"start.{i}"] = str(layer.start)
            if layer.keys is None or held <= 0:
                continue
            dtype = layer.keys.dtype
            for name, array in ((f"k.{i}", layer.keys), (f"v.{i}", layer.values)):
                array = array[..., :held, :]
                arrays[name] = np.array(array.view(mx.uint16) if dtype == mx.bfloat16 else array)
        if dtype is not None and dtype not in (mx.bfloat16, mx.float32):
            raise ValueError(f"cannot save a cache of {dtype}")
        info["dtype"] = "bfloat16" if dtype is not None and dtype == mx.bfloat16 else "float32"
        return CacheState(KIND, self.length, arrays, info)

    @classmethod
    def from_state(
        cls, state: CacheState, windows: list[int | None], kv_heads: int, head_dim: int, rewind: int = REWIND
    ) -> KVCache:
        """The cache `state` describes, checked against the model's layers (ValueError when it does not fit)."""
        if state.kind != KIND:
            raise ValueError(f"a cache state of kind {state.kind!r}, not {KIND!r}")
        stored_dtype, dtype = {"bfloat16": (np.uint16, mx.bfloat16), "float32": (np.float32, mx.float32)}.get(
            state.info.get("dtype"), (None, None)
        )
        if dtype is None:
            raise ValueError(f"a cache state of dtype {state.info.get('dtype')!r}")
        new = cls(windows, rewind)
        expected = set()
        for i, layer in enumerate(new.layers):
            try:
                start = int(state.info[f"start.{i}"])
            except (KeyError, ValueError):
                raise ValueError(f"a cache state without layer {i}'s start") from None
            if not 0 <= start <= state.length or (start and layer.window is None):
                raise ValueError(f"a cache state whose layer {i} starts at {start}")
            layer.start, layer.stored = start, state.length - start
            if layer.stored == 0:
                continue
            shape = (1, kv_heads, layer.stored, head_dim)
            for name in (f"k.{i}", f"v.{i}"):
                expected.add(name)
                array = state.arrays.get(name)
                if array is None or array.shape != shape or array.dtype != stored_dtype:
                    found = "none" if array is None else f"{array.dtype} {array.shape}"
                    raise ValueError(f"cache state array {name}: {found}, expected {stored_dtype.__name__} {shape}")
            layer.keys, layer.values = (mx.array(state.arrays[f"{p}.{i}"]).view(dtype) for p in "kv")
        if set(state.arrays) != expected:
            raise ValueError("a cache state with arrays of no layer")
        new.length = state.length
        return new

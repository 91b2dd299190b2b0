"""Keys and values of the tokens seen so far, one growing buffer per layer: the NumPy backend's `Cache`.

Float32 by default. At `--kv-bits 16` stored as float16, as llama.cpp's cache is by default: half the memory, and
half the bytes a decoding step reads at a long context. Rounding a key or value to float16 moves it by at most 2^-11
of itself; a pass without a cache then rounds them alike (`as_stored`), so every route through the model gives the
same logits. Not the default: a model whose router sits near its choices can amplify that into other experts and
tokens (on the synthetic 20b, whose random router does, logits moved by up to half their largest; on the tiny
preset by 4e-4 of it). A layer whose keys or values reach beyond float16's range (65504) is kept in float32 from
then on, so nothing overflows to infinity.

Its `truncate` always keeps what is asked (the contract allows less): every layer keeps every position.
"""

from __future__ import annotations

import numpy as np

from mlx_oss.backend import Cache, CacheState

KIND = "numpy/2"  # the state's layout: per layer `k.i` and `v.i`, float16 or float32 `[kv_heads, head_dim, length]`
KINDS = (KIND, "numpy-f32/1")  # states this cache restores: the float32 ones of earlier versions too
COPY_ROOM = 256  # positions a copy can grow by before its buffers are grown (a copy holds no doubled capacity)
HALF_LIMIT = float(np.finfo(np.float16).max)  # larger magnitudes keep their layer in float32


class KVCache(Cache):
    """Per-layer keys and values, each `[kv_heads, head_dim, capacity]`, grown by doubling.

    Stored transposed (positions last) so that a query's scores, and its weighted sum of values, run along
    positions, contiguously.

    Every layer keeps all positions, sliding ones included, so the cache can be cut back to any
    common prefix (`truncate`) and extended again with the same results as a fresh prefill.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int = 256, half: bool = False):
        self.length = 0
        self._end = 0  # the positions held once the layers' latest `append` is `advance`d
        dtype = np.float16 if half else np.float32
        self._k = [_buffer((kv_heads, head_dim), capacity, dtype) for _ in range(num_layers)]
        self._v = [_buffer((kv_heads, head_dim), capacity, dtype) for _ in range(num_layers)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store new keys/values `[T, kv_heads, head_dim]` at positions `length ..`."""
        end = self.length + k.shape[0]
        if self._k[layer].dtype == np.float16 and not (_fits_half(k) and _fits_half(v)):
            self._regrow(layer, self._k[layer].shape[-1], np.float32)
        if end > self._k[layer].shape[-1]:
            self._regrow(layer, max(end + end // 4, 2 * self._k[layer].shape[-1]), self._k[layer].dtype)
        self._k[layer][..., self.length : end] = k.transpose(1, 2, 0)
        self._v[layer][..., self.length : end] = v.transpose(1, 2, 0)
        self._end = end

    def _regrow(self, layer: int, capacity: int, dtype) -> None:
        """The layer's buffers at `capacity` positions (room to decode on without a copy) and `dtype`."""
        for buffers in (self._k, self._v):
            grown = _buffer(buffers[layer].shape[:2], capacity, dtype)
            grown[..., : self.length] = buffers[layer][..., : self.length]
            buffers[layer] = grown

    def held(self, layer: int, first: int = 0, widen=None) -> tuple[np.ndarray, np.ndarray, int]:
        """The layer's keys and values from position `first` to the end of its latest `append`, as float32
        `[kv_heads, head_dim, positions]`, and `first` (the position of the first key). Float16 buffers are widened
        by `widen(buffer, first, end)` (`kernels.widened`; default NumPy's cast)."""
        first = min(max(first, 0), self._end)
        widen = widen or _cast_to_float32
        k, v = (b[layer] for b in (self._k, self._v))
        if k.dtype == np.float32:
            return k[..., first : self._end], v[..., first : self._end], first
        return widen(k, first, self._end), widen(v, first, self._end), first

    def first_held(self, layer: int) -> int:
        """The position of `buffers(layer)`'s first key: always 0, every position is kept."""
        return 0

    def buffers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's whole key and value buffers (C-contiguous, positions up to their capacity), as the decoding
        kernels read them: float32, or float16 as their bits (uint16; numba has no float16)."""
        k, v = self._k[layer], self._v[layer]
        return (k.view(np.uint16), v.view(np.uint16)) if k.dtype == np.float16 else (k, v)

    def advance(self, count: int) -> None:
        """Mark `count` appended positions as part of the cache (after every layer stored them)."""
        self.length += count
        self._end = self.length

    def truncate(self, length: int) -> int:
        """Forget every position from `length` on; returns `length` (this cache can always go back)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = self._end = length
        return length

    def copy(self) -> KVCache:
        """An independent cache of the same positions, in buffers of `COPY_ROOM` positions beyond them (at most the
        original's capacity): a copy kept in a prompt cache counts only what it holds, and one extended by a few
        drafted tokens does not regrow."""
        new = object.__new__(KVCache)
        new.length = new._end = self.length
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
    def from_state(
        cls, state: CacheState, num_layers: int, kv_heads: int, head_dim: int, half: bool = False
    ) -> KVCache:
        """The cache `state` describes, checked against the model's shape (ValueError when it does not fit).
        Its layers are stored as appending them would: a float16 cache's come back float32 in a float32 one, and
        float32 ones are rounded into a float16 one where they fit, as a fresh prefill would have stored them."""
        if state.kind not in KINDS:
            raise ValueError(f"a cache state of kind {state.kind!r}, not {KIND!r}")
        names = {f"{p}.{i}" for i in range(num_layers) for p in "kv"}
        if set(state.arrays) != names:
            raise ValueError(f"a cache state's arrays are not those of {num_layers} layers")
        shape = (kv_heads, head_dim, state.length)
        for name, array in state.arrays.items():
            if array.shape != shape or array.dtype not in (np.float16, np.float32):
                expected = f"float16 or float32 {shape}"
                raise ValueError(f"cache state array {name}: {array.dtype} {array.shape}, expected {expected}")
        new = cls(num_layers, kv_heads, head_dim, capacity=state.length + COPY_ROOM, half=half)
        for i in range(num_layers):
            k, v = (state.arrays[f"{p}.{i}"].transpose(2, 0, 1) for p in "kv")
            new.append(i, k, v)
        new.advance(state.length)
        return new


def as_stored(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values as a float16 cache holds them, widened back to float32 (unrounded where float16 cannot hold
    them): what a pass without a cache attends over, so that it gives the logits a cached one does."""
    if not (_fits_half(k) and _fits_half(v)):
        return k, v
    return k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)


def _fits_half(x: np.ndarray) -> bool:
    """Whether float16 holds every value of `x` (not so for NaN and infinities: their layer stays float32 too)."""
    return bool(np.abs(x).max(initial=0.0) <= HALF_LIMIT)


def _cast_to_float32(buffer: np.ndarray, first: int, end: int) -> np.ndarray:
    return buffer[..., first:end].astype(np.float32)


def _buffer(shape: tuple[int, int], capacity: int, dtype) -> np.ndarray:
    """A `[*shape, capacity]` buffer whose rows are an odd number of 64-byte cache lines apart.

    A decoding step's scores read the same positions of all of a kv head's `head_dim` rows at once. Rows a large
    power of two of lines apart share the core's cache sets (4 KB apart, all of them one set; 2 KB apart, two) and
    evict each other; an odd number of lines apart puts up to 64 rows of a head in as many different sets.
    """
    per_line = 64 // np.dtype(dtype).itemsize
    lines = -(-capacity // per_line)
    return np.empty((*shape, per_line * (lines + 1 - lines % 2)), dtype)


def _copy_held(buffer: np.ndarray, length: int) -> np.ndarray:
    copied = _buffer(buffer.shape[:2], min(buffer.shape[-1], length + COPY_ROOM), buffer.dtype)
    copied[..., :length] = buffer[..., :length]
    return copied

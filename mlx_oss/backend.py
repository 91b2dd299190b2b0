"""The backend contract: what a model and its KV cache offer, and which backend `auto` runs.

Backends import this module and nothing of the loader, so the loader may import them. A backend's model and cache
implement `Model` and `Cache`; the engine and the bench rely on nothing else.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, Self, runtime_checkable

import numpy as np

from .config import ModelConfig
from .errors import MlxOssError

BACKENDS = ("auto", "mlx", "numpy")


@runtime_checkable
class Cache(Protocol):
    """The keys and values of the positions a model has read, which the next `forward` goes on from.

    `truncate` may keep less than asked: a backend may drop old keys of sliding-window layers to bound memory
    (the MLX cache keeps a fixed number of positions beyond the window), and what it dropped cannot be restored.
    Callers take the returned length and run the tokens from there again. Stepping back a short way, as over a
    turn's closing tokens or rejected drafted tokens, keeps what is asked on every backend: the MLX cache can
    always go back `REWIND` positions (`mlx_backend.kv_cache`), the NumPy cache any distance.

    `state` and the model's `restore_cache` save a cache and rebuild it, for prompt caches that outlive the process
    (`mlx_oss.prompt_cache_disk` writes the state to a file).
    """

    length: int  # positions held: the tokens read so far, minus those truncated

    def truncate(self, length: int) -> int:
        """Forget every position from `length` on (0 <= length <= self.length, else ValueError); return the length
        kept, `length` or less, which the cache then holds exactly."""
        ...

    def copy(self) -> Self:
        """An independent cache holding the same positions: extending or truncating either leaves the other as it
        was, and both continue as the original would. For keeping several prefixes (a prompt cache) and for trying
        tokens on a copy (speculative decoding)."""
        ...

    def nbytes(self) -> int:
        """Bytes of the buffers this cache holds (a copy counts its own, even where a backend shares them until
        written)."""
        ...

    def state(self) -> CacheState:
        """The positions held, as named NumPy arrays (views are fine: the caller copies or writes them before the
        cache changes); the model's `restore_cache` turns it back into a cache that continues as this one."""
        ...


def bounded_truncation(held: int, length: int, earliest: Iterable[int]) -> int:
    """The length a cache holding `held` positions keeps when asked to truncate to `length`, when its layers can
    step back no further than `earliest` (a sliding layer that dropped its oldest keys): `length`, or 0 (forget
    everything, the caller prefills again). ValueError for a length outside 0..held."""
    if not 0 <= length <= held:
        raise ValueError(f"cannot truncate a cache of {held} positions to {length}")
    return 0 if length and any(length < first for first in earliest) else length


def sliding_drop(held: int, window: int | None, rewind: int, step: int) -> int:
    """How many of a layer's oldest positions to drop when it holds `held`: none for a full-attention layer
    (`window` None) or until it holds `step` more than its window and `rewind` need (not at every token), then all
    but those."""
    if window is None:
        return 0
    keep = window - 1 + rewind
    return held - keep if held > keep + step else 0


def earliest_truncation(start: int, window: int | None) -> int:
    """The smallest length (besides 0) a sliding layer whose positions begin at `start` can go back to and still
    attend correctly: the window before it must be held."""
    return 0 if start == 0 else start + window - 1


@dataclass(frozen=True)
class CacheState:
    """A cache as plain data, to write to a file and read back: named NumPy arrays of the positions held, and
    small facts beside them (text, as a file's metadata holds them).

    `kind` names the cache class and its layout (a quantized cache has its own), so a state is only restored by
    the cache that wrote it; `restore_cache` checks every name, shape and dtype against the model and raises
    ValueError on anything that does not fit.
    """

    kind: str
    length: int
    arrays: dict[str, np.ndarray]
    info: dict[str, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@runtime_checkable
class Model(Protocol):
    """What every backend offers. Logits are float32 NumPy arrays `[tokens, vocab_size]`.

    Backends subclass it for `logits` and the `backend_reason` default.
    """

    backend: str
    backend_reason: str = ""
    config: ModelConfig

    def new_cache(self) -> Cache:
        """An empty cache (length 0)."""
        ...

    def restore_cache(self, state: CacheState) -> Cache:
        """A cache holding what `state` (from `Cache.state` of this model's cache kind) holds; ValueError when it
        does not fit this model (another kind, layer count, shape or dtype)."""
        ...

    def forward(self, token_ids, cache: Cache | None = None, last_only: bool = False) -> np.ndarray:
        """Run `token_ids` after whatever `cache` holds, extending it; return their logits
        (`[1, vocab_size]` with `last_only`)."""
        ...

    def logits(self, token_ids) -> np.ndarray:
        """Logits `[len(token_ids), vocab_size]` of a fresh full-sequence pass."""
        return self.forward(token_ids)

    def map_in(self) -> None:
        """Bring the weights every token reads back into this process's memory now, from the page cache or the
        disk, where something else (another model, the benchmark's peer) has pushed them out since loading; the next
        tokens would otherwise wait on the disk. Nothing for a backend that holds its own copy of the weights."""
        return None

    def map_out(self) -> None:
        """Let go of the weights' pages in this process's memory (the page cache keeps them until it needs the room),
        so that the OS may drop them; the next token, or `map_in`, maps them again. Nothing for a backend that holds
        its own copy of the weights."""
        return None


def checked_tokens(token_ids, vocab_size: int) -> np.ndarray:
    """Token ids as a flat int64 array, refused when empty or outside the vocabulary."""
    tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if tokens.size == 0:
        raise ValueError("forward needs at least one token")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")
    return tokens


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def preferred_backend() -> tuple[str, str]:
    """The backend `auto` runs a Hugging Face download on, and why: MLX on Apple silicon (Metal), NumPy elsewhere,
    the CPU backend meant to be tuned for machines without a GPU."""
    if is_apple_silicon():
        return "mlx", "auto: Apple silicon, MLX on the GPU"
    return "numpy", f"auto: no Apple silicon GPU on this {platform.system()} {platform.machine()} machine"


def choose_backend(requested: str, layout: str = "hf") -> tuple[str, str]:
    """The backend to run and why. `auto` follows a converted directory's layout, else `preferred_backend`."""
    if requested not in BACKENDS:
        raise MlxOssError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "as asked"
    if layout in ("mlx", "numpy"):
        return layout, f"auto: the model is in the {layout} layout"
    return preferred_backend()


def fastest_layout(backend: str) -> str:
    """The layout `backend` ("mlx" or "numpy") runs fastest on. For NumPy with the compiled kernels it is the packed
    one (a decoded token reads 0.6 GB less), else the download itself (the kernels multiply BF16 in place, half the
    bytes of the NumPy layout's float32); for plain NumPy the NumPy layout. A store without it falls back to the
    download (`StoredModel.layout_for`)."""
    if backend != "numpy":
        return backend
    from .cpu import kernels

    return "packed" if kernels.available() else "numpy"

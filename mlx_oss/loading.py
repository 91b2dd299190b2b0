"""`load(path, backend)`: the one entry point that turns a model directory into a runnable model."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import ModelConfig
from .errors import MlxOssError

BACKENDS = ("auto", "numpy")


class Model(Protocol):
    """What every backend offers. Logits are float32 NumPy arrays `[tokens, vocab_size]`."""

    backend: str
    config: ModelConfig

    def new_cache(self): ...

    def forward(self, token_ids, cache=None, last_only: bool = False) -> np.ndarray: ...

    def logits(self, token_ids) -> np.ndarray: ...


def choose_backend(requested: str) -> str:
    if requested not in BACKENDS:
        raise MlxOssError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    return "numpy"


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def load(path: str | Path, backend: str = "auto") -> Model:
    """Load the gpt-oss checkpoint in directory `path` on `backend` ("auto" or "numpy")."""
    from .checkpoint import Checkpoint

    chosen = choose_backend(backend)
    checkpoint = Checkpoint(path)
    if chosen == "numpy":
        from .cpu import NumpyModel

        return NumpyModel(checkpoint)
    raise AssertionError(chosen)

"""`load(path, backend)`: the one entry point that turns a model directory into a runnable model."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, MlxOssError
from .layouts import UNQUANTIZED

BACKENDS = ("auto", "mlx", "numpy")


class Model:
    """What every backend offers. Logits are float32 NumPy arrays `[tokens, vocab_size]`."""

    backend: str
    backend_reason: str = ""
    config: ModelConfig

    def new_cache(self):
        """An empty cache with `.length` and `.truncate(n) -> kept length`."""
        raise NotImplementedError

    def forward(self, token_ids, cache=None, last_only: bool = False) -> np.ndarray:
        """Run `token_ids` after whatever `cache` holds, extending it; return their logits
        (`[1, vocab_size]` with `last_only`)."""
        raise NotImplementedError

    def logits(self, token_ids) -> np.ndarray:
        """Logits `[len(token_ids), vocab_size]` of a fresh full-sequence pass."""
        return self.forward(token_ids)


def checked_tokens(token_ids, vocab_size: int) -> np.ndarray:
    """Token ids as a flat int64 array, refused when empty or outside the vocabulary."""
    tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if tokens.size == 0:
        raise ValueError("forward needs at least one token")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")
    return tokens


def choose_backend(requested: str, layout: str = "hf") -> tuple[str, str]:
    """The backend to run and why. `auto` follows a converted directory's layout; for a Hugging Face one it is
    MLX on Apple silicon (Metal) and NumPy elsewhere: the CPU backend meant to be tuned for machines without a GPU."""
    if requested not in BACKENDS:
        raise MlxOssError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "as asked"
    if layout in ("mlx", "numpy"):
        return layout, f"auto: the model is in the {layout} layout"
    if is_apple_silicon():
        return "mlx", "auto: Apple silicon, MLX on the GPU"
    return "numpy", f"auto: no Apple silicon GPU on this {platform.system()} {platform.machine()} machine"


def numpy_reads_fastest() -> str:
    """The layout the NumPy backend runs fastest on: the download itself when its compiled kernels are there
    (they multiply BF16 in place, half the bytes of the NumPy layout's float32), else the NumPy layout."""
    from .cpu import kernels

    return "hf" if kernels.available() else "numpy"


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def load(path: str | Path, backend: str = "auto") -> Model:
    """Load the gpt-oss model in directory `path` (any layout) on `backend` ("auto", "mlx" or "numpy").

    The model's `backend` names the backend that runs it and `backend_reason` why it was chosen.
    """
    from .checkpoint import Checkpoint

    choose_backend(backend)  # an unknown name fails before any file is read
    checkpoint = Checkpoint(path)
    if checkpoint.layout == UNQUANTIZED:
        raise CheckpointError(
            f"{checkpoint.directory}: its experts are stored unquantized (mlp.experts.gate_up_proj), as transformers "
            "saves a dequantized or fine-tuned gpt-oss; quantize them to MXFP4 once, then load the result: "
            f"python -m mlx_oss.converters mxfp4 {checkpoint.directory} DESTINATION (a downloaded model: "
            "python -m mlx_oss.models convert NAME --to mxfp4, or Quantize to MXFP4 in the app's Models tab)"
        )
    chosen, reason = choose_backend(backend, checkpoint.layout)
    if checkpoint.layout not in ("hf", chosen):
        other = "MLX" if chosen == "numpy" else "NumPy"
        raise CheckpointError(
            f"{checkpoint.directory}: is in the {checkpoint.layout} layout, which the {chosen} backend does not "
            f"read; load it with the {other} backend, or give the Hugging Face directory it came from"
        )
    if chosen == "numpy":
        from .cpu import NumpyModel

        model = NumpyModel(checkpoint)
        reason = f"{reason}; {model.kernel_description}"
    else:
        model = _load_mlx(checkpoint)
    model.backend_reason = reason
    return model


def _load_mlx(checkpoint):
    try:
        from .mlx_backend import MlxModel
    except ImportError as e:
        # Only MLX itself missing is fixed by installing it; a module of ours missing means a broken installation.
        missing = e.name or ""
        if isinstance(e, ModuleNotFoundError) and (missing == "mlx" or missing.startswith("mlx.")):
            problem = f"the MLX backend needs MLX, which is not installed ({e}); install it with: pip install "
            problem += "'mlx-oss[mlx]'"
        elif missing.startswith("mlx_oss."):
            problem = f"this mlx-oss installation is incomplete: its module {missing} does not load ({e}); reinstall it"
        else:
            problem = f"the MLX backend failed to import ({e}); reinstall MLX: pip install --force-reinstall "
            problem += "'mlx-oss[mlx]'"
        raise MlxOssError(f"{problem}, or choose --backend numpy") from None
    return MlxModel(checkpoint)

"""`load(path, backend)`: the one entry point that turns a model directory into a runnable model."""

from __future__ import annotations

from pathlib import Path

from .backend import BACKENDS, Model, choose_backend
from .errors import CheckpointError, MlxOssError
from .layouts import UNQUANTIZED

__all__ = ["BACKENDS", "load"]  # BACKENDS: the names `load` takes, which the command lines offer


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

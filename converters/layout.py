"""Converting a Hugging Face gpt-oss checkpoint to another layout (see `mlx_oss.layouts`): the MLX, the NumPy or
the packed layout, or, for a checkpoint whose experts were saved unquantized, the published MXFP4 one.

The source is only read. Tensors stream from its memory-mapped shards into the new ones a piece at a time,
into a temporary directory beside the destination that is renamed into place at the end: an interrupted or
failed conversion leaves no half-written model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from mlx_oss.atomic import atomic_directory, ensure_free_space
from mlx_oss.cancel import CancelToken
from mlx_oss.checkpoint import Checkpoint
from mlx_oss.config import MAX_CONFIG_BYTES, MXFP4_QUANTIZATION
from mlx_oss.errors import MlxOssError
from mlx_oss.layouts import (
    CONVERTED,
    HF,
    MLX,
    MLX_MXFP4,
    MXFP4,
    NUMPY,
    PACKED,
    Q8,
    UNQUANTIZED,
    mlx_specs,
    mxfp4_specs,
    numpy_specs,
    packed_specs,
    q8_specs,
    quantizable,
)
from mlx_oss.regular_files import read_json
from mlx_oss.safetensors_io import INDEX_FILE, SHARD_BYTES, TensorSpec, write_shards

TARGETS = CONVERTED


def plan(checkpoint: Checkpoint, target: str, q8: bool = False) -> list[TensorSpec]:
    """The tensors `target` holds for `checkpoint`, as streams (nothing is read yet)."""
    if target not in TARGETS:
        raise MlxOssError(f"unknown layout {target!r}; choose one of {', '.join(TARGETS)}")
    if target == MXFP4:
        if checkpoint.layout != UNQUANTIZED:
            raise MlxOssError(
                f"{checkpoint.directory}: its experts are MXFP4 already (the {checkpoint.layout} layout); "
                "nothing to quantize"
            )
        if q8:
            raise MlxOssError("8-bit storage (--q8) is an option of the MLX layout only")
        return mxfp4_specs(checkpoint)
    if checkpoint.layout == UNQUANTIZED:
        raise MlxOssError(
            f"{checkpoint.directory}: its experts are stored unquantized; quantize them first "
            f"(python -m mlx_oss.converters mxfp4 {checkpoint.directory} DESTINATION), then convert the result"
        )
    if checkpoint.layout != HF:
        raise MlxOssError(
            f"{checkpoint.directory}: already in the {checkpoint.layout} layout; convert from the Hugging Face "
            "checkpoint it came from"
        )
    if q8 and target != MLX:
        raise MlxOssError("8-bit storage (--q8) is an option of the MLX layout only")
    if target == NUMPY:
        return numpy_specs(checkpoint)
    if target == PACKED:
        return packed_specs(checkpoint)
    specs = mlx_specs(checkpoint)
    if q8:
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            raise MlxOssError("--q8 quantizes with MLX, which is not installed: pip install 'mlx-oss[mlx]'") from None
        lossy = set(quantizable(checkpoint.config))
        specs = [part for spec in specs for part in (q8_specs(spec) if spec.name in lossy else [spec])]
    return specs


def output_config(checkpoint: Checkpoint, target: str, q8: bool) -> dict:
    """The source's config.json as it was, with what loaders of the new layout need to know."""
    # read as the checkpoint read it: a regular file, checked JSON (it was valid a moment ago)
    config = read_json(checkpoint.directory / "config.json", MAX_CONFIG_BYTES, MlxOssError)
    if target == MXFP4:  # the published layout, which says how its experts are stored
        config["quantization_config"] = dict(MXFP4_QUANTIZATION)
        config["mlx_oss"] = {"layout": HF, "experts": "quantized to MXFP4 from unquantized weights"}
        return config
    if target == MLX:
        # mlx-lm reads the experts' packing from here; the 8-bit tensors it infers from their scales.
        config["quantization"] = dict(MLX_MXFP4)
    config["mlx_oss"] = {"layout": target, "lossy": q8}
    if q8:
        config["mlx_oss"]["q8"] = {**Q8, "mode": "affine", "tensors": "attention projections and embeddings"}
    return config


def copied_files(source: Path) -> list[Path]:
    """The source's other top-level files (tokenizer, chat template, generation config, licence), copied as they
    are. Weights, their index and config.json are written anew; folders such as `original/` are left out."""
    skip = {"config.json", INDEX_FILE}
    return sorted(p for p in source.iterdir() if p.is_file() and p.name not in skip and p.suffix != ".safetensors")


def convert(
    source: str | Path,
    destination: str | Path,
    target: str,
    q8: bool = False,
    shard_bytes: int = SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    cancel: CancelToken | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Path:
    """Write `source` (a Hugging Face gpt-oss directory) in `target` layout to `destination` (which must not
    exist). Returns `destination`. `on_start` hears the bytes to write before the first one, `on_bytes` each
    piece written; `cancel` stops it within one piece (64 MB), leaving no destination."""
    destination = Path(destination)
    on_bytes = _cancellable(on_bytes, cancel, destination)
    checkpoint = Checkpoint(source)
    specs = [_releasing(spec, checkpoint) for spec in plan(checkpoint, target, q8)]
    extra = copied_files(checkpoint.directory)
    total = sum(s.nbytes for s in specs) + sum(p.stat().st_size for p in extra)
    ensure_free_space(destination.parent, total)
    if on_start:
        on_start(total)
    with atomic_directory(destination) as tmp:
        for path in extra:
            shutil.copy2(path, tmp / path.name)
            on_bytes(path.stat().st_size)
        config = output_config(checkpoint, target, q8)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_shards(tmp, specs, shard_bytes, on_bytes=on_bytes, metadata={"format": "mlx" if target == MLX else "pt"})
    return destination


def _cancellable(on_bytes, cancel: CancelToken | None, destination: Path) -> Callable[[int], None]:
    def report(count: int) -> None:
        if cancel is not None and cancel.cancelled:
            raise MlxOssError(f"conversion to {destination} cancelled; nothing was written")
        if on_bytes:
            on_bytes(count)

    return report


def _releasing(spec: TensorSpec, checkpoint: Checkpoint) -> TensorSpec:
    """`spec`, dropping the source's mapped pages from resident memory once it is written: converting 13 GB
    should not look like holding 13 GB (the pages stay in the OS's cache either way)."""

    def chunks():
        yield from spec.chunks()
        checkpoint.release()

    return dataclasses.replace(spec, chunks=chunks)

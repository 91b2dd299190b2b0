"""Shared fixtures: synthetic checkpoints written once per session and per shape."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mlx_oss.converters.synthetic import SynthOptions, preset_config, write_synthetic

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # real Qt widgets, no screen needed
# Never touch the developer's hub cache, token or the network; set before anything imports huggingface_hub,
# which reads these once.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mlx-oss-test-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)  # every run left one behind
os.environ["MLX_OSS_MODELS"] = os.path.join(os.environ["HF_HOME"], "store")
os.environ["MLX_OSS_PROMPT_CACHE_DIR"] = os.path.join(os.environ["HF_HOME"], "prompt-cache")  # not the user's
for _name in ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET"):
    os.environ[_name] = "1"
for _name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory):
    """`synthetic_checkpoint(preset="tiny", seed=0, expert_bias_std=0.1, single_file=False, unquantized=False,
    **shape)` -> Path.

    Each distinct request is written once per test session and shared; tests must not modify it.
    """
    made: dict[tuple, Path] = {}

    def make(
        preset: str = "tiny",
        seed: int = 0,
        expert_bias_std: float = 0.1,
        single_file: bool = False,
        shard_bytes: int = 5_000_000_000,
        unquantized: bool = False,
        **shape,
    ) -> Path:
        key = (preset, seed, expert_bias_std, single_file, shard_bytes, unquantized, tuple(sorted(shape.items())))
        if key not in made:
            path = tmp_path_factory.mktemp("ckpt") / "model"
            options = SynthOptions(
                seed=seed,
                expert_bias_std=expert_bias_std,
                shard_bytes=shard_bytes,
                single_file=single_file,
                unquantized=unquantized,
            )
            made[key] = write_synthetic(path, preset_config(preset, **shape), options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_checkpoint) -> Path:
    """The `tiny` preset: 4 layers, 8 experts, the real 201088-token vocabulary."""
    return synthetic_checkpoint("tiny")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """`converted(source, "mlx" | "numpy", q8=False)` -> Path: `source` converted once per test session."""
    from mlx_oss.converters.layout import convert

    made: dict[tuple, Path] = {}

    def make(source: Path, target: str, q8: bool = False) -> Path:
        key = (source, target, q8)
        if key not in made:
            made[key] = convert(source, tmp_path_factory.mktemp(f"{target}-layout") / "model", target, q8)
        return made[key]

    return make


@contextlib.contextmanager
def kernels_switched_off():
    """Models loaded inside use the plain NumPy path (the switch is read at load)."""
    old = os.environ.get("MLX_OSS_KERNELS")
    os.environ["MLX_OSS_KERNELS"] = "off"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MLX_OSS_KERNELS"]
        else:
            os.environ["MLX_OSS_KERNELS"] = old


def load_variant(path, variant: str):
    """Load `path` on a backend variant: "numpy" (with the compiled kernels where they exist), "numpy-plain"
    or "mlx"."""
    import mlx_oss

    if variant == "numpy-plain":
        with kernels_switched_off():
            return mlx_oss.load(path, backend="numpy")
    need_backend(variant)
    return mlx_oss.load(path, backend=variant)


def need_backend(backend: str) -> None:
    """Skip (visibly) where the backend's library cannot be installed, e.g. MLX on an Intel Mac."""
    if backend == "mlx":
        pytest.importorskip("mlx.core", reason="MLX does not install on this platform")


@pytest.fixture
def float32_activations(monkeypatch) -> None:
    """Prompts' expert products in float32 even where VNNI would take them with inputs rounded to 16 bits (2**-16
    of a block's largest): for tests that compare two routes through our own model more closely than that rounding
    allows, which may round two inputs a float32 rounding apart to neighbouring values. The reference tests hold
    the rounded path itself to transformers."""
    from mlx_oss.cpu import kernels

    monkeypatch.setattr(kernels, "TILED_GROUP_TOKENS", 1 if kernels.AMX else 1 << 62)


@pytest.fixture(params=["numpy", "numpy-plain", "mlx"])
def backend(request, monkeypatch) -> str:
    """A backend to load models with; `numpy-plain` is the NumPy backend with its compiled kernels off."""
    if request.param == "numpy-plain":
        monkeypatch.setenv("MLX_OSS_KERNELS", "off")
        return "numpy"
    need_backend(request.param)
    return request.param

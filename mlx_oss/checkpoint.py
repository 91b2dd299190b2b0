"""A gpt-oss model directory on disk: config, shards, and checked tensors, in any of our layouts.

Opening a checkpoint reads only headers. Every tensor the model needs is checked against the
config (present, right shape, a dtype we can read) before any backend starts, so a broken download
fails at once with the file and tensor named, not halfway through a forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .layouts import HF, MLX, Expected, detect_layout, expected_tensors, packable, packed_shapes, q8_shapes, quantizable
from .packed_bf16 import PARTS, PackedMatrix, check_packed, packable_width
from .regular_files import confined_name, printable, read_json
from .safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile, TensorInfo, as_float32

MAX_INDEX_BYTES = 8 * 1024 * 1024  # gpt-oss-120b's index is about 57 KB (687 tensor names)


class Checkpoint:
    """A gpt-oss model directory: `config.json` plus safetensors shards, in the `hf`, `mlx` or `numpy` layout."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.exists():
            raise CheckpointError(f"{self.directory}: no such model directory")
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory; give the folder that holds config.json")
        self.config = ModelConfig.from_file(self.directory / "config.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.locations: dict[str, str] = {}  # tensor name -> shard file name
        self._open_shards()
        self.layout = detect_layout(self.locations)
        self._check_tensors()

    def _open_shards(self) -> None:
        index_path = self.directory / INDEX_FILE
        if os.path.lexists(index_path):
            for shard, names in self._read_index(index_path).items():
                self.files[shard] = SafetensorsFile(self.directory / shard)
                for name in names:
                    if name not in self.files[shard].tensors:
                        raise CheckpointError(
                            f"{self.directory / shard}: tensor '{printable(name)}' is listed in {INDEX_FILE} "
                            "but not in the shard"
                        )
                    self.locations[name] = shard
            return
        shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.directory}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")
        for shard in shards:
            self.files[shard] = SafetensorsFile(self.directory / shard)
            for name in self.files[shard].tensors:
                self.locations.setdefault(name, shard)

    def _read_index(self, index_path: Path) -> dict[str, list[str]]:
        """The index's shards (plain file names inside the directory, each checked) and the tensors of each."""
        index = read_json(index_path, MAX_INDEX_BYTES, CheckpointError, "cannot read: it is a broken link")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: not a valid index (expected a 'weight_map' object)")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            problem = confined_name(shard)
            if problem:
                raise CheckpointError(f"{index_path}: the shard of tensor '{printable(name)}' {problem}")
            shards.setdefault(shard, []).append(name)
        for shard in sorted(shards):
            if not os.path.exists(self.directory / shard):
                raise CheckpointError(f"{self.directory / shard}: shard listed in {INDEX_FILE} is missing")
        return dict(sorted(shards.items()))

    def check_unchanged(self) -> None:
        """Raise CheckpointChanged naming a shard cut short or rewritten since it was loaded (reading its mapped
        pages past a new end would kill the process). A few fstat calls: cheap enough for every forward pass."""
        for file in self.files.values():
            file.check_unchanged()

    def _check_tensors(self) -> None:
        expected = expected_tensors(self.config, self.layout)
        for name in quantizable(self.config) if self.layout == MLX else ():
            base = name.removesuffix(".weight")
            if base + ".scales" in self.locations:  # stored 8-bit by the lossy MLX option
                for part, (shape, dtype) in q8_shapes(expected.pop(name).shape).items():
                    expected[f"{base}.{part}"] = Expected(shape, (dtype,))
        self.packed_names: set[str] = set()  # matrices stored packed (`packed_bf16`), their parts checked below
        for name in packable(self.config) if self.layout == HF else ():
            base = name.removesuffix(".weight")
            if base + ".packed" in self.locations:
                shape = expected.pop(name).shape
                if not packable_width(shape[1]):
                    where = self.directory / self.locations[base + ".packed"]
                    raise CheckpointError(
                        f"{where}: tensor '{base}.packed' packs a matrix of {shape[1]} columns, which cannot be packed"
                    )
                for part, want in packed_shapes(shape).items():
                    expected[f"{base}.{part}"] = want
                self.packed_names.add(name)
        for name, want in expected.items():
            if name not in self.locations:
                raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
            info = self.info(name)
            where = self.directory / self.locations[name]
            if not _fits(info.shape, want.shape):
                implied = ", ".join("n" if w == -1 else str(w) for w in want.shape)
                raise CheckpointError(
                    f"{where}: tensor '{name}' has shape {list(info.shape)}, config.json implies [{implied}]"
                )
            if info.dtype not in want.dtypes:
                raise CheckpointError(
                    f"{where}: tensor '{name}' has dtype {info.dtype}, expected {' or '.join(want.dtypes)}"
                )

    def info(self, name: str) -> TensorInfo:
        return self.files[self.locations[name]].tensors[name]

    def _file(self, name: str) -> SafetensorsFile:
        """The shard holding tensor `name`."""
        if name not in self.locations:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self.files[self.locations[name]]

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored, memory-mapped (BF16 as uint16 bits)."""
        return self._file(name).array(name)

    def packed(self, name: str) -> PackedMatrix | None:
        """Matrix `name` (a `.weight`) as stored packed (`packed_bf16`), mapped and checked; None where it is stored
        as it is (a `.packed` tensor the layout does not pack, never checked, is not read)."""
        if name not in self.packed_names:
            return None
        base = name.removesuffix(".weight")
        matrix = PackedMatrix(*(self.raw(f"{base}.{part}") for part in PARTS))
        problem = check_packed(matrix)
        if problem:
            part, _, why = problem.partition(": ")
            where = self.directory / self.locations[f"{base}.{part}"]
            raise CheckpointError(f"{where}: tensor '{base}.{part}' {why}")
        return matrix

    def float32(self, name: str) -> np.ndarray:
        """A float tensor widened to float32. Float32 tensors stay memory-mapped; others are read and widened
        (use `raw` for large tensors read in pieces)."""
        if self.info(name).dtype == "F32":
            return self.raw(name)
        return as_float32(self.files[self.locations[name]].read(name), self.info(name).dtype)

    def prefault(self, name: str) -> None:
        """Map a tensor's pages now (see `SafetensorsFile.prefault`)."""
        self.files[self.locations[name]].prefault(name)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Some rows of a tensor, read from the file, not mapped (see `SafetensorsFile.read_rows`)."""
        return self._file(name).read_rows(name, rows)

    def release(self) -> None:
        """Drop every mapped page from the process's resident memory (after copying weights elsewhere)."""
        for file in self.files.values():
            file.release()

    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())


def _fits(shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether a tensor's shape is the expected one (-1: any length along that axis)."""
    return len(shape) == len(want) and all(w in (-1, s) for s, w in zip(shape, want, strict=True))

"""Reading and writing safetensors files as memory-mapped NumPy arrays, tensor by tensor.

The `safetensors` package cannot hand BF16 to NumPy (NumPy has no bfloat16), and its writers want
every tensor in memory at once. gpt-oss is BF16 everywhere but the MXFP4 experts, and a 20b
checkpoint is 13 GB, so this module reads the (simple, documented) format directly:
an 8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes.
BF16 tensors come back as their raw `uint16` bits; `bf16_to_f32` widens them exactly.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# safetensors dtype name -> NumPy dtype used to hold its bits (BF16 as raw uint16).
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_BYTES = 5_000_000_000  # the hub's largest shard size
WRITE_BYTES = 64 * 1024 * 1024  # bytes written (and reported to progress) at once


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One safetensors file: its header parsed and checked, its data memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._map: mmap.mmap | None = None
        self._read_header()

    def _read_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: truncated ({size} bytes); not a safetensors file")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(
                        f"{self.path}: header length {header_len} does not fit the file ({size} bytes); "
                        "truncated or not a safetensors file"
                    )
                header_bytes = f.read(header_len)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path}: header is not valid JSON; not a safetensors file") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor '{name}' has a malformed header entry") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
                )
            if data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor '{name}' ends at byte {data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (BF16 as uint16 bits)."""
        info = self.tensors[name]
        count = info.nbytes // DTYPES[info.dtype].itemsize
        return np.frombuffer(self._mapped(), DTYPES[info.dtype], count, info.begin).reshape(info.shape)

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def prefault(self, name: str) -> None:
        """Map the tensor's pages into this process now, so that its first use takes no page faults.

        Reading a page-cached model through a fresh map costs a fault per few pages: a 20b decode step ran
        at a third of its speed until every expert had been touched once. Needs Linux 5.14 or later
        (MADV_POPULATE_READ); elsewhere it only asks the system to read ahead.
        """
        info = self.tensors[name]
        start = info.begin - info.begin % mmap.PAGESIZE
        try:
            self._mapped().madvise(MADV_POPULATE_READ, start, info.end - start)
        except (OSError, ValueError, TypeError):
            if hasattr(mmap, "MADV_WILLNEED"):
                self._map.madvise(mmap.MADV_WILLNEED, start, info.end - start)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh writable array read from the file (BF16 as uint16 bits).

        For tensors that are copied anyway (widened to float32, handed to MLX): reading them through the
        memory map would leave their pages counted in the process's resident memory a second time.
        """
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        data = np.fromfile(self.path, dtype=dtype, count=info.nbytes // dtype.itemsize, offset=info.begin)
        return data.reshape(info.shape)

    def release(self) -> None:
        """Drop the mapped pages from this process's resident memory (they stay in the OS's page cache)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


# Linux's value, not yet named by Python's mmap module on every version this project supports
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 is the top half of a float32, so widening its bits is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to BF16 bits (round to nearest, ties to even), as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor from a checkpoint as float32, whatever float dtype it was stored in."""
    if dtype == "BF16":
        return bf16_to_f32(array)
    return np.asarray(array, dtype=np.float32)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, safetensors dtype, shape, and a source of its bytes in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def write_safetensors(
    path: str | Path,
    specs: list[TensorSpec],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write `specs` to `path`, streaming each tensor's chunks so that no tensor is ever whole in RAM."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            written = 0
            for chunk in spec.chunks():
                # a contiguous chunk (a memory-mapped tensor included) is written from where it lies, not copied
                data = memoryview(np.ascontiguousarray(chunk, dtype=DTYPES[spec.dtype])).cast("B")
                for start in range(0, len(data), WRITE_BYTES):
                    piece = data[start : start + WRITE_BYTES]
                    f.write(piece)
                    if on_bytes:
                        on_bytes(len(piece))
                written += len(data)
            if written != spec.nbytes:
                raise ValueError(f"tensor {spec.name}: wrote {written} bytes, expected {spec.nbytes}")
        f.flush()
        os.fsync(f.fileno())


def write_shards(
    directory: Path,
    specs: list[TensorSpec],
    shard_bytes: int = SHARD_BYTES,
    single_file: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `specs` into `directory` as the hub does: `model-0000i-of-0000N.safetensors` shards of at most
    `shard_bytes` ("of" names the last index) and a `model.safetensors.index.json`, or one `model.safetensors`."""
    if single_file:
        write_safetensors(directory / SINGLE_FILE, specs, metadata, on_bytes)
        return
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors"
        write_safetensors(directory / filename, shard, metadata, on_bytes)
        weight_map |= {spec.name: filename for spec in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def iter_rows(total_rows: int, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total_rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, total_rows)

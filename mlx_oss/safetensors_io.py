"""Reading and writing safetensors files as memory-mapped NumPy arrays, tensor by tensor.

The `safetensors` package cannot hand BF16 to NumPy (NumPy has no bfloat16), and its writers want
every tensor in memory at once. gpt-oss is BF16 everywhere but the MXFP4 experts, and a 20b
checkpoint is 13 GB, so this module reads the (simple, documented) format directly:
an 8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes.
BF16 tensors come back as their raw `uint16` bits; `bf16_to_f32` widens them exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mapped_files
from .errors import CheckpointChanged, CheckpointError
from .json_input import parse_json
from .mapped_files import changed_message
from .regular_files import open_regular, printable

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
# Headers we parse at most: gpt-oss's are under 200 KB. The format allows 100 MB, room for 2 million minimal entries
# whose Python objects take gigabytes and a long pause to parse and check; 8 MB holds at most about 130,000.
MAX_HEADER = 8 * 1024 * 1024
MAX_DIMS = 8  # dimensions of one tensor
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
    """One safetensors file: its header parsed and checked, its data memory-mapped on demand.

    The file stays open from its header on, so its data is always read from the file whose header was checked
    (a shard replaced by a new download keeps the old one readable); `check_unchanged` says when that file was
    cut short or rewritten since, which would otherwise end the process with a bus error at the first read of
    a page past its new end.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._map: mmap.mmap | None = None
        self._fd = self._open()
        self._closer = weakref.finalize(self, os.close, self._fd)
        loaded = os.fstat(self._fd)
        self.size, self._identity = loaded.st_size, _identity(loaded)
        self._read_header()

    def _open(self) -> int:
        try:
            return open_regular(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None

    def _read_header(self) -> None:
        size = self.size
        try:
            prefix = os.pread(self._fd, 8, 0)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated ({size} bytes); not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path}: header length {header_len} does not fit the file ({size} bytes) or exceeds "
                    f"{MAX_HEADER} bytes; truncated or not a safetensors file"
                )
            header_bytes = os.pread(self._fd, header_len, 8)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        if len(header_bytes) != header_len:
            raise CheckpointError(f"{self.path}: changed while its header was read; try again")
        try:
            header = parse_json(header_bytes)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: header is {e}; not a safetensors file") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: header's __metadata__ is not a JSON object")
        self.metadata = metadata
        data_start = 8 + header_len
        for name, entry in header.items():
            begin, end, dtype, shape = _entry(self.path, name, entry)
            if data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor '{printable(name)}' ends at byte {data_start + end} "
                    f"but the file has {size} bytes"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        spans = sorted((info.begin, info.end, info.name) for info in self.tensors.values() if info.nbytes)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise CheckpointError(
                    f"{self.path}: tensors '{printable(first)}' and '{printable(second)}' overlap in the file"
                )

    def check_unchanged(self) -> None:
        """Raise CheckpointChanged if the file was cut short or rewritten since it was loaded (a cheap fstat)."""
        now = os.fstat(self._fd)
        if _identity(now) != self._identity:
            raise CheckpointChanged(changed_message(self.path, self.size, now.st_size))

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (BF16 as uint16 bits)."""
        info = self.tensors[name]
        count = info.nbytes // DTYPES[info.dtype].itemsize
        return np.frombuffer(self._mapped(), DTYPES[info.dtype], count, info.begin).reshape(info.shape)

    def _mapped(self) -> mmap.mmap:
        """The file's map. On Linux it asks for huge pages (`MADV_HUGEPAGE`): pages it reads in may then come as
        2 MB folios, mapped 2 MB at a time, and a stream through the weights takes fewer TLB misses and prefetcher
        restarts (the README's benchmark section has the figures)."""
        if self._map is None:
            self.check_unchanged()
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            mapped_files.watch(self.path, self.size, inode=self._identity[1])
            _advise(self._map, getattr(mmap, "MADV_HUGEPAGE", None))
        return self._map

    def prefault(self, name: str) -> None:
        """Map the tensor's pages into this process now, so that its first use takes no page faults.

        Reading a page-cached model through a fresh map costs a fault per few pages, which slows every decode
        step until each expert has been touched once. Needs Linux 5.14 or later
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
        data = np.empty(info.shape, DTYPES[info.dtype])
        self._read_into(memoryview(data.reshape(-1).view(np.uint8)), info.begin, name)
        return data

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The tensor's `rows` (indices along its first axis, in their order) read from the file into a fresh
        array: for a table a token reads one row of (the embedding).

        Read through the map, each row would stay counted in the process's resident memory with the 64 KB the
        system maps around a fault: over a long session, most of the 20b's 1.16 GB embedding.
        Read with `pread`, a row comes from the page cache and leaves nothing mapped.
        """
        info = self.tensors[name]
        rows = np.asarray(rows).reshape(-1)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"{self.path}: rows of tensor '{name}' must be integers, not {rows.dtype}")
        count = info.shape[0] if info.shape else 0
        outside = rows[(rows < 0) | (rows >= count)]
        if outside.size:
            raise IndexError(f"{self.path}: tensor '{name}' has rows 0 to {count - 1}; asked for row {outside[0]}")
        row_bytes = info.nbytes // max(count, 1)
        data = np.empty((rows.size, *info.shape[1:]), DTYPES[info.dtype])
        view = memoryview(data.reshape(-1).view(np.uint8))
        for i, row in enumerate(rows.tolist()):
            self._read_into(view[i * row_bytes : (i + 1) * row_bytes], info.begin + row * row_bytes, name)
        return data

    def _read_into(self, view: memoryview, offset: int, name: str) -> None:
        """Fill `view` from the file at byte `offset` (part of tensor `name`)."""
        done = 0
        while done < len(view):
            count = _pread_into(self._fd, view[done:], offset + done)
            if count <= 0:
                self.check_unchanged()
                raise CheckpointError(f"{self.path}: ended before tensor '{name}' did; load the model again")
            done += count

    def release(self) -> None:
        """Drop the mapped pages from this process's resident memory (they stay in the OS's page cache)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _entry(path: Path, name: str, entry: object) -> tuple[int, int, str, tuple[int, ...]]:
    """A header entry's data offsets (relative to the data), dtype and shape, each checked."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{printable(name)}' {problem}")

    if not isinstance(entry, dict):
        raise bad("has a malformed header entry (not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"has unsupported dtype {printable(repr(dtype))}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise bad(f"has a malformed shape {printable(repr(shape))} (at most {MAX_DIMS} non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"has malformed data_offsets {printable(repr(offsets))} (expected two non-negative integers)")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise bad(f"spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}")
    return begin, end, dtype, tuple(shape)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read from `offset` into `view` without moving the descriptor's position (threads share it)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    chunk = os.pread(fd, min(len(view), WRITE_BYTES), offset)  # where preadv is missing (older macOS)
    view[: len(chunk)] = chunk
    return len(chunk)


def _is_count(value: object) -> bool:
    """A JSON integer that can be a size or offset: not a bool, not negative, within int64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


# Linux's value, not yet named by Python's mmap module on every version this project supports
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def _advise(mapped: mmap.mmap, advice: int | None, *span: int) -> None:
    """`mapped.madvise(advice, *span)` where the system has it: advice only, so a refusal (no transparent huge
    pages) changes nothing."""
    if advice is not None:
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(advice, *span)


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
                if np.size(chunk) == 0:  # nothing to write (and no byte view of a shape with a zero)
                    continue
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

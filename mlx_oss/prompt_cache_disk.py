"""Prompt caches on disk: the KV state of a long or repeated prompt, so a new process that meets the same prefix (a
restarted server, the next agent session) skips its prefill.

Layout: `ROOT/CACHEDIR.TAG` marks the folder as ours (a non-empty folder without it is never written to or cleaned);
`ROOT/MODEL/KEY.safetensors` holds a `CacheState` and its tokens, `ROOT/MODEL/KEY.tokens` the same tokens as raw
int32, read to find the entry sharing the longest prefix without opening the states. MODEL is a hash of the model's
identity (`model_identity`), KEY one of the identity and the tokens.

Nothing read is trusted: a state is used only if its file names this format, the model identity and the exact
tokens, and the sha256 of its arrays matches; anything else is removed with one warning and the prompt is
prefilled. Files are written under a temporary name and renamed, so a reader or a second writer of the same entry
sees a whole file or none. The folder is bounded by a byte budget, least recently used (the `.tokens` file's mtime,
touched on each use) removed first. A failing write (a read-only or full disk) turns writing off for the process
with one warning; reuse goes on from what is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .backend import CacheState
from .errors import MlxOssError
from .generate import common_prefix_length
from .safetensors_io import DTYPES, SafetensorsFile, TensorSpec, write_safetensors

log = logging.getLogger(__name__)

FORMAT = "mlx-oss-prompt-cache/1"
TAG = "CACHEDIR.TAG"
TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n# mlx-oss prompt cache: KV states of prompts; safe to delete.\n"
)
TOKENS = "tokens"  # the state file's tensor of the entry's tokens (int32)
STALE_SECONDS = 3600  # a temporary file this old belongs to a writer that died
MODEL_FOLDER = re.compile("[0-9a-f]{32}")  # the first characters of a model identity
SAFETENSORS_NAMES = {DTYPES[name]: name for name in ("F32", "F16", "U16", "I32", "I64", "U8")}


def model_identity(model) -> str | None:
    """A hash that changes when the model's weights, config, backend or cache kind change, even under the same
    folder: its config and each file's name, size, modification time and target (a hub snapshot links each file to
    a blob named by its hash). None when the model has no folder (nothing to key a disk cache by)."""
    directory = getattr(getattr(model, "checkpoint", None), "directory", None)
    if directory is None:
        return None
    cache = model.new_cache()
    facts: dict[str, object] = {
        "backend": getattr(model, "backend", ""),
        "cache": f"{type(cache).__module__}.{type(cache).__qualname__}",
        "kernels": str(getattr(model, "uses_kernels", "")),
    }
    try:
        for path in sorted(Path(directory).iterdir()):
            if path.is_file():
                st = path.stat()
                facts[path.name] = [st.st_size, st.st_mtime_ns, Path(os.path.realpath(path)).name]
        facts["config.json"] = hashlib.sha256((Path(directory) / "config.json").read_bytes()).hexdigest()
    except OSError:
        return None
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _made_by_us(name: str) -> bool:
    """A name this module gives in the root: the tag (or its temporary file) or a model's folder."""
    return name == TAG or (name.startswith(f".{TAG}.") and name.endswith(".tmp")) or MODEL_FOLDER.fullmatch(name)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


class DiskPromptCache:
    """The entries of one model in `root`, at most `budget` bytes in the whole folder."""

    def __init__(self, root: Path, model_id: str, budget: int):
        self.root, self.model_id, self.budget = Path(root), model_id, budget
        self.folder = self.root / model_id[:32]
        self.writable = True
        self._tokens: dict[str, tuple[int, ...]] = {}  # KEY -> tokens, of the `.tokens` files read so far
        self._warned: set[str] = set()

    def warn(self, topic: str, message: str) -> None:
        """One line per kind of problem per process: a cold prefill is the only consequence."""
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning("prompt cache: %s", message)

    def key(self, tokens: Sequence[int]) -> str:
        h = hashlib.sha256(self.model_id.encode())
        h.update(np.asarray(tokens, "<i4").tobytes())
        return h.hexdigest()[:40]

    # Finding and reading

    def lookup(self, prompt: Sequence[int], limit: int) -> tuple[str, tuple[int, ...], int] | None:
        """The entry sharing the longest prefix with `prompt` (counted up to `limit` tokens): its key, tokens and
        that length; None when none shares a token."""
        best = None
        for key, tokens in self._entries().items():
            shared = min(common_prefix_length(tokens, prompt), limit)
            if shared > 0 and (best is None or shared > best[2]):
                best = key, tokens, shared
        return best

    def _entries(self) -> dict[str, tuple[int, ...]]:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return {}
        found = {}
        for name in names:
            key, dot, ext = name.partition(".")
            if ext != "tokens" or not dot:
                continue
            if key not in self._tokens:
                try:
                    raw = (self.folder / name).read_bytes()
                except OSError:
                    continue
                tokens = tuple(int(t) for t in np.frombuffer(raw[: len(raw) // 4 * 4], "<i4"))
                if len(raw) % 4 or not tokens or self.key(tokens) != key:
                    self.warn("damaged", f"removing {self.folder / name}: its tokens do not match its name")
                    self.discard(key)
                    continue
                self._tokens[key] = tokens
            found[key] = self._tokens[key]
        return found

    def load(self, key: str, tokens: Sequence[int]) -> CacheState | None:
        """The state saved for `tokens` under `key`, checked whole; None (the entry removed) when anything in it
        is not what this model and these tokens wrote."""
        path = self.folder / f"{key}.safetensors"
        if not path.exists():  # removed by another process since the listing (its budget, or a longer entry)
            self.discard(key)
            return None
        try:
            state = self._read(path, tokens)
        except (OSError, MlxOssError, ValueError, KeyError, TypeError) as e:
            self.warn("damaged", f"ignoring and removing {path}: {e}")
            self.discard(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(self.folder / f"{key}.tokens")
        return state

    def _read(self, path: Path, tokens: Sequence[int]) -> CacheState:
        file = SafetensorsFile(path)
        meta = file.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("model") != self.model_id:
            raise ValueError("written for another model (or the model changed since)")
        arrays = {name: file.read(name) for name in file.tensors}
        if _digest(arrays) != meta.get("sha256"):
            raise ValueError("its data does not match its sha256 (damaged or edited)")
        saved = arrays.pop(TOKENS, None)
        if saved is None or saved.tolist() != list(tokens):
            raise ValueError("holds other tokens than its name says")
        length = int(meta["length"])
        if length != len(tokens):
            raise ValueError(f"length {length} for {len(tokens)} tokens")
        info = json.loads(meta["info"])
        if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
            raise ValueError("its info is not a table of text")
        return CacheState(meta["kind"], length, arrays, info)

    def discard(self, key: str) -> None:
        self._tokens.pop(key, None)
        for ext in ("tokens", "safetensors"):
            with contextlib.suppress(OSError):
                (self.folder / f"{key}.{ext}").unlink()

    # Writing

    def save(self, tokens: Sequence[int], state: CacheState) -> bool:
        """Write `state`, the cache of `tokens`; False when it was not written (writing off, over the budget, or
        an entry holding these tokens and more is there already). Never raises for the file system's sake."""
        tokens = tuple(int(t) for t in tokens[: state.length])
        if not self.writable or len(tokens) != state.length or not tokens:
            return False
        arrays = {**state.arrays, TOKENS: np.asarray(tokens, np.int32)}
        size = sum(a.nbytes for a in arrays.values())
        if size > self.budget:
            log.debug("prompt cache: a state of %d bytes exceeds the disk budget of %d", size, self.budget)
            return False
        try:
            if not self._ours():
                return False
            self.folder.mkdir(exist_ok=True)
            entries = self._entries()
            for other in entries.values():
                if other[: len(tokens)] == tokens:  # this entry or a longer one serves every prompt ours would
                    return False
            self._make_room(size)
            self._write(tokens, arrays, state)
            for key, other in entries.items():
                if tokens[: len(other)] == other:  # shorter entries ours serves as well
                    self.discard(key)
        except OSError as e:
            self.writable = False
            self.warn("write", f"not saving prompts to {self.root} any more in this process: {e.strerror or e}")
            return False
        return True

    def _ours(self) -> bool:
        """Whether `root` is our folder: made here (with its tag), or empty; never a folder of someone else's."""
        tag = self.root / TAG
        if tag.is_file() and not tag.is_symlink():
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        if not all(_made_by_us(path.name) for path in self.root.iterdir()):  # another process may be making it
            self.writable = False
            self.warn("foreign", f"{self.root} holds files that are not a prompt cache's; not writing there")
            return False
        write_atomically(tag, TAG_TEXT)
        return True

    def _write(self, tokens: tuple[int, ...], arrays: dict[str, np.ndarray], state: CacheState) -> None:
        key = self.key(tokens)
        metadata = {
            "format": FORMAT,
            "model": self.model_id,
            "kind": state.kind,
            "length": str(state.length),
            "info": json.dumps(state.info, sort_keys=True),
            "sha256": _digest(arrays),
        }
        specs = [
            TensorSpec(name, SAFETENSORS_NAMES[array.dtype], array.shape, lambda array=array: [array])
            for name, array in arrays.items()
        ]
        final = self.folder / f"{key}.safetensors"
        temporary = self.folder / f".{key}.{secrets.token_hex(4)}.tmp"
        try:
            write_safetensors(temporary, specs, metadata)  # streams the arrays: no second copy of the state
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        write_atomically(self.folder / f"{key}.tokens", np.asarray(tokens, "<i4").tobytes())
        self._tokens[key] = tokens

    def _make_room(self, size: int) -> None:
        """Remove least recently used entries (of any model) until `size` more bytes fit the budget."""
        entries = []  # (last use, bytes, folder, key)
        now = time.time()
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in folder.iterdir():
                with contextlib.suppress(OSError):
                    st = path.stat()
                    if path.name.endswith(".tmp") and now - st.st_mtime > STALE_SECONDS:
                        path.unlink()
                    elif path.suffix == ".safetensors":
                        used = (path.with_suffix(".tokens")).stat().st_mtime
                        entries.append((used, st.st_size, folder, path.stem))
        total = sum(e[1] for e in entries)
        for _, nbytes, folder, key in sorted(entries):
            if total + size <= self.budget:
                break
            if folder == self.folder:
                self.discard(key)
            else:
                for ext in ("tokens", "safetensors"):
                    with contextlib.suppress(OSError):
                        (folder / f"{key}.{ext}").unlink()
            total -= nbytes

    def nbytes(self) -> int:
        """Bytes of this model's entries on disk."""
        try:
            return sum(p.stat().st_size for p in self.folder.iterdir() if p.suffix in (".safetensors", ".tokens"))
        except OSError:
            return 0

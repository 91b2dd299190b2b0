"""The model store: where models live on this computer, found by their hub name.

Downloads go where the Hugging Face tools put them, so a model fetched by mlx-lm or transformers is found here
too and the other way round: the hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
one `models--ORG--NAME` folder per repository. `MLX_OSS_MODELS` moves the store elsewhere. Converted layouts live
beside their source, in `models--ORG--NAME/mlx-oss/{mlx,numpy,mxfp4}` (the hub's cache tools ignore that folder and
delete it with the repository). Our downloads count as present once verified (`mlx-oss/verified.json` names
their revision and files); one made by another Hugging Face tool counts once the `refs/main` snapshot holds its
config and every shard. Nothing here touches the network.

Everything read from the cache folder (folder names, `refs/main`, our record, an index) may have been written by
another tool, a crash or a hostile mirror: names, hashes and paths are checked before they become paths, and one
damaged folder is skipped (and named) rather than ending `list`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_atomically
from .errors import MlxOssError
from .json_input import parse_json
from .layouts import CONVERTED, HF, MXFP4, UNQUANTIZED, detect_layout
from .safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile

STORE_ENV = "MLX_OSS_MODELS"
# The hub's repo id rules (huggingface_hub's validate_repo_id): ORG/NAME, letters, digits and `._-`, starting and
# ending with a letter, digit or `_`, at most 96 characters a part, no `--` (the cache folder's separator) or `..`.
NAME_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
MAX_NAME_PART = 96
MAX_INDEX_BYTES = 64 << 20  # gpt-oss-120b's index is about 57 KB (687 tensor names)
COMMIT = re.compile(r"[0-9a-f]{40}")  # a git commit hash, as the hub cache names its snapshot folders
OURS = "mlx-oss"  # our folder inside a repository's cache folder
VERIFIED = "verified.json"
DEFAULT_MODEL = "openai/gpt-oss-20b"


def default_root() -> Path:
    """`MLX_OSS_MODELS`, else the hub cache huggingface_hub itself uses (`HF_HUB_CACHE`, `HF_HOME`, ...)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_hub_name(text: object) -> bool:
    if not isinstance(text, str) or len(text) > 2 * MAX_NAME_PART + 1 or text.count("/") != 1:
        return False
    org, model = text.split("/")
    return (
        all(NAME_PART.fullmatch(part) for part in (org, model))
        and "--" not in text
        and ".." not in text
        and not model.endswith(".git")
    )


def check_hub_name(name: str) -> str:
    """`name` if it is a hub model name, else one short line saying why (a megabyte of name is not echoed)."""
    if is_hub_name(name):
        return name
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) == 2 and max(len(p) for p in parts) > MAX_NAME_PART:
        raise MlxOssError(
            f"{shown(name)} is not a hub model name: {len(name)} characters, the hub allows at most "
            f"{MAX_NAME_PART} for the ORG and for the NAME"
        )
    raise MlxOssError(
        f"{shown(name)} is not a hub model name (ORG/NAME of letters, digits and ._- , for example {DEFAULT_MODEL})"
    )


def shown(text: object, limit: int = 60) -> str:
    """`text` quoted for a message, cut to `limit` characters: names and values from outside can be any length."""
    text = str(text)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def clip(text: object, limit: int = 200) -> str:
    """`text` cut to `limit` characters for a one-line message (a server's reason phrase can be 100 KB)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def is_commit(text: object) -> bool:
    return isinstance(text, str) and bool(COMMIT.fullmatch(text))


def is_safe_file(path: object) -> bool:
    """`path` is a file path inside a repository that stays inside the folder it is joined to, on every system:
    relative, no `.`/`..`/empty parts, no backslash (a separator on Windows) or drive colon; and no control
    characters, which would reach the terminal in messages and listings."""
    if not isinstance(path, str) or not 0 < len(path) <= 1024 or any(c in path for c in "\\:\x7f"):
        return False
    if min(map(ord, path)) < 32:
        return False
    return not path.startswith("/") and all(part not in ("", ".", "..") for part in path.split("/"))


@dataclass
class StoredModel:
    """A repository in the store: its verified download (if any) and the layouts converted from it."""

    name: str
    folder: Path
    revision: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # verified download: path in repo -> size
    layouts: dict[str, Path] = field(default_factory=dict)  # "hf" / "mlx" / "numpy" / "packed" / "mxfp4" -> folder

    @property
    def downloaded(self) -> bool:
        return HF in self.layouts

    @property
    def partial(self) -> bool:
        """Bytes of an unfinished download lie in the cache (a new `download` resumes them)."""
        blobs = self.folder / "blobs"
        return blobs.is_dir() and any(p.suffix == ".incomplete" for p in blobs.iterdir())

    def source_for(self, target: str) -> Path | None:
        """What converting to `target` reads: the download for `mxfp4`; for the others the download, or its MXFP4
        quantization where its experts came unquantized."""
        if target == MXFP4:
            return self.layouts.get(HF)
        return self.layouts.get(MXFP4) or self.layouts.get(HF)

    @property
    def needs_quantizing(self) -> bool:
        """The download's experts are unquantized (a fine-tune) and no MXFP4 copy of them exists yet. Told by the
        tensor names alone (the index, or one file's header): the app asks as it draws its table."""
        if HF not in self.layouts or MXFP4 in self.layouts:
            return False
        directory = self.layouts[HF]
        try:
            names = _weight_map(directory) or SafetensorsFile(directory / SINGLE_FILE).tensors
            return detect_layout(names) == UNQUANTIZED
        except (OSError, ValueError, KeyError, TypeError, MlxOssError):  # damaged: loading it says what is wrong
            return False

    def layout_for(self, backend: str = "auto") -> str | None:
        """The layout to load on `backend`: the converted one it reads fastest, else the download, else whatever
        is there (the loader then says which backend reads it); None when nothing is."""
        from .backend import fastest_layout, preferred_backend

        preferred = fastest_layout(backend if backend != "auto" else preferred_backend()[0])
        for layout in (preferred, HF, *self.layouts):
            if layout == HF and MXFP4 in self.layouts:  # the download's experts are unquantized: never loaded
                layout = MXFP4
            if layout in self.layouts:
                return layout
        return None

    def size(self, layout: str) -> int:
        directory = self.layouts[layout]
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())  # follows the hub's symlinks


class ModelStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.skipped: dict[str, str] = {}  # what the last `list` left out: entry name -> why

    def folder(self, name: str) -> Path:
        org, model = check_hub_name(name).split("/")
        return self.root / f"models--{org}--{model}"

    def converted(self, name: str, layout: str) -> Path:
        return self.folder(name) / OURS / layout

    def get(self, name: str) -> StoredModel:
        """What the store holds of `name` (possibly nothing: then `layouts` is empty)."""
        folder = self.folder(name)
        model = StoredModel(name, folder)
        record = _read_record(folder / OURS / VERIFIED)
        if record is not None:
            model.revision, model.files = record
            snapshot = folder / "snapshots" / model.revision
            if all((snapshot / f).is_file() for f in model.files):
                model.layouts[HF] = snapshot
        if HF not in model.layouts and (snapshot := _complete_snapshot(folder)) is not None:
            model.layouts[HF] = snapshot  # fetched by another Hugging Face tool, which checked the sizes
        for layout in CONVERTED:
            if (folder / OURS / layout / "config.json").is_file():
                model.layouts[layout] = folder / OURS / layout
        return model

    def list(self) -> list[StoredModel]:
        """Every repository in the store that holds something of a model (partial downloads included).

        An entry named like a model folder that cannot be one (a file, a name the hub would refuse, an unreadable
        folder) is left out and named in `self.skipped`; the hub cache's other entries (datasets, one-part names
        such as `models--gpt2`) are not ours to list."""
        self.skipped = {}
        try:
            entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        except OSError as e:
            raise MlxOssError(f"cannot read the model store {self.root}: {e.strerror or e}") from None
        found = []
        for folder in entries:
            parts = folder.name.split("--")
            if parts[0] != "models" or len(parts) < 3:
                continue
            name = "/".join(parts[1:]) if len(parts) == 3 else "--".join(parts[1:])
            try:
                if not folder.is_dir():
                    raise MlxOssError("not a folder")
                stored = self.get(check_hub_name(name))
                if stored.layouts or stored.partial:
                    found.append(stored)
            except (OSError, MlxOssError) as e:
                self.skipped[folder.name] = _reason(e)
        return found

    def record_download(self, name: str, revision: str, files: dict[str, int]) -> None:
        """Mark `name` at `revision` as downloaded and verified (written last, atomically)."""
        ours = self.folder(name) / OURS
        ours.mkdir(parents=True, exist_ok=True)
        write_atomically(ours / VERIFIED, json.dumps({"revision": revision, "files": files}, indent=2) + "\n")

    def delete(self, name: str, layout: str | None = None) -> list[Path]:
        """Remove one converted layout, or (`layout` None) the whole repository folder. Returns what went."""
        model = self.get(name)
        if layout in CONVERTED:
            if layout not in model.layouts:
                raise MlxOssError(f"{name} has no {layout} layout in {self.root}")
            shutil.rmtree(model.layouts[layout])
            return [model.layouts[layout]]
        if layout not in (None, HF):
            raise MlxOssError(f"unknown layout {layout!r}; choose {', '.join((HF, *CONVERTED))}")
        if not model.folder.exists():
            raise MlxOssError(f"{name} is not in the store ({self.root})")
        shutil.rmtree(model.folder)
        return [model.folder]

    def resolve(self, name: str, backend: str = "auto") -> Path:
        """The directory to load for `name` on `backend`: the converted layout that backend reads fastest if
        there is one, else the downloaded checkpoint. Raises with the command that would get the model."""
        model = self.get(name)
        layout = model.layout_for(backend)
        if layout is not None:
            return model.layouts[layout]
        hint = " (a download was interrupted: run it again to resume)" if model.partial else ""
        raise MlxOssError(
            f"{name} is not on this computer{hint}; get it with: python -m mlx_oss.models download {name}"
        )


def _reason(error: Exception) -> str:
    return (error.strerror or str(error)) if isinstance(error, OSError) else str(error)


def _read_record(path: Path) -> tuple[str, dict[str, int]] | None:
    """Our record of a verified download (revision, path -> size), or None where there is none or it cannot be
    trusted (unreadable, not the shape we write): then the download counts as not verified."""
    try:
        if not path.is_file():
            return None
        data = parse_json(path.read_bytes())
        revision, files = data["revision"], data["files"]
    except (OSError, ValueError, KeyError, TypeError):  # JsonInputError is a ValueError
        return None
    if not is_commit(revision) or not isinstance(files, dict):
        return None
    sizes_ok = all(type(size) is int and size >= 0 for size in files.values())
    return (revision, dict(files)) if sizes_ok and all(is_safe_file(f) for f in files) else None


def _weight_map(directory: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, or None where there is no index (a single-file checkpoint). An index that
    is not one (invalid JSON, another shape, a shard path leaving the folder) raises MlxOssError naming it."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return None
    if index.stat().st_size > MAX_INDEX_BYTES:  # a mirror lists and sends what it likes: not parsed into memory
        raise MlxOssError(f"{index}: {index.stat().st_size} bytes, more than an index of tensor names can be")
    try:
        data = parse_json(index.read_bytes())
    except ValueError as e:  # JsonInputError, or an integer too long to convert
        raise MlxOssError(f"{index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise MlxOssError(f'{index}: no "weight_map" object of tensor names and their files')
    for tensor, shard in weight_map.items():
        if not is_safe_file(shard):
            raise MlxOssError(f"{index}: tensor {shown(tensor)} lies in {shown(shard)}, not a file in this folder")
    return weight_map


def _complete_snapshot(folder: Path) -> Path | None:
    """The snapshot `refs/main` points at, if its config and every shard its index lists are there."""
    try:
        with open(folder / "refs" / "main", "rb") as ref:
            commit = ref.read(100).decode("ascii", "replace").strip()
        if not is_commit(commit):
            return None
        snapshot = folder / "snapshots" / commit
        weight_map = _weight_map(snapshot)
        shards = set(weight_map.values()) if weight_map is not None else {SINGLE_FILE}
    except (OSError, MlxOssError):
        return None
    complete = (snapshot / "config.json").is_file() and all((snapshot / shard).is_file() for shard in shards)
    return snapshot if complete else None


def resolve_model(arg: str, backend: str = "auto", store: ModelStore | None = None) -> Path:
    """The model directory `arg` names: a directory on disk, or a hub name (ORG/NAME) looked up in the store."""
    path = Path(arg).expanduser()
    try:
        if path.is_dir():
            return path
        exists, parent_is_dir = path.exists(), path.parent.is_dir()
    except OSError as e:  # a name too long for the file system, a folder we may not look into
        if arg.count("/") == 1:
            check_hub_name(arg)  # an ORG/NAME too long: say that rather than what the file system said
        raise MlxOssError(f"{shown(arg)}: {e.strerror or e}") from None
    if exists:
        raise MlxOssError(f"{arg}: not a directory; give a model directory or a hub name such as {DEFAULT_MODEL}")
    if is_hub_name(arg) and not parent_is_dir:  # "models/x" with a local models/ folder is a path
        return (store or ModelStore()).resolve(arg, backend)
    if "/" in arg and not parent_is_dir and len(arg) > 2 * MAX_NAME_PART + 1:
        check_hub_name(arg)  # says the name is longer than the hub allows
    raise MlxOssError(f"{shown(arg, 200)}: no such model directory")

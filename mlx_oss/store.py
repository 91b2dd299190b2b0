"""The model store: where models live on this computer, found by their hub name.

Downloads go where the Hugging Face tools put them, so a model fetched by mlx-lm or transformers is found here
too and the other way round: the hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
one `models--ORG--NAME` folder per repository. `MLX_OSS_MODELS` moves the store elsewhere. Converted layouts live
beside their source, in `models--ORG--NAME/mlx-oss/{mlx,numpy,mxfp4}` (the hub's cache tools ignore that folder and
delete it with the repository). Our downloads count as present once verified (`mlx-oss/verified.json` names
their revision and files); one made by another Hugging Face tool counts once the `refs/main` snapshot holds its
config and every shard. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MlxOssError
from .layouts import HF, MLX, MXFP4, NUMPY, UNQUANTIZED, detect_layout
from .safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile

STORE_ENV = "MLX_OSS_MODELS"
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OURS = "mlx-oss"  # our folder inside a repository's cache folder
VERIFIED = "verified.json"
DEFAULT_MODEL = "openai/gpt-oss-20b"


def default_root() -> Path:
    """`MLX_OSS_MODELS`, else the hub cache huggingface_hub itself uses (`HF_HUB_CACHE`, `HF_HOME`, ...)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_hub_name(text: str) -> bool:
    return bool(HUB_NAME.fullmatch(text)) and ".." not in text


@dataclass
class StoredModel:
    """A repository in the store: its verified download (if any) and the layouts converted from it."""

    name: str
    folder: Path
    revision: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # verified download: path in repo -> size
    layouts: dict[str, Path] = field(default_factory=dict)  # "hf" / "mlx" / "numpy" / "mxfp4" -> directory

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
        from .loading import is_apple_silicon, numpy_reads_fastest

        preferred = backend if backend != "auto" else (MLX if is_apple_silicon() else NUMPY)
        if preferred == NUMPY:
            preferred = numpy_reads_fastest()
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

    def folder(self, name: str) -> Path:
        if not is_hub_name(name):
            raise MlxOssError(f"{name!r} is not a hub model name (ORG/NAME, for example {DEFAULT_MODEL})")
        org, model = name.split("/")
        return self.root / f"models--{org}--{model}"

    def converted(self, name: str, layout: str) -> Path:
        return self.folder(name) / OURS / layout

    def get(self, name: str) -> StoredModel:
        """What the store holds of `name` (possibly nothing: then `layouts` is empty)."""
        folder = self.folder(name)
        model = StoredModel(name, folder)
        record = folder / OURS / VERIFIED
        if record.is_file():
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
                model.revision, model.files = data["revision"], dict(data["files"])
            except (OSError, ValueError, KeyError, TypeError):
                model.revision = None  # an unreadable record: as if never verified
            snapshot = folder / "snapshots" / str(model.revision)
            if model.revision and all((snapshot / f).is_file() for f in model.files):
                model.layouts[HF] = snapshot
        if HF not in model.layouts and (snapshot := _complete_snapshot(folder)) is not None:
            model.layouts[HF] = snapshot  # fetched by another Hugging Face tool, which checked the sizes
        for layout in (MLX, NUMPY, MXFP4):
            if (folder / OURS / layout / "config.json").is_file():
                model.layouts[layout] = folder / OURS / layout
        return model

    def list(self) -> list[StoredModel]:
        """Every repository in the store that holds something of a model (partial downloads included)."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.glob("models--*--*")):
            _, org, model = folder.name.split("--", 2)
            stored = self.get(f"{org}/{model}")
            if stored.layouts or stored.partial:
                found.append(stored)
        return found

    def record_download(self, name: str, revision: str, files: dict[str, int]) -> None:
        """Mark `name` at `revision` as downloaded and verified (written last, atomically)."""
        ours = self.folder(name) / OURS
        ours.mkdir(parents=True, exist_ok=True)
        temporary = ours / f".{VERIFIED}.tmp"
        temporary.write_text(json.dumps({"revision": revision, "files": files}, indent=2) + "\n")
        os.replace(temporary, ours / VERIFIED)

    def delete(self, name: str, layout: str | None = None) -> list[Path]:
        """Remove one converted layout, or (`layout` None) the whole repository folder. Returns what went."""
        model = self.get(name)
        if layout in (MLX, NUMPY, MXFP4):
            if layout not in model.layouts:
                raise MlxOssError(f"{name} has no {layout} layout in {self.root}")
            shutil.rmtree(model.layouts[layout])
            return [model.layouts[layout]]
        if layout not in (None, HF):
            raise MlxOssError(f"unknown layout {layout!r}; choose hf, mlx, numpy or mxfp4")
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


def _weight_map(directory: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, or None where there is no index (a single-file checkpoint)."""
    index = directory / INDEX_FILE
    return json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index.is_file() else None


def _complete_snapshot(folder: Path) -> Path | None:
    """The snapshot `refs/main` points at, if its config and every shard its index lists are there."""
    try:
        snapshot = folder / "snapshots" / (folder / "refs" / "main").read_text().strip()
        weight_map = _weight_map(snapshot)
        shards = set(weight_map.values()) if weight_map is not None else {SINGLE_FILE}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    complete = (snapshot / "config.json").is_file() and all((snapshot / shard).is_file() for shard in shards)
    return snapshot if complete else None


def resolve_model(arg: str, backend: str = "auto", store: ModelStore | None = None) -> Path:
    """The model directory `arg` names: a directory on disk, or a hub name (ORG/NAME) looked up in the store."""
    path = Path(arg).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MlxOssError(f"{arg}: not a directory; give a model directory or a hub name such as {DEFAULT_MODEL}")
    if is_hub_name(arg) and not path.parent.is_dir():  # "models/x" with a local models/ folder is a path
        return (store or ModelStore()).resolve(arg, backend)
    raise MlxOssError(f"{arg}: no such model directory")

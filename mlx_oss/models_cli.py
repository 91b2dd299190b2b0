"""`python -m mlx_oss.models`: the models on this computer: list, download, convert, delete, info.

Models live in the model store (`mlx_oss.store`): the Hugging Face hub cache, or `MLX_OSS_MODELS`.
"""
# This module is the command's code; `mlx_oss/models.py` only runs it, so that the command keeps its short name.

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .backend import BACKENDS
from .cancel import CancelToken
from .cli import Progress, add_kv_bits_argument, context_length, format_bytes, format_count
from .errors import MlxOssError
from .layouts import CONVERTED, HF, MXFP4, parameter_count
from .store import DEFAULT_MODEL, ModelStore, StoredModel, shown

PROG = "python -m mlx_oss.models"


def download_with_progress(name: str, store: ModelStore, revision: str = "main") -> Path:
    """Download `name` with a progress line on stderr; Ctrl-C stops it and keeps what arrived."""
    from .hub import DownloadProgress, download

    progress: Progress | None = None

    def show(p: DownloadProgress) -> None:
        nonlocal progress
        if progress is None:
            progress = Progress(f"downloading {name}", p.total_bytes)
        progress.set(p.done_bytes, f"{p.bytes_per_s / 1e6:.1f} MB/s")

    try:
        path = download(name, store, revision, on_progress=show, cancel=CancelToken())
    except KeyboardInterrupt:
        raise MlxOssError(f"download of {name} interrupted; run the same command to resume") from None
    print(f"{name} is in {path}")
    return path


def loads_with(model: StoredModel) -> str:
    """What `--backend auto` would run for this model, and from which layout."""
    from .backend import choose_backend

    if model.needs_quantizing:
        return f"nothing yet: its experts are unquantized; {PROG} convert {model.name} --to {MXFP4} makes it run"
    layout = model.layout_for("auto")
    backend, _ = choose_backend("auto", layout)
    return f"{backend} ({layout} layout)"


def list_models(store: ModelStore) -> int:
    models = store.list()
    if not models:
        print(f"no models in {store.root}; get one with: {PROG} download {DEFAULT_MODEL}")
    else:
        rows = [("NAME", "LAYOUTS", "SIZE", "LOADS WITH")]
        for m in models:
            if not m.layouts:
                rows.append((m.name, "-", "-", f"partial download: {PROG} download {m.name} resumes it"))
                continue
            try:
                size = format_bytes(sum(m.size(layout) for layout in m.layouts))
            except OSError:  # a file we may not look at: the rest of the row still says what is there
                size = "?"
            rows.append((m.name, ", ".join(m.layouts), size, loads_with(m)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[3])
        print(f"(store: {store.root})")
    if store.skipped:  # one line, however many: a damaged entry must not hide the models
        names = ", ".join(shown(name) for name in list(store.skipped)[:5])
        more = f" and {len(store.skipped) - 5} more" if len(store.skipped) > 5 else ""
        print(f"(skipped {len(store.skipped)} entries that are not model folders: {names}{more})")
    return 0


def info(
    store: ModelStore, name: str, context: int | str = 8192, kv_bits: int | None = None, backend: str = "auto"
) -> int:
    from .config import ModelConfig

    path = Path(name).expanduser()
    try:
        is_directory = path.is_dir()
    except OSError:  # a name too long for the file system: the store says what is wrong with it as a hub name
        is_directory = False
    if is_directory:  # a model directory, not in the store
        config = ModelConfig.from_file(path / "config.json")
        print(f"{path}")
        print(f"  model         {_model_line(config)}")
        print_memory(path, backend, context, kv_bits)
        return 0
    model = store.get(name)
    if not model.layouts:
        raise MlxOssError(f"{name} is not on this computer; get it with: {PROG} download {name}")
    directory = next(iter(model.layouts.values()))
    config = ModelConfig.from_file(directory / "config.json")
    print(f"{name}")
    print(f"  revision      {model.revision or '-'}")
    print(f"  model         {_model_line(config)}")
    for layout, path in model.layouts.items():
        print(f"  {layout:<13} {format_bytes(model.size(layout)):>8}  {path}")
    print(f"  loads with    {loads_with(model)}")
    layout = model.layout_for(backend)
    if layout is not None and not model.needs_quantizing:
        print_memory(model.layouts[layout], backend, context, kv_bits)
    return 0


def _model_line(config) -> str:
    return (
        f"{format_count(parameter_count(config))} parameters, {config.num_hidden_layers} layers, "
        f"{config.num_local_experts} experts ({config.num_experts_per_tok} per token), "
        f"context {config.max_position_embeddings}"
    )


def print_memory(directory: Path, backend: str, context: int | str, kv_bits: int | None) -> None:
    """The memory estimate of loading `directory` at `context`, and the longest context that fits."""
    from .backend import choose_backend
    from .memory_estimate import (
        TIGHT,
        check_context,
        describe,
        largest_context,
        machine_memory,
        on_metal,
        read_model_files,
    )

    files = read_model_files(directory)
    chosen, _ = choose_backend(backend, files.layout)
    machine = machine_memory(chosen)
    check = check_context(files, chosen, context, kv_bits, machine)
    e = check.estimate
    print(f"  memory at {e.context} tokens:")
    for line in describe(e, check.verdict):
        print(f"    {line}")
    if machine.total is None:
        print("    (this computer's memory could not be read)")
        return
    metal = chosen == "mlx" and on_metal()
    args = (files.config, chosen, files.layout, files.file_bytes, machine, kv_bits, metal)
    fits, tight = largest_context(*args), largest_context(*args, accept=("fits", TIGHT))
    print(f"    longest context that fits: {fits or 'none'}" + (f" (tight: {tight})" if tight > fits else ""))


def convert(store: ModelStore, name: str, target: str, q8: bool) -> int:
    from .converters.layout import convert as convert_layout

    model = store.get(name)
    if HF not in model.layouts:
        raise MlxOssError(f"{name} is not downloaded; first run: {PROG} download {name}")
    if target != MXFP4 and model.needs_quantizing:
        raise MlxOssError(f"{name}'s experts are unquantized; first run: {PROG} convert {name} --to {MXFP4}")
    if target in model.layouts:
        raise MlxOssError(
            f"{name} already has the {target} layout; delete it first with: {PROG} delete {name} --layout {target}"
        )
    progress = Progress(f"converting {name} to the {target} layout", 0)

    def start(total: int) -> None:
        progress.total = total

    destination = store.converted(name, target)
    convert_layout(model.source_for(target), destination, target, q8, on_bytes=progress.add, on_start=start)
    print(f"{name}: {target} layout in {destination}")
    return 0


def delete(store: ModelStore, name: str, layout: str | None, yes: bool) -> int:
    model = store.get(name)
    what = f"the {layout} layout of {name}" if layout in CONVERTED else f"{name} (every layout)"
    if layout in CONVERTED and layout in model.layouts:
        size = model.size(layout)
    else:
        size = sum(model.size(x) for x in model.layouts)
    if not yes:
        if not sys.stdin.isatty():
            raise MlxOssError(f"deleting {what} needs --yes when not run from a terminal")
        answer = input(f"Delete {what} ({format_bytes(size)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    for path in store.delete(name, layout):
        print(f"deleted {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="models on this computer, their layouts and sizes")
    sub = commands.add_parser("download", help="download a model from the hub (resumes an interrupted download)")
    sub.add_argument("name", help=f"hub name, e.g. {DEFAULT_MODEL}")
    sub.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    sub = commands.add_parser(
        "convert",
        help="convert a downloaded model to the MLX, NumPy or packed layout (mxfp4: quantize unquantized experts)",
    )
    sub.add_argument("name")
    sub.add_argument("--to", choices=CONVERTED, required=True)
    sub.add_argument("--q8", action="store_true", help="LOSSY 8-bit attention and embeddings (MLX layout only)")
    sub = commands.add_parser("delete", help="delete a model, or one of its converted layouts")
    sub.add_argument("name")
    sub.add_argument("--layout", choices=(HF, *CONVERTED), help="only this layout (hf: the whole model)")
    sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub = commands.add_parser(
        "info", help="what a model is, where its files are, which backend would run it, the memory it needs"
    )
    sub.add_argument("name", help="a hub name in the store, or a model directory")
    sub.add_argument(
        "--context", type=context_length, default=8192, help="tokens of context to estimate memory for (or auto)"
    )
    add_kv_bits_argument(sub, "estimate with a quantized KV cache")
    sub.add_argument("--backend", choices=BACKENDS, default="auto", help="estimate for this backend (default auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = ModelStore()
    if args.command == "list":
        return list_models(store)
    if args.command == "download":
        download_with_progress(args.name, store, args.revision)
        return 0
    if args.command == "convert":
        return convert(store, args.name, args.to, args.q8)
    if args.command == "delete":
        return delete(store, args.name, args.layout, args.yes)
    return info(store, args.name, args.context, args.kv_bits, args.backend)

"""`python -m mlx_oss.converters`: convert a gpt-oss checkpoint to the MLX, NumPy or packed layout, quantize unquantized
experts to MXFP4, or write a synthetic checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_oss.cli import Progress, format_bytes, run

from . import layout
from .synthetic import PRESETS, SynthOptions, preset_config, total_bytes, write_synthetic

PROG = "python -m mlx_oss.converters"


def _size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser(
        "synth",
        help="write a checkpoint of random weights in the exact Hugging Face gpt-oss layout",
        description="Write random weights in the Hugging Face gpt-oss layout (BF16, MXFP4 experts, "
        "sharded safetensors with an index) for tests and benchmarks.",
    )
    synth.add_argument("out", type=Path, help="directory to create (must not exist)")
    synth.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    synth.add_argument("--seed", type=int, default=0)
    shape = synth.add_argument_group("shape overrides")
    for flag, field in [
        ("--layers", "num_hidden_layers"),
        ("--hidden-size", "hidden_size"),
        ("--intermediate-size", "intermediate_size"),
        ("--experts", "num_local_experts"),
        ("--experts-per-token", "num_experts_per_tok"),
        ("--heads", "num_attention_heads"),
        ("--kv-heads", "num_key_value_heads"),
        ("--head-dim", "head_dim"),
        ("--vocab-size", "vocab_size"),
        ("--sliding-window", "sliding_window"),
    ]:
        shape.add_argument(flag, type=int, dest=field, metavar="N")
    shape.add_argument(
        "--rope-truncate",
        action="store_true",
        default=None,
        dest="truncate",
        help="round YaRN's correction range as mlx-lm does (the real models do not)",
    )
    synth.add_argument(
        "--expert-bias-std",
        type=float,
        default=0.1,
        help="spread of the expert gate/up biases; a few units make the SwiGLU clamp active",
    )
    synth.add_argument(
        "--shard-size",
        type=_size,
        default=5_000_000_000,
        metavar="BYTES",
        help="largest shard, e.g. 5GB (default) or 200MB",
    )
    synth.add_argument("--single-file", action="store_true", help="one model.safetensors, no index")
    synth.add_argument(
        "--unquantized",
        action="store_true",
        help="experts as BF16 matrices, as transformers saves a dequantized gpt-oss (what `mxfp4` converts)",
    )

    for target, description in (
        (
            "mlx",
            "Repack a Hugging Face gpt-oss checkpoint for MLX: the MXFP4 experts losslessly into MLX's layout "
            "(mlx-lm's names, so mlx_lm loads it too), everything else as it is.",
        ),
        (
            "numpy",
            "Repack a Hugging Face gpt-oss checkpoint for the NumPy backend: fused q/k/v and float32 small "
            "tensors, memory-mapped as they are; experts and embeddings unchanged.",
        ),
        (
            "packed",
            "Repack a Hugging Face gpt-oss checkpoint for the NumPy backend's compiled kernels: the BF16 matrices "
            "every decoded token reads whole (attention projections, unembedding) packed losslessly into 12 bits "
            "a weight, 25 % fewer bytes a token; still the Hugging Face layout to every other reader.",
        ),
        (
            "mxfp4",
            "Quantize unquantized experts back to MXFP4: a gpt-oss checkpoint whose experts transformers saved "
            "as BF16 matrices (a dequantized or fine-tuned model) becomes the published Hugging Face layout, which "
            "every backend and converter reads. Lossless for weights that were MXFP4; others round to the "
            "nearest MXFP4 value.",
        ),
    ):
        sub = commands.add_parser(target, help=description.split(":")[0].lower(), description=description)
        sub.add_argument("source", type=Path, help="gpt-oss model directory in the Hugging Face format (only read)")
        sub.add_argument("destination", type=Path, help="directory to create (must not exist)")
        if target == "mlx":
            sub.add_argument(
                "--q8",
                action="store_true",
                help="LOSSY: store attention projections and embeddings in 8 bits (MLX affine, group 64); "
                "1.7 GB smaller for gpt-oss-20b (13.76 -> 12.08 GB), logits no longer exactly the checkpoint's",
            )
        sub.add_argument("--shard-size", type=_size, default=5_000_000_000, metavar="BYTES", help="largest shard")
    return parser


def convert(args: argparse.Namespace) -> int:
    q8 = getattr(args, "q8", False)
    progress = Progress(f"converting to {args.destination}", 0)

    def start(total: int) -> None:
        progress.total = total

    layout.convert(
        args.source, args.destination, args.command, q8, args.shard_size, on_bytes=progress.add, on_start=start
    )
    lossy = " (8-bit attention and embeddings: lossy)" if q8 else ""
    size = format_bytes(progress.total)
    print(f"wrote the {args.command} layout of {args.source} to {args.destination} ({size}){lossy}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in layout.TARGETS:
        return convert(args)
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k not in {"command", "out", "preset", "seed", "expert_bias_std", "shard_size", "single_file", "unquantized"}
    }
    config = preset_config(args.preset, **overrides)
    options = SynthOptions(args.seed, args.expert_bias_std, args.shard_size, args.single_file, args.unquantized)
    progress = Progress(f"writing {args.out}", total_bytes(config, options))
    write_synthetic(args.out, config, options, on_bytes=progress.add)
    print(f"wrote a synthetic {args.preset} checkpoint to {args.out} ({format_bytes(progress.total)})")
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)

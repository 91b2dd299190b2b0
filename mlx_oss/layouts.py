"""The three on-disk layouts of a gpt-oss model, and the repacks from the Hugging Face one.

- `hf`: the hub's checkpoint. MXFP4 experts as `*_blocks [E, rows, G, 16]` / `*_scales` uint8 with gate and
  up rows interleaved, everything else BF16.
- `mlx`: what MLX's quantized kernels take as they are, in mlx-lm's names (so `mlx_lm` loads it too): the
  expert blocks viewed as uint32 `[E, rows, in / 8]`, gate and up split into `gate_proj` / `up_proj`, scales
  and the rest unchanged. Attention and embeddings may instead be 8-bit (MLX affine, group 64): lossy.
- `numpy`: what the NumPy backend maps without copying: q, k and v fused into one `qkv_proj` and every small
  tensor (attention, router, norms, sinks, biases) stored as float32; embeddings and experts as in `hf`.
- `packed`: the `hf` layout with the BF16 matrices a CPU decoding step reads whole (attention projections, the
  unembedding) packed losslessly into 12 bits a weight (`packed_bf16`), three tensors each in place of the weight:
  25 % fewer bytes a token. Any of them may stay BF16; loaders see the `hf` layout (`Checkpoint.packed`).
- `unquantized`: what transformers saves of a dequantized gpt-oss (many fine-tunes): experts as float matrices,
  `gate_up_proj [E, hidden, 2 * I]` (columns gate, up, gate, up, ...) and `down_proj [E, I, hidden]`, multiplied as
  `x @ W`. No backend runs it; `mxfp4_specs` quantizes it back to `hf`.

The layout of a directory is told by its tensor names. Each repack is a list of `TensorSpec`s that yields a
tensor in pieces (one expert at a time, a block of rows at a time), so a converter can stream a 13 GB
checkpoint through little memory, and the MLX backend can build its arrays from any layout the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .config import MXFP4_BLOCK, ModelConfig
from .errors import MlxOssError
from .mxfp4 import quantize
from .packed_bf16 import CODES, MAX_EXCEPTION_SHARE, exception_count, pack_rows, packable_width, packed_width
from .safetensors_io import TensorSpec, as_float32

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

HF, MLX, NUMPY, UNQUANTIZED = "hf", "mlx", "numpy", "unquantized"
PACKED = "packed"  # the `hf` layout with packed BF16 matrices: the converter's name for it
MXFP4 = "mxfp4"  # an `unquantized` checkpoint quantized into the `hf` layout: the converter's and its folder's name
CONVERTED = (MLX, NUMPY, PACKED, MXFP4)  # what the converter writes, each in its own folder of the model store
FLOAT_DTYPES = ("BF16", "F16", "F32")
MLX_MXFP4 = {"group_size": MXFP4_BLOCK, "bits": 4, "mode": "mxfp4"}
Q8 = {"group_size": 64, "bits": 8}  # MLX's affine 8-bit: per group a scale and a bias
ROWS_PER_CHUNK = 4096  # rows of a matrix widened or quantized at once
QUANTIZE_ROWS = 128  # an expert's output rows quantized to MXFP4 at once: temporaries in cache, 4x a whole expert

# The markers of each layout: a tensor name that only it has.
_MARKERS = {
    MLX: "model.layers.0.mlp.experts.gate_proj.weight",
    NUMPY: "model.layers.0.self_attn.qkv_proj.weight",
    UNQUANTIZED: "model.layers.0.mlp.experts.gate_up_proj",
}


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def detect_layout(names: Iterable[str]) -> str:
    names = set(names)
    for layout, marker in _MARKERS.items():
        if marker in names:
            return layout
    return HF


def _layer_prefixes(config: ModelConfig) -> Iterator[str]:
    for i in range(config.num_hidden_layers):
        yield f"model.layers.{i}."


def expected_tensors(config: ModelConfig, layout: str = HF) -> dict[str, Expected]:
    """Every tensor of `layout` with its shape and the dtypes accepted (the lossy 8-bit MLX tensors replace some
    of these: see `quantizable` and `q8_shapes`)."""
    c = config
    fl = FLOAT_DTYPES
    f32 = ("F32",)
    E, H, I = c.num_local_experts, c.hidden_size, c.intermediate_size  # noqa: E741
    g_hidden, g_inter = H // MXFP4_BLOCK, I // MXFP4_BLOCK
    out: dict[str, Expected] = {
        "model.embed_tokens.weight": Expected((c.vocab_size, H), fl),
        "model.norm.weight": Expected((H,), f32 if layout == NUMPY else fl),
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = Expected((c.vocab_size, H), fl)
    small = f32 if layout == NUMPY else fl
    for p in _layer_prefixes(c):
        out |= {
            p + "input_layernorm.weight": Expected((H,), small),
            p + "post_attention_layernorm.weight": Expected((H,), small),
            p + "self_attn.o_proj.weight": Expected((H, c.q_size), small),
            p + "self_attn.o_proj.bias": Expected((H,), small),
            p + "self_attn.sinks": Expected((c.num_attention_heads,), small),
            p + "mlp.router.weight": Expected((E, H), small),
            p + "mlp.router.bias": Expected((E,), small),
        }
        if layout == NUMPY:
            qkv = c.q_size + 2 * c.kv_size
            out[p + "self_attn.qkv_proj.weight"] = Expected((qkv, H), f32)
            out[p + "self_attn.qkv_proj.bias"] = Expected((qkv,), f32)
        else:
            for proj, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
                out[p + f"self_attn.{proj}.weight"] = Expected((rows, H), fl)
                out[p + f"self_attn.{proj}.bias"] = Expected((rows,), fl)
        x = p + "mlp.experts."
        if layout == MLX:
            for proj, rows, groups in (("gate_proj", I, g_hidden), ("up_proj", I, g_hidden), ("down_proj", H, g_inter)):
                out[x + f"{proj}.weight"] = Expected((E, rows, groups * 4), ("U32",))
                out[x + f"{proj}.scales"] = Expected((E, rows, groups), ("U8",))
                out[x + f"{proj}.bias"] = Expected((E, rows), fl)
        elif layout == UNQUANTIZED:
            out |= {
                x + "gate_up_proj": Expected((E, H, 2 * I), fl),
                x + "gate_up_proj_bias": Expected((E, 2 * I), fl),
                x + "down_proj": Expected((E, I, H), fl),
                x + "down_proj_bias": Expected((E, H), fl),
            }
        else:
            out |= {
                x + "gate_up_proj_blocks": Expected((E, 2 * I, g_hidden, 16), ("U8",)),
                x + "gate_up_proj_scales": Expected((E, 2 * I, g_hidden), ("U8",)),
                x + "gate_up_proj_bias": Expected((E, 2 * I), fl),
                x + "down_proj_blocks": Expected((E, H, g_inter, 16), ("U8",)),
                x + "down_proj_scales": Expected((E, H, g_inter), ("U8",)),
                x + "down_proj_bias": Expected((E, H), fl),
            }
    return out


def quantizable(config: ModelConfig) -> list[str]:
    """The matrices the lossy 8-bit MLX option stores quantized: attention projections and embeddings."""
    names = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    for p in _layer_prefixes(config):
        names += [p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return names


def packable(config: ModelConfig) -> list[str]:
    """The BF16 matrices the `packed` layout may store packed: those a decoding step reads whole."""
    names = [] if config.tie_word_embeddings else ["lm_head.weight"]
    for p in _layer_prefixes(config):
        names += [p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return names


def packed_shapes(shape: tuple[int, int]) -> dict[str, Expected]:
    """The `packed` and `tables` tensors of a packed matrix `[rows, columns]`, and its `exceptions` (any count:
    -1)."""
    rows, columns = shape
    return {
        "packed": Expected((rows, packed_width(columns)), ("U8",)),
        "tables": Expected((rows, CODES), ("U8",)),
        "exceptions": Expected((-1, 2), ("I64",)),
    }


def q8_shapes(shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of the `weight`, `scales` and `biases` of an 8-bit matrix `[rows, cols]`."""
    rows, cols = shape
    return {
        "weight": ((rows, cols // 4), "U32"),
        "scales": ((rows, cols // Q8["group_size"]), "BF16"),
        "biases": ((rows, cols // Q8["group_size"]), "BF16"),
    }


def _whole(source: Checkpoint, name: str, dtype: str | None = None) -> TensorSpec:
    """A tensor as it is (the memory-mapped array itself, no copy), or widened to F32 a block of rows at a time; a
    packed matrix as its BF16 weight, unpacked a block of rows at a time."""
    packed = source.packed(name)
    if packed is not None:
        rows = packed.shape[0]
        target = dtype or "BF16"

        def unpacked():
            for r0 in range(0, rows, ROWS_PER_CHUNK):
                bits = packed.rows(r0, min(rows, r0 + ROWS_PER_CHUNK))
                yield bits if target == "BF16" else as_float32(bits, "BF16")

        return TensorSpec(name, target, packed.shape, unpacked)
    array = source.raw(name)
    stored = source.info(name).dtype
    target = dtype or stored

    def chunks():
        if target == stored or array.ndim == 0:
            yield array if target == stored else as_float32(array, stored)
            return
        for r0 in range(0, array.shape[0], ROWS_PER_CHUNK):
            yield as_float32(array[r0 : r0 + ROWS_PER_CHUNK], stored)

    return TensorSpec(name, target, tuple(array.shape), chunks)


def _per_expert(name: str, dtype: str, shape: tuple[int, ...], array: np.ndarray, pick) -> TensorSpec:
    """A tensor built expert by expert: `pick(array[e])` for each expert e."""
    return TensorSpec(name, dtype, shape, lambda: (pick(array[e]) for e in range(array.shape[0])))


def mlx_specs(source: Checkpoint) -> list[TensorSpec]:
    """The tensors of the MLX layout, from a source in the `hf` or `mlx` layout."""
    if source.layout == MLX:
        return [_whole(source, name) for name in source.locations]
    specs = []
    for name in expected_tensors(source.config, HF):
        if "mlp.experts." not in name:
            specs.append(_whole(source, name))
            continue
        prefix, kind = name.rsplit(".", 1)
        array = source.raw(name)
        E, rows = array.shape[:2]
        if kind.startswith("gate_up_proj"):
            for proj, parity in (("gate_proj", 0), ("up_proj", 1)):
                specs.append(
                    _expert_part(
                        prefix,
                        proj,
                        kind.removeprefix("gate_up_proj_"),
                        array,
                        source.info(name).dtype,
                        slice(parity, None, 2),
                    )
                )
        else:
            specs.append(
                _expert_part(
                    prefix, "down_proj", kind.removeprefix("down_proj_"), array, source.info(name).dtype, slice(None)
                )
            )
    return specs


def _expert_part(prefix: str, proj: str, part: str, array: np.ndarray, dtype: str, rows: slice) -> TensorSpec:
    """One of `gate_proj`/`up_proj`/`down_proj`'s weight (uint32 view of the blocks), scales or bias."""
    E = array.shape[0]
    kept = len(range(*rows.indices(array.shape[1])))
    if part == "blocks":
        G = array.shape[2]
        return _per_expert(
            f"{prefix}.{proj}.weight",
            "U32",
            (E, kept, G * 4),
            array,
            lambda a: np.ascontiguousarray(a[rows]).view(np.uint32).reshape(kept, G * 4),
        )
    if part == "scales":
        return _per_expert(f"{prefix}.{proj}.scales", "U8", (E, kept, array.shape[2]), array, lambda a: a[rows])
    return _per_expert(f"{prefix}.{proj}.bias", dtype, (E, kept), array, lambda a: a[rows])


def numpy_specs(source: Checkpoint) -> list[TensorSpec]:
    """The tensors of the NumPy layout, from a source in the `hf` or `numpy` layout."""
    if source.layout == NUMPY:
        return [_whole(source, name) for name in source.locations]
    specs = []
    for name, want in expected_tensors(source.config, NUMPY).items():
        if ".qkv_proj." in name:
            parts = [name.replace("qkv_proj", proj) for proj in ("q_proj", "k_proj", "v_proj")]
            specs.append(TensorSpec(name, "F32", want.shape, _concat_rows(source, parts)))
        elif want.dtypes == ("F32",):
            specs.append(_whole(source, name, "F32"))
        else:
            specs.append(_whole(source, name))
    return specs


def packed_specs(source: Checkpoint) -> list[TensorSpec]:
    """The tensors of the `packed` layout, from a source in the `hf` layout: each packable BF16 matrix whose width
    allows it (`packed_bf16.packable_width`) packed, unless it has more exceptions than
    `packed_bf16.MAX_EXCEPTION_SHARE` of its weights; the rest as they are."""
    packable_names = set(packable(source.config))
    specs = []
    for name in expected_tensors(source.config, HF):
        if name in packable_names and source.packed(name) is not None:
            raise MlxOssError(
                f"{source.directory}: '{name}' is packed already; convert from the checkpoint it came from"
            )
        info = source.info(name)
        if name in packable_names and info.dtype == "BF16" and packable_width(info.shape[1]):
            matrix = source.raw(name)
            # The count goes in the header (the exceptions' shape), so it is counted first, from the high bytes.
            count = sum(
                exception_count(matrix[r0 : r0 + ROWS_PER_CHUNK]) for r0 in range(0, len(matrix), ROWS_PER_CHUNK)
            )
            if count <= MAX_EXCEPTION_SHARE * matrix.size:
                specs += _packed(name, matrix, count)
                continue
        specs.append(_whole(source, name))
    return specs


def _packed(name: str, matrix: np.ndarray, count: int) -> list[TensorSpec]:
    """A BF16 matrix's `packed`, `tables` and `exceptions` tensors, for `count` exceptions. The tables and exceptions
    are kept from the packed tensor's pass (a few hundredths of its bytes), or made by another if asked for first."""
    base = name.removesuffix(".weight")
    rows, columns = matrix.shape
    starts = range(0, rows, ROWS_PER_CHUNK)
    kept: dict[str, list[np.ndarray]] = {}

    def pieces():
        tables, exceptions = [], []
        for r0 in starts:
            packed, table, listed = pack_rows(matrix[r0 : r0 + ROWS_PER_CHUNK])
            listed[:, 0] += r0 * columns
            tables.append(table)
            exceptions.append(listed)
            yield packed
        kept.update(tables=tables, exceptions=exceptions)

    def kept_part(part: str):
        def chunks():
            if part not in kept:
                for _ in pieces():
                    pass
            yield from kept[part]

        return chunks

    shapes = packed_shapes((rows, columns))
    shapes["exceptions"] = Expected((count, 2), ("I64",))
    sources = {"packed": pieces, "tables": kept_part("tables"), "exceptions": kept_part("exceptions")}
    return [TensorSpec(f"{base}.{part}", want.dtypes[0], want.shape, sources[part]) for part, want in shapes.items()]


def _concat_rows(source: Checkpoint, names: list[str]):
    def chunks():
        for name in names:
            yield from _whole(source, name, "F32").chunks()

    return chunks


def mxfp4_specs(source: Checkpoint) -> list[TensorSpec]:
    """The tensors of the `hf` layout from an `unquantized` source: each expert matrix transposed to `[out, in]`
    and quantized to MXFP4 (lossless for weights that were MXFP4 before, as a dequantized checkpoint's are)."""
    specs = []
    expected = expected_tensors(source.config, HF)
    for name, want in expected.items():
        if name.endswith("_scales"):
            continue  # made with the blocks
        if not name.endswith("_blocks"):
            specs.append(_whole(source, name))
            continue
        base = name.removesuffix("_blocks")
        specs += _quantized(base, source.raw(base), source.info(base).dtype, want, expected[base + "_scales"])
    return specs


def _quantized(base: str, matrix: np.ndarray, stored: str, blocks: Expected, scales: Expected) -> list[TensorSpec]:
    """`base`'s blocks and scales, each expert quantized once: the scales (1/16 of the blocks' bytes) are kept
    from the blocks' pass for the scales' (quantized again if the scales are asked for first)."""
    kept: list[np.ndarray] = []

    def quantized(e: int) -> tuple[np.ndarray, np.ndarray]:
        expert = matrix[e]  # [in, out]
        parts = []
        for r0 in range(0, expert.shape[1], QUANTIZE_ROWS):
            rows = as_float32(np.ascontiguousarray(expert[:, r0 : r0 + QUANTIZE_ROWS].T), stored)
            if not np.isfinite(rows).all():  # a NaN would quietly ruin its whole block's scale
                raise MlxOssError(f"tensor '{base}', expert {e}: holds NaN or infinite weights; nothing to quantize")
            parts.append(quantize(rows))
        return np.concatenate([b for b, _ in parts]), np.concatenate([s for _, s in parts])

    def block_chunks():
        kept.clear()
        for e in range(matrix.shape[0]):
            b, s = quantized(e)
            kept.append(s)
            yield b

    def scale_chunks():
        if len(kept) == matrix.shape[0]:
            yield from kept
        else:
            yield from (quantized(e)[1] for e in range(matrix.shape[0]))

    return [
        TensorSpec(base + "_blocks", "U8", blocks.shape, block_chunks),
        TensorSpec(base + "_scales", "U8", scales.shape, scale_chunks),
    ]


def q8_specs(spec: TensorSpec) -> list[TensorSpec]:
    """The 8-bit (lossy) `weight`, `scales` and `biases` of a BF16 matrix, quantized by MLX as mlx-lm does."""
    import mlx.core as mx

    base = spec.name.removesuffix(".weight")

    def part(index: int, dtype: str):
        def chunks():
            for chunk in spec.chunks():
                for r0 in range(0, chunk.shape[0], ROWS_PER_CHUNK):  # rows are quantized independently
                    rows = chunk[r0 : r0 + ROWS_PER_CHUNK]
                    if spec.dtype == "BF16":
                        matrix = mx.array(np.ascontiguousarray(rows)).view(mx.bfloat16)
                    else:
                        matrix = mx.array(as_float32(rows, spec.dtype)).astype(mx.bfloat16)
                    piece = mx.quantize(matrix, group_size=Q8["group_size"], bits=Q8["bits"])[index]
                    yield np.array(piece if dtype == "U32" else piece.astype(mx.bfloat16).view(mx.uint16))

        return chunks

    return [
        TensorSpec(f"{base}.{part_name}", dtype, shape, part(i, dtype))
        for i, (part_name, (shape, dtype)) in enumerate(q8_shapes(spec.shape).items())
    ]


def parameter_count(config: ModelConfig) -> int:
    """Weights of the Hugging Face layout, counting an MXFP4 byte as two values and leaving out block scales."""
    total = 0
    for name, want in expected_tensors(config).items():
        if name.endswith("_scales"):
            continue
        values = math.prod(want.shape)
        total += values * 2 if name.endswith("_blocks") else values
    return total

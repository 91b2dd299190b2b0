"""How much memory a model takes at a context length, told from its config and files before anything loads.

Pure functions over a `ModelConfig`, the checkpoint's file sizes and layout, plus `machine_memory` at the edge.
The figures follow how each backend holds a model:

- NumPy backend: every weight stays in the memory-mapped checkpoint as stored (its pages count in RSS once read,
  and the OS can drop them again; of the input embedding only the rows of the tokens seen are read, so it is not
  counted); the process owns float32 copies of the small vectors (norms, biases, sinks) of
  a BF16 checkpoint. Its float KV cache (float32, or float16 at `kv_bits=16`) keeps every position of every
  layer, sliding ones included.
- MLX backend: the weights are copied into MLX's memory at load (the mapped pages are released), as large as the
  files. Its KV cache keeps every position of full-attention layers; sliding layers keep their window plus
  `REWIND` positions (and one growth step).
- A quantized cache (`kv_bits=8`) stores int8 keys and values with one float32 scale per position and head; on
  both backends its sliding layers keep their window plus `REWIND` positions.

Activations are those of one prefill chunk (`PREFILL_CHUNK` tokens) at the full context, the attention scores
included, plus one row of logits and the unembedding's widened block. The verdict compares the sum with the
machine's memory: the GPU's wired limit on a Mac also bounds MLX's own allocations.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig

PREFILL_CHUNK = 512  # prompt tokens per forward pass (`generate.PREFILL_CHUNK`)
NUMPY_QUERY_CHUNK = 64  # queries the NumPy attention scores at once (`cpu.layers.QUERY_CHUNK`)
NUMPY_SCORE_BYTES = 256 << 20  # the NumPy attention's bound on one score matrix (`cpu.layers.SCORE_BYTES`)
MLX_REWIND, MLX_STEP = 2048, 256  # `mlx_backend.kv_cache.REWIND` and `STEP` (`cpu.quantized_kv_cache`'s too)
VOCAB_CHUNK = 16384  # unembedding rows widened to float32 at once (both backends)
KV_BITS = (8, 16)  # `--kv-bits` values: cache precisions besides the default, float32 (NumPy) or the model's (MLX)
FITS_SHARE = 0.80  # of the machine's memory: at most this much leaves room for the OS and other programs
TIGHT_SHARE = 0.95  # beyond this much the model would page out and crawl, or be killed
FITS, TIGHT, DOES_NOT_FIT, UNKNOWN = "fits", "tight", "does not fit", "unknown"
GiB = 1 << 30


@dataclass(frozen=True)
class MachineMemory:
    """What this computer offers: None where it could not be read."""

    total: int | None
    available: int | None
    gpu_limit: int | None = None  # Metal's recommended working set: MLX's own allocations stay under it


@dataclass(frozen=True)
class MemoryEstimate:
    backend: str
    layout: str
    context: int
    kv_bits: int | None
    weights_mapped: int  # bytes of memory-mapped checkpoint the model reads (RSS once touched; the OS may drop them)
    weights_private: int  # bytes of weights the process owns
    kv_cache: int  # bytes of keys and values at `context` positions
    activations: int  # bytes of one prefill chunk's temporaries at `context`, logits included

    @property
    def private(self) -> int:
        """Bytes the process itself allocates: all but the mapped weights."""
        return self.weights_private + self.kv_cache + self.activations

    @property
    def total(self) -> int:
        return self.weights_mapped + self.private


@dataclass(frozen=True)
class Verdict:
    status: str  # FITS, TIGHT, DOES_NOT_FIT or UNKNOWN
    reason: str  # why, in a few words (empty when it plainly fits)


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def cache_name(kv_bits: int | None, backend: str) -> str:
    """What the KV cache holds at `kv_bits` on `backend`, as the estimate and the bench print it."""
    if kv_bits == 8:
        return "8-bit"
    return "float16" if kv_bits == 16 and backend == "numpy" else "float32"


def kv_bytes_per_position(config: ModelConfig, backend: str, kv_bits: int | None) -> int:
    """Bytes one layer's keys and values take for one position: float32 (MLX's at most), float16 in the NumPy
    cache at `kv_bits` 16, or int8 with a float32 scale per head at 8."""
    c = config
    if kv_bits is None or kv_bits == 16:
        return 2 * c.num_key_value_heads * c.head_dim * (2 if kv_bits == 16 and backend == "numpy" else 4)
    return 2 * c.num_key_value_heads * (c.head_dim * kv_bits // 8 + 4)  # the values plus a float32 scale per head


def held_positions(config: ModelConfig, layer: int, backend: str, context: int, kv_bits: int | None = None) -> int:
    """Positions layer `layer`'s cache holds at `context`: all of them, but the MLX cache and the NumPy quantized
    one bound sliding layers to their window and rewind (plus a step before they drop)."""
    if backend == "numpy" and kv_bits == 8 and config.is_sliding(layer):
        return min(context, config.sliding_window - 1 + MLX_REWIND + MLX_STEP)
    if backend == "mlx":
        if config.is_sliding(layer):
            context = min(context, config.sliding_window - 1 + MLX_REWIND + MLX_STEP)
        return -(-context // MLX_STEP) * MLX_STEP  # grown in whole steps
    return context


def kv_cache_bytes(config: ModelConfig, backend: str, context: int, kv_bits: int | None = None) -> int:
    per_position = kv_bytes_per_position(config, backend, kv_bits)
    layers = range(config.num_hidden_layers)
    return sum(held_positions(config, i, backend, context, kv_bits) for i in layers) * per_position


def small_vector_elements(config: ModelConfig) -> int:
    """Elements of the norms, biases and sinks, which both backends keep as float32 copies."""
    c = config
    per_layer = (
        2 * c.hidden_size  # norms
        + c.num_attention_heads  # sinks
        + c.q_size
        + 2 * c.kv_size
        + c.hidden_size  # attention biases
        + c.num_local_experts  # router bias
        + c.num_local_experts * (2 * c.intermediate_size + c.hidden_size)  # expert biases
    )
    return c.num_hidden_layers * per_layer + c.hidden_size


def embedding_bytes(config: ModelConfig) -> int:
    """The BF16 input embedding table: the NumPy backend reads the rows of the tokens seen from the file, so none
    of it becomes resident (unless the unembedding shares it and reads it whole)."""
    return 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size * 2


def weight_bytes(config: ModelConfig, backend: str, layout: str, file_bytes: int) -> tuple[int, int]:
    """(mapped, private) bytes of weights that stay resident. The NumPy layout stores its vectors as float32, mapped
    as they are; MLX copies everything, the embedding table included."""
    copies = 0 if layout == "numpy" else 4 * small_vector_elements(config)
    if backend == "mlx":
        return 0, file_bytes + copies
    return max(0, file_bytes - embedding_bytes(config)), copies


def activation_bytes(
    config: ModelConfig, backend: str, context: int, kv_bits: int | None = None, metal: bool = False
) -> int:
    """Temporaries of one prefill chunk run at the end of a `context`-long cache: the widest moment of a forward."""
    c = config
    T = min(PREFILL_CHUNK, context)
    hidden = 3 * T * c.hidden_size * 4  # residual, normed input, layer output
    qkv = T * (2 * c.q_size + 2 * c.kv_size) * 4  # projections and the attention's output
    k = c.num_experts_per_tok
    experts = T * k * (3 * c.intermediate_size + 2 * c.hidden_size) * 4  # gate, up, SwiGLU, input copy, output
    if backend == "numpy":
        scores = min(c.num_attention_heads * min(T, NUMPY_QUERY_CHUNK) * context * 4, NUMPY_SCORE_BYTES)
    else:
        scores = 0 if metal else c.num_attention_heads * T * context * 4 * 2  # the fused kernel keeps none
    logits = c.vocab_size * 4 + VOCAB_CHUNK * c.hidden_size * 4
    one_layer = 2 * c.num_key_value_heads * c.head_dim * context * 4  # a layer's float32 keys and values at once:
    # a quantized cache and a prompt's attention widen them; the float NumPy cache copies a layer as it grows
    cache_scratch = one_layer if (kv_bits == 8 or backend == "numpy") else 0
    return hidden + qkv + experts + scores + logits + cache_scratch


def estimate(
    config: ModelConfig,
    backend: str,
    layout: str,
    file_bytes: int,
    context: int,
    kv_bits: int | None = None,
    metal: bool = False,
) -> MemoryEstimate:
    mapped, private = weight_bytes(config, backend, layout, file_bytes)
    return MemoryEstimate(
        backend=backend,
        layout=layout,
        context=context,
        kv_bits=kv_bits,
        weights_mapped=mapped,
        weights_private=private,
        kv_cache=kv_cache_bytes(config, backend, context, kv_bits),
        activations=activation_bytes(config, backend, context, kv_bits, metal),
    )


def verdict(e: MemoryEstimate, machine: MachineMemory) -> Verdict:
    """Fits, tight or does not fit this machine; unknown where its memory could not be read."""
    if machine.total is None:
        return Verdict(UNKNOWN, "this computer's memory could not be read")
    need = e.total
    if need > TIGHT_SHARE * machine.total:
        return Verdict(DOES_NOT_FIT, f"needs {gib(need)} of this computer's {gib(machine.total)}")
    if need > FITS_SHARE * machine.total:
        return Verdict(TIGHT, f"needs {gib(need)} of {gib(machine.total)}")
    if machine.available is not None and need > machine.available:
        return Verdict(TIGHT, f"needs {gib(need)}, {gib(machine.available)} free now")
    if e.backend == "mlx" and machine.gpu_limit is not None and e.private > machine.gpu_limit:
        return Verdict(TIGHT, f"needs {gib(e.private)} of GPU memory, past its {gib(machine.gpu_limit)} limit")
    return Verdict(FITS, "")


def largest_context(
    config: ModelConfig,
    backend: str,
    layout: str,
    file_bytes: int,
    machine: MachineMemory,
    kv_bits: int | None = None,
    metal: bool = False,
    accept: tuple[str, ...] = (FITS,),
    granule: int = 1024,
) -> int:
    """The longest context (a multiple of `granule`, at most the model's) whose verdict is in `accept`; 0 if none.
    Memory only grows with the context, so a bisection finds it."""
    limit = config.max_position_embeddings

    def ok(n: int) -> bool:
        return verdict(estimate(config, backend, layout, file_bytes, n, kv_bits, metal), machine).status in accept

    if ok(limit):
        return limit
    low, high = 0, limit // granule  # ok(low * granule) holds (0 trivially), ok(high * granule) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle * granule) else (low, middle)
    return low * granule


MEMORY_ENV = "MLX_OSS_MEMORY"  # bytes (or with a K, M or G suffix) to plan for instead of what the system reports
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")  # a container's own limit, below the host's memory psutil reports


def machine_memory(backend: str = "numpy", env: dict | None = None) -> MachineMemory:
    """This computer's memory; for the MLX backend on a Mac also the GPU's wired limit (MLX imported only then).

    `MLX_OSS_MEMORY` sets the total to plan for (a share of a machine, or a container psutil cannot see)."""
    import os

    env = os.environ if env is None else env
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
    except Exception:  # no psutil, or a system it cannot read: the caller says it could not tell
        total = available = None
    limit = _cgroup_limit()
    if total is not None and limit is not None and limit < total:
        total, available = limit, min(available, limit)
    if env.get(MEMORY_ENV):
        total = parse_bytes(env[MEMORY_ENV], MEMORY_ENV)
        available = total if available is None else min(available, total)
    if total is None:
        return MachineMemory(None, None)
    gpu_limit = None
    if backend == "mlx" and on_metal():
        try:
            import mlx.core as mx

            gpu_limit = int(mx.metal.device_info()["max_recommended_working_set_size"])
        except Exception:
            gpu_limit = None
    return MachineMemory(total, available, gpu_limit)


def parse_bytes(text: str, name: str) -> int:
    """A byte count such as 17179869184, 16G or 512M."""
    from .errors import MlxOssError

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(body[-1:], 1)
    try:
        value = float(body[:-1] if body[-1:] in units else body) * scale
    except ValueError:
        value = -1
    if not 0 < value < 1 << 60:
        raise MlxOssError(f"{name}={text!r} is not an amount of memory (bytes, or a number with K, M or G)")
    return int(value)


def _cgroup_limit() -> int | None:
    try:
        text = CGROUP_LIMIT.read_text().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def on_metal() -> bool:
    from .backend import is_apple_silicon

    return is_apple_silicon() and importlib.util.find_spec("mlx") is not None


@dataclass(frozen=True)
class ModelFiles:
    """What the estimate reads of a model directory: its config, layout and the bytes of its weight files."""

    config: ModelConfig
    layout: str
    file_bytes: int


def read_model_files(directory: str | Path) -> ModelFiles:
    """Config, layout (from the tensor names of the index, or the single file's header) and weight bytes."""
    from .layouts import detect_layout
    from .safetensors_io import SINGLE_FILE, SafetensorsFile
    from .store import _weight_map

    directory = Path(directory)
    config = ModelConfig.from_file(directory / "config.json")
    names = _weight_map(directory) or SafetensorsFile(directory / SINGLE_FILE).tensors
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return ModelFiles(config, detect_layout(names), size)


@dataclass(frozen=True)
class ContextCheck:
    """The outcome of checking a context length before a load: the context to use, and what to tell the user."""

    context: int
    estimate: MemoryEstimate
    verdict: Verdict
    refusal: str | None  # the one line to end with, when the context cannot be used
    note: str | None  # a line to show and go on (a caveat), else None


def check_context(
    files: ModelFiles,
    backend: str,
    requested: int | str,
    kv_bits: int | None = None,
    machine: MachineMemory | None = None,
) -> ContextCheck:
    """Resolve `requested` (tokens, or "auto": the longest that fits) for loading `files` on `backend` ("mlx" or
    "numpy", already chosen). A context past the model's own or one that cannot fit is refused, naming what would."""
    c = files.config
    machine = machine if machine is not None else machine_memory(backend)
    metal = backend == "mlx" and on_metal()
    args = (c, backend, files.layout, files.file_bytes)
    limit = c.max_position_embeddings
    bits = f" with --kv-bits {kv_bits}" if kv_bits else ""
    if requested == "auto":
        if machine.total is None:
            context = min(limit, 8192)
            e = estimate(*args, context, kv_bits, metal)
            return ContextCheck(context, e, verdict(e, machine), None, _caveat(context))
        context = largest_context(*args, machine, kv_bits, metal) or largest_context(
            *args, machine, kv_bits, metal, accept=(FITS, TIGHT)
        )
        e = estimate(*args, max(context, 1), kv_bits, metal)
        if context == 0:
            return ContextCheck(0, e, verdict(e, machine), _no_context_line(e, machine), None)
        return ContextCheck(context, e, verdict(e, machine), None, None)
    context = int(requested)
    if context > limit:
        refusal = f"--context {context} is longer than this model's {limit} tokens (max_position_embeddings)"
        return ContextCheck(context, estimate(*args, limit, kv_bits, metal), Verdict(UNKNOWN, ""), refusal, None)
    e = estimate(*args, context, kv_bits, metal)
    v = verdict(e, machine)
    if v.status == UNKNOWN:
        return ContextCheck(context, e, v, None, _caveat(context))
    if v.status == DOES_NOT_FIT:
        fitting = largest_context(*args, machine, kv_bits, metal, accept=(FITS, TIGHT))
        if fitting == 0:
            return ContextCheck(context, e, v, _no_context_line(e, machine), None)
        refusal = (
            f"--context {context}{bits} does not fit in memory: the {e.backend} backend needs about {gib(e.total)} "
            f"of this computer's {gib(machine.total)}; --context {fitting} fits"
            + ("" if kv_bits else " (--kv-bits 8 fits more)")
            + ", or --context auto picks the longest"
        )
        return ContextCheck(context, e, v, refusal, None)
    return ContextCheck(context, e, v, None, None)


def _caveat(context: int) -> str:
    return f"(this computer's free memory could not be read: loading with a {context}-token context unchecked)"


def _no_context_line(e: MemoryEstimate, machine: MachineMemory) -> str:
    return (
        f"this model does not fit in memory on the {e.backend} backend: its weights alone need about "
        f"{gib(e.weights_mapped + e.weights_private)} of this computer's {gib(machine.total or 0)}"
    )


def describe(e: MemoryEstimate, v: Verdict) -> list[str]:
    """The estimate as lines for `models info`."""
    return [
        f"weights       {gib(e.weights_mapped)} memory-mapped, {gib(e.weights_private)} loaded "
        f"({e.backend} backend, {e.layout} layout)",
        f"KV cache      {gib(e.kv_cache)} ({cache_name(e.kv_bits, e.backend)}) at {e.context} tokens",
        f"activations   {gib(e.activations)} (a {PREFILL_CHUNK}-token prefill chunk, logits included)",
        f"total         {gib(e.total)}: {v.status}" + (f" ({v.reason})" if v.reason else ""),
    ]


def context_for_load(directory: str | Path, backend: str, requested: int | str, kv_bits: int | None, say) -> int | None:
    """The context to load `directory` with, checked before anything loads: MlxOssError with one line when it
    cannot fit; `say` gets a caveat line when the memory could not be read. None where the files cannot be read
    here (the load then says what is wrong with them) and "auto" was asked: the engine takes the model's own."""
    from .backend import choose_backend
    from .errors import MlxOssError

    try:
        files = read_model_files(directory)
        chosen, _ = choose_backend(backend, files.layout)
    except (OSError, ValueError, MlxOssError):
        return None if requested == "auto" else int(requested)
    check = check_context(files, chosen, requested, kv_bits)
    if check.refusal:
        raise MlxOssError(check.refusal)
    if check.note:
        say(check.note)
    return check.context


def fit_for_directory(
    directory: str | Path, backend: str, context: int, kv_bits: int | None = None, machine: MachineMemory | None = None
) -> tuple[str, str]:
    """(status, one line saying why) for loading `directory` at `context`: what the app shows beside a model and
    its context setting. Reads the config, the index and the files' sizes only; ("", why) where they cannot be."""
    from .backend import choose_backend
    from .errors import MlxOssError

    try:
        files = read_model_files(directory)
        chosen, _ = choose_backend(backend, files.layout)
    except (OSError, ValueError, MlxOssError) as e:
        return "", f"no estimate: {e}"
    if context > files.config.max_position_embeddings:
        return DOES_NOT_FIT, f"longer than the model's {files.config.max_position_embeddings} tokens"
    machine = machine if machine is not None else machine_memory(chosen)
    metal = chosen == "mlx" and on_metal()
    e = estimate(files.config, chosen, files.layout, files.file_bytes, context, kv_bits, metal)
    v = verdict(e, machine)
    line = f"{v.reason or 'needs about ' + gib(e.total)} at {context} tokens on the {chosen} backend"
    if v.status in (TIGHT, DOES_NOT_FIT):
        args = (files.config, chosen, files.layout, files.file_bytes, machine, kv_bits, metal)
        line += f"; {largest_context(*args)} tokens fit"
    return v.status, line

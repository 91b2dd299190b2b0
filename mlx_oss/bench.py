"""`python -m mlx_oss.bench`: load a model, prefill a prompt, decode, and print what it cost.

A benchmark, not a test: it prints figures and asserts nothing. Prompt tokens are random ids
(the speed of a forward pass does not depend on which tokens they are).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bench_cache import fill_random
from .bench_machine import cpu_model, read_bandwidth_gb_s, vector_flags
from .bench_peer import PeerFigure, check_peer, gguf_beside, run_peer
from .cli import add_kv_bits_argument, run
from .errors import MlxOssError
from .generate import Completion, Decoder
from .loading import BACKENDS, load
from .sampling import SamplingParams, make_sampler

PROG = "python -m mlx_oss.bench"
WARM_UP = 64  # tokens of the untimed first prompt (see `benchmark`)
PEER_DEPTH_LIMIT = 4096  # the longest context llama-bench decodes at unless asked (`--peer-context`)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def private_bytes() -> int:
    """Anonymous (not file-backed) resident memory: what the process owns beyond the mapped weights."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_full_info().uss


class PrivateMemoryPeak:
    """Samples `private_bytes` on a background thread and keeps the largest value."""

    def __init__(self, interval: float = 0.02):
        self.peak = private_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, private_bytes())

    def __enter__(self) -> PrivateMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, private_bytes())


@dataclass
class Prefill:
    """A prompt of `prompt_tokens` run from an empty cache: the time to its first token, and tokens/s."""

    prompt_tokens: int
    ttft_s: float
    tok_s: float


@dataclass
class Decode:
    """Decoding after `context_tokens` positions: the mean step over the timed tokens."""

    context_tokens: int
    tok_s: float
    step_s: float


@dataclass
class BenchResult:
    model: str
    backend: str
    backend_reason: str
    cpu: str
    cpu_flags: list[str]
    threads: int
    kv_bits: int | None  # None: float32 keys and values
    gen_tokens: int
    load_s: float
    prefill: list[Prefill]
    decode: list[Decode]  # the first after the first prompt (a short context), then one per `--context`
    load_rss_bytes: int
    peak_rss_bytes: int
    private_bytes: int
    read_gb_s: float | None = None  # the memory's measured read speed, with --bandwidth
    peer: list[PeerFigure] = field(default_factory=list)  # llama.cpp's figures, with --peer


def thread_count() -> int:
    try:
        from threadpoolctl import threadpool_info

        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if counts:
            return max(counts)
    except ImportError:
        pass
    return os.cpu_count() or 1


def benchmark(
    model_dir: Path,
    backend: str,
    prompt_tokens: Sequence[int],
    gen_tokens: int,
    contexts: Sequence[int] = (),
    seed: int = 0,
    kv_bits: int | None = None,
) -> BenchResult:
    """Load; prefill a prompt of each length in `prompt_tokens` from an empty cache; decode `gen_tokens` after the
    first prompt and after each of `contexts` positions (caches filled with random keys and values).

    Everything runs the engine's token loop (`generate.Completion`, greedy), timed one token at a time. An untimed
    prompt first compiles what is compiled and faults the weights in, as llama-bench's warm-up run does: WARM_UP
    tokens, enough that every expert of every layer is read and the prompt kernels run, not only the decoding ones.
    The decode steps at the different contexts alternate, so that a machine that slows down for a while (a shared
    VM does) slows all alike rather than skewing their ratios."""
    with PrivateMemoryPeak() as private:
        start = time.perf_counter()
        model = load(model_dir, backend=backend)
        model.kv_bits = kv_bits  # the caches below are int8 at 8
        load_s = time.perf_counter() - start
        load_rss = rss_bytes()

        rng = np.random.default_rng(seed)
        vocab = model.config.vocab_size
        greedy = make_sampler(SamplingParams(temperature=0))
        next(iter(Completion(Decoder(model), rng.integers(0, vocab, WARM_UP).tolist(), greedy)))  # untimed
        prefills, completions = [], []
        for count in prompt_tokens:
            completion = iter(Completion(Decoder(model), rng.integers(0, vocab, count).tolist(), greedy))
            start = time.perf_counter()
            token = next(completion)
            ttft_s = time.perf_counter() - start
            prefills.append(Prefill(count, round(ttft_s, 3), round(count / ttft_s, 3)))
            completions = completions or [(count, completion)]  # decoding goes on after the first prompt
        for count in contexts:
            cache = model.new_cache()
            fill_random(model, cache, count, seed)
            filler = rng.integers(0, vocab, count).tolist()  # what the cache stands for
            completions.append((count, iter(Completion(Decoder(model, cache, filler), [*filler, token], greedy))))
        for _, completion in completions:
            next(completion)  # untimed: the first step after a prefill runs the prompt's last row again
        steps: list[list[float]] = [[] for _ in completions]
        for _ in range(gen_tokens):
            for (_, completion), times in zip(completions, steps, strict=True):
                start = time.perf_counter()
                next(completion)
                times.append(time.perf_counter() - start)
    decodes = [
        Decode(count, round(len(times) / sum(times), 3), round(sum(times) / len(times), 4))
        for (count, _), times in zip(completions, steps, strict=True)
        if times
    ]
    return BenchResult(
        model=str(model_dir),
        backend=model.backend,
        backend_reason=model.backend_reason,
        cpu=cpu_model(),
        cpu_flags=vector_flags(),
        threads=thread_count(),
        kv_bits=kv_bits,
        gen_tokens=gen_tokens,
        load_s=round(load_s, 3),
        prefill=prefills,
        decode=decodes,
        load_rss_bytes=load_rss,
        peak_rss_bytes=peak_rss_bytes(),
        private_bytes=private.peak,
    )


def format_result(r: BenchResult) -> str:
    gib = 1024**3
    peer_prefill = {f.prompt_tokens: f for f in r.peer if f.prompt_tokens}
    peer_decode = {f.context_tokens: f for f in r.peer if f.gen_tokens}

    def beside(ours: float, peer: PeerFigure | None) -> str:
        if peer is None:
            return ""
        return f"  | llama.cpp {peer.tok_s:.2f} ± {peer.stddev_tok_s:.2f} tokens/s, ours {ours / peer.tok_s:.2f}x"

    short = r.decode[0].tok_s if r.decode else None
    lines = [
        f"model           {r.model}",
        f"backend         {r.backend} ({r.backend_reason}; {r.threads} threads; "
        f"{f'{r.kv_bits}-bit' if r.kv_bits else 'float32'} KV cache)",
        f"cpu             {r.cpu} ({' '.join(r.cpu_flags) or 'no vector extensions known'})",
        *([f"memory reads    {r.read_gb_s:.1f} GB/s (all cores)"] if r.read_gb_s else []),
        f"load            {r.load_s:.2f} s",
    ]
    for p in r.prefill:
        lines.append(
            f"prefill {p.prompt_tokens:<7} {p.tok_s:.2f} tokens/s  (first token after {p.ttft_s:.2f} s)"
            + beside(p.tok_s, peer_prefill.get(p.prompt_tokens))
        )
    for i, d in enumerate(r.decode):
        label = "decode" if i == 0 else f"decode at {d.context_tokens}"
        share = f"; {d.tok_s / short:.0%} of short" if i and short else ""
        lines.append(
            f"{label:<15} {d.tok_s:.2f} tokens/s  ({d.step_s:.3f} s/token over {r.gen_tokens}{share})"
            + beside(d.tok_s, peer_decode.get(0 if i == 0 else d.context_tokens))
        )
    lines += [
        f"RSS after load  {r.load_rss_bytes / gib:.2f} GiB",
        f"peak RSS        {r.peak_rss_bytes / gib:.2f} GiB  (memory-mapped weights count once touched)",
        f"peak private    {r.private_bytes / gib:.2f} GiB",
    ]
    return "\n".join(lines)


def token_counts(text: str) -> list[int]:
    """An argparse type: a comma-separated list of token counts (`128,512,2048`)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers such as 128,512") from None
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"{text!r} has a count below 0")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument(
        "--prompt-tokens",
        type=token_counts,
        default=[128],
        help="prompt lengths to prefill, comma-separated (default 128, as pp128; e.g. 128,512,2048)",
    )
    parser.add_argument("--gen-tokens", type=int, default=8, help="tokens decoded, at each context (default 8)")
    parser.add_argument(
        "--context",
        type=token_counts,
        default=[4096],
        help="also decode with these many positions in the cache, comma-separated, filled with random keys and "
        "values (default 4096; 0 skips it)",
    )
    parser.add_argument(
        "--no-kernels", action="store_true", help="NumPy backend: plain NumPy, without the compiled kernels"
    )
    parser.add_argument("--bandwidth", action="store_true", help="also measure the memory's read speed")
    parser.add_argument(
        "--peer",
        type=Path,
        metavar="LLAMA_BENCH",
        help="also run llama.cpp's llama-bench (this executable) on MODEL.gguf and print its figures beside ours",
    )
    parser.add_argument(
        "--peer-context",
        type=token_counts,
        help=f"contexts llama-bench decodes at (default: those of --context up to {PEER_DEPTH_LIMIT}; llama-bench "
        "reaches a context by prefilling it in every repeat, which at 32k tokens takes most of an hour on 2 cores)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_kv_bits_argument(parser, "an 8-bit KV cache (default: float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    prompts, contexts = [n for n in args.prompt_tokens if n], [n for n in args.context if n]
    if not prompts or args.gen_tokens < 0:
        parser.error("--prompt-tokens needs a length of at least 1, --gen-tokens must be at least 0")
    if args.no_kernels:
        os.environ["MLX_OSS_KERNELS"] = "off"
    if args.peer:
        check_peer(args.peer, gguf_beside(args.model))
    result = benchmark(args.model, args.backend, prompts, args.gen_tokens, contexts, args.seed, args.kv_bits)
    if args.bandwidth:
        result.read_gb_s = read_bandwidth_gb_s()
    peer_error = None
    if args.peer:
        peer_contexts = (
            [n for n in args.peer_context if n]
            if args.peer_context is not None
            else [n for n in contexts if n <= PEER_DEPTH_LIMIT]
        )
        try:
            result.peer = run_peer(
                args.peer, gguf_beside(args.model), prompts, args.gen_tokens, peer_contexts, result.threads
            )
        except MlxOssError as e:  # our figures took minutes: print them, then say what the peer did
            peer_error = e
    print(json.dumps(asdict(result)) if args.json else format_result(result))
    if peer_error is not None:
        raise peer_error
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .bench_cache import fill_random
from .cli import run
from .generate import Completion, Decoder
from .loading import BACKENDS, load
from .sampling import SamplingParams, make_sampler

PROG = "python -m mlx_oss.bench"


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
class BenchResult:
    model: str
    backend: str
    backend_reason: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    context_tokens: int
    load_s: float
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_step_s: float
    decode_context_tok_s: float | None  # decoding after `context_tokens` positions in the cache
    decode_context_step_s: float | None
    load_rss_bytes: int
    peak_rss_bytes: int
    private_bytes: int


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
    prompt_tokens: int,
    gen_tokens: int,
    context_tokens: int = 0,
    seed: int = 0,
    kv_bits: int | None = None,
) -> BenchResult:
    """Load, prefill `prompt_tokens`, decode `gen_tokens`; with `context_tokens`, also decode `gen_tokens` after a
    second cache filled with that many positions of random keys and values.

    Both run the engine's token loop (`generate.Completion`, greedy), timed one token at a time. The steps at the
    two lengths alternate, so that a machine that slows down for a while (a shared VM does) slows both alike rather
    than skewing their ratio."""
    with PrivateMemoryPeak() as private:
        start = time.perf_counter()
        model = load(model_dir, backend=backend)
        model.kv_bits = kv_bits  # the caches below are int8 at 8
        load_s = time.perf_counter() - start
        load_rss = rss_bytes()

        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, model.config.vocab_size, prompt_tokens).tolist()
        greedy = make_sampler(SamplingParams(temperature=0))
        short = iter(Completion(Decoder(model), prompt, greedy))
        start = time.perf_counter()
        token = next(short)
        ttft_s = time.perf_counter() - start
        completions = [short]
        if context_tokens > prompt_tokens:
            cache = model.new_cache()
            fill_random(model, cache, context_tokens, seed)
            filler = rng.integers(0, model.config.vocab_size, context_tokens).tolist()  # what the cache stands for
            completions.append(iter(Completion(Decoder(model, cache, filler), [*filler, token], greedy)))
        for completion in completions:
            next(completion)  # untimed: the first step may still compile or fault pages in
        steps: list[list[float]] = [[] for _ in completions]
        for _ in range(gen_tokens):
            for completion, times in zip(completions, steps, strict=True):
                start = time.perf_counter()
                next(completion)
                times.append(time.perf_counter() - start)
        short_steps, long_steps = steps[0], steps[1] if len(steps) > 1 else []
    return BenchResult(
        model=str(model_dir),
        backend=model.backend,
        backend_reason=model.backend_reason,
        threads=thread_count(),
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        context_tokens=context_tokens if long_steps else 0,
        load_s=round(load_s, 3),
        ttft_s=round(ttft_s, 3),
        prefill_tok_s=round(prompt_tokens / ttft_s, 3),
        decode_tok_s=round(len(short_steps) / sum(short_steps), 3) if short_steps else 0.0,
        decode_step_s=round(sum(short_steps) / len(short_steps), 3) if short_steps else 0.0,
        decode_context_tok_s=round(len(long_steps) / sum(long_steps), 3) if long_steps else None,
        decode_context_step_s=round(sum(long_steps) / len(long_steps), 3) if long_steps else None,
        load_rss_bytes=load_rss,
        peak_rss_bytes=peak_rss_bytes(),
        private_bytes=private.peak,
    )


def format_result(r: BenchResult) -> str:
    gib = 1024**3
    return "\n".join(
        [
            f"model           {r.model}",
            f"backend         {r.backend} ({r.backend_reason}; {r.threads} threads)",
            f"load            {r.load_s:.2f} s",
            f"time to first   {r.ttft_s:.2f} s  ({r.prompt_tokens}-token prompt)",
            f"prefill         {r.prefill_tok_s:.2f} tokens/s",
            f"decode          {r.decode_tok_s:.2f} tokens/s  ({r.decode_step_s:.3f} s/token over {r.gen_tokens})",
            *(
                [
                    f"decode at {r.context_tokens:<5} {r.decode_context_tok_s:.2f} tokens/s  "
                    f"({r.decode_context_step_s:.3f} s/token; {r.decode_context_tok_s / r.decode_tok_s:.0%} of short)"
                ]
                if r.decode_context_tok_s
                else []
            ),
            f"RSS after load  {r.load_rss_bytes / gib:.2f} GiB",
            f"peak RSS        {r.peak_rss_bytes / gib:.2f} GiB  (memory-mapped weights count once touched)",
            f"peak private    {r.private_bytes / gib:.2f} GiB",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128, as pp128)")
    parser.add_argument("--gen-tokens", type=int, default=8, help="tokens decoded, at each context (default 8)")
    parser.add_argument(
        "--context",
        type=int,
        default=4096,
        help="also decode with this many positions in the cache, filled with random keys and values "
        "(default 4096; 0 skips it)",
    )
    parser.add_argument(
        "--no-kernels", action="store_true", help="NumPy backend: plain NumPy, without the compiled kernels"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-bits", type=int, choices=(8,), help="an 8-bit KV cache (default: float32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.gen_tokens < 0 or args.context < 0:
        parser.error("--prompt-tokens must be at least 1, --gen-tokens and --context at least 0")
    if args.no_kernels:
        os.environ["MLX_OSS_KERNELS"] = "off"
    result = benchmark(
        args.model, args.backend, args.prompt_tokens, args.gen_tokens, args.context, args.seed, args.kv_bits
    )
    print(json.dumps(asdict(result)) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)

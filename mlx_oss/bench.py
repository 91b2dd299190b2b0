"""`python -m mlx_oss.bench`: load a model, prefill a prompt, decode, and print what it cost.

A benchmark, not a test: it prints figures and asserts nothing. Prompt tokens are random ids
(the speed of a forward pass does not depend on which tokens they are).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bench_cache import fill_random
from .bench_machine import cpu_model, read_bandwidth_gb_s, vector_flags
from .bench_peer import PeerFigure, check_peer, drop_from_page_cache, gguf_beside, merge_peer_rounds, run_peer
from .cli import add_kv_bits_argument, run
from .errors import MlxOssError
from .generate import Completion, Decoder
from .loading import BACKENDS, load
from .memory_estimate import cache_name
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
    """A prompt of `prompt_tokens` run from an empty cache: the time to its first token, and tokens/s (medians over
    the rounds; `rounds` holds each round's tokens/s)."""

    prompt_tokens: int
    ttft_s: float
    tok_s: float
    rounds: list[float] = field(default_factory=list)


@dataclass
class Decode:
    """Decoding after `context_tokens` positions: the mean step over the timed tokens (medians over the rounds;
    `rounds` holds each round's tokens/s)."""

    context_tokens: int
    tok_s: float
    step_s: float
    rounds: list[float] = field(default_factory=list)


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
    rounds: int  # how many times every figure was measured (medians and ranges over them)
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
    rounds: int = 1,
    between_rounds: Callable[[], None] | None = None,
) -> BenchResult:
    """Load; prefill a prompt of each length in `prompt_tokens` from an empty cache; decode `gen_tokens` after the
    first prompt and after each of `contexts` positions (caches filled with random keys and values). All of it
    `rounds` times, calling `between_rounds` after each round (the peer's turn) with the weights mapped out
    (`Model.map_out`, as they are when it returns); figures are medians over them.

    Everything runs the engine's token loop (`generate.Completion`, greedy), timed one token at a time. An untimed
    prompt first compiles what is compiled and faults the weights in, as llama-bench's warm-up run does: WARM_UP
    tokens, enough that every expert of every layer is read and the prompt kernels run, not only the decoding ones.
    Before every later round the model maps its weights back in (`Model.map_in`; whatever ran in between may have
    pushed them out of the page cache, and a prompt reads experts the untimed one did not) and runs it again.
    The decode steps at the different contexts alternate, so that a machine that slows down for a while (a shared
    VM does) slows all alike rather than skewing their ratios; rounds do the same for longer drifts."""
    with PrivateMemoryPeak() as private:
        start = time.perf_counter()
        model = load(model_dir, backend=backend)
        model.kv_bits = kv_bits  # the caches below are int8 at 8
        load_s = time.perf_counter() - start
        load_rss = rss_bytes()
        rng = np.random.default_rng(seed)
        vocab = model.config.vocab_size
        greedy = make_sampler(SamplingParams(temperature=0))

        def prompt(count: int) -> Iterator[int]:
            return iter(Completion(Decoder(model), rng.integers(0, vocab, count).tolist(), greedy))

        prefill_rounds: list[list[Prefill]] = []
        steps: list[list[list[float]]] = []  # [round][completion]: seconds per step
        completions: list[tuple[int, Iterator[int]]] = []
        for round_index in range(rounds):
            if round_index:
                model.map_in()
            next(prompt(WARM_UP))  # untimed
            prefills = []
            for count in prompt_tokens:
                completion = prompt(count)
                started = time.perf_counter()
                token = next(completion)
                ttft_s = time.perf_counter() - started
                prefills.append(Prefill(count, ttft_s, count / ttft_s))
                if not completions:  # decoding goes on after the first round's first prompt
                    completions.append((count, completion))
                    next(completion)  # untimed: the first step after a prefill runs the prompt's last row again
            prefill_rounds.append(prefills)
            if round_index == 0:
                completions += [_filled(model, count, token, seed, rng, greedy) for count in contexts]
            steps.append(_decode_steps([completion for _, completion in completions], gen_tokens))
            if between_rounds is not None and round_index < rounds - 1:
                model.map_out()  # so that the peer's turn may drop our weights from the page cache
                between_rounds()
        model.map_out()
    prefills = [_median_prefill(figures) for figures in zip(*prefill_rounds, strict=True)]
    decodes = [
        _median_decode(count, [times[i] for times in steps]) for i, (count, _) in enumerate(completions) if gen_tokens
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
        rounds=rounds,
        load_s=round(load_s, 3),
        prefill=prefills,
        decode=decodes,
        load_rss_bytes=load_rss,
        peak_rss_bytes=peak_rss_bytes(),
        private_bytes=private.peak,
    )


def _filled(model, count: int, token: int, seed: int, rng, sampler) -> tuple[int, Iterator[int]]:
    """A completion decoding after `count` positions of random keys and values, its first (untimed) step taken."""
    cache = model.new_cache()
    fill_random(model, cache, count, seed)
    filler = rng.integers(0, model.config.vocab_size, count).tolist()  # what the cache stands for
    completion = iter(Completion(Decoder(model, cache, filler), [*filler, token], sampler))
    next(completion)  # untimed, as after a prefill
    return count, completion


def _decode_steps(completions: list[Iterator[int]], gen_tokens: int) -> list[list[float]]:
    """`gen_tokens` steps of each completion, taken in turns: the seconds of each, per completion."""
    times: list[list[float]] = [[] for _ in completions]
    for _ in range(gen_tokens):
        for completion, steps in zip(completions, times, strict=True):
            started = time.perf_counter()
            next(completion)
            steps.append(time.perf_counter() - started)
    return times


def _median_prefill(rounds: Sequence[Prefill]) -> Prefill:
    tok_s = [p.tok_s for p in rounds]
    return Prefill(
        rounds[0].prompt_tokens,
        round(statistics.median(p.ttft_s for p in rounds), 3),
        round(statistics.median(tok_s), 3),
        [round(t, 3) for t in tok_s],
    )


def _median_decode(context_tokens: int, rounds: Sequence[list[float]]) -> Decode:
    step_s = [sum(times) / len(times) for times in rounds]
    tok_s = [1 / s for s in step_s]
    return Decode(
        context_tokens,
        round(statistics.median(tok_s), 3),
        round(statistics.median(step_s), 4),
        [round(t, 3) for t in tok_s],
    )


def _spread(values: Sequence[float], spec: str = ".2f") -> str:
    """` (lowest-highest)` over several rounds' figures; nothing for one."""
    return f" ({min(values):{spec}}-{max(values):{spec}})" if len(values) > 1 else ""


def format_result(r: BenchResult) -> str:
    gib = 1024**3
    peer_prefill = {f.prompt_tokens: f for f in r.peer if f.prompt_tokens}
    peer_decode = {f.context_tokens: f for f in r.peer if f.gen_tokens}

    def beside(ours: Prefill | Decode, peer: PeerFigure | None) -> str:
        if peer is None:
            return ""
        ratios = [a / b for a, b in zip(ours.rounds, peer.rounds, strict=True)]
        return (
            f"  | llama.cpp {peer.tok_s:.2f} ± {peer.stddev_tok_s:.2f} tokens/s{_spread(peer.rounds)}, "
            f"ours {ours.tok_s / peer.tok_s:.2f}x{_spread(ratios)}"
        )

    short = r.decode[0].tok_s if r.decode else None
    rounds = ""
    if r.rounds > 1:
        rounds = f", medians of {r.rounds} rounds (lowest-highest)" + (", in turns with llama.cpp's" if r.peer else "")
    lines = [
        f"model           {r.model}",
        f"backend         {r.backend} ({r.backend_reason}; {r.threads} threads; "
        f"{cache_name(r.kv_bits, r.backend)} KV cache{rounds})",
        f"cpu             {r.cpu} ({' '.join(r.cpu_flags) or 'no vector extensions known'})",
        *([f"memory reads    {r.read_gb_s:.1f} GB/s (all cores)"] if r.read_gb_s else []),
        f"load            {r.load_s:.2f} s",
    ]
    for p in r.prefill:
        lines.append(
            f"prefill {p.prompt_tokens:<7} {p.tok_s:.2f} tokens/s{_spread(p.rounds)}  (first token after "
            f"{p.ttft_s:.2f} s)" + beside(p, peer_prefill.get(p.prompt_tokens))
        )
    for i, d in enumerate(r.decode):
        label = "decode" if i == 0 else f"decode at {d.context_tokens}"
        shares = [a / b for a, b in zip(d.rounds, r.decode[0].rounds, strict=True)]
        share = f"; {d.tok_s / short:.0%} of short{_spread(shares, '.0%')}" if i and short else ""
        lines.append(
            f"{label:<15} {d.tok_s:.2f} tokens/s{_spread(d.rounds)}  ({d.step_s:.3f} s/token over {r.gen_tokens}"
            f"{share})" + beside(d, peer_decode.get(0 if i == 0 else d.context_tokens))
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
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure everything this many times and print medians and ranges; with --peer, llama-bench runs after "
        "each round, so that both see the machine's drifts alike (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_kv_bits_argument(parser, "an 8-bit or a float16 KV cache (default: float32 on the CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    prompts, contexts = [n for n in args.prompt_tokens if n], [n for n in args.context if n]
    if not prompts or args.gen_tokens < 0:
        parser.error("--prompt-tokens needs a length of at least 1, --gen-tokens must be at least 0")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.no_kernels:
        os.environ["MLX_OSS_KERNELS"] = "off"
    if args.peer:
        check_peer(args.peer, gguf_beside(args.model))
    peer_rounds: list[list[PeerFigure]] = []
    peer_error = None

    def peer_turn() -> None:
        nonlocal peer_error
        if args.peer and peer_error is None:
            gguf = gguf_beside(args.model)
            drop_from_page_cache(sorted(Path(args.model).iterdir()))  # see `drop_from_page_cache`
            try:
                peer_rounds.append(run_peer(args.peer, gguf, prompts, args.gen_tokens, peer_contexts, thread_count()))
            except MlxOssError as e:  # our figures took minutes: print them, then say what the peer did
                peer_error = e
            drop_from_page_cache([gguf])

    peer_contexts = (
        [n for n in args.peer_context if n]
        if args.peer_context is not None
        else [n for n in contexts if n <= PEER_DEPTH_LIMIT]
    )
    result = benchmark(
        args.model, args.backend, prompts, args.gen_tokens, contexts, args.seed, args.kv_bits, args.rounds, peer_turn
    )
    if args.bandwidth:
        result.read_gb_s = read_bandwidth_gb_s()
    peer_turn()
    if peer_error is None and peer_rounds:
        result.peer = merge_peer_rounds(peer_rounds)
    print(json.dumps(asdict(result)) if args.json else format_result(result))
    if peer_error is not None:
        raise peer_error
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)

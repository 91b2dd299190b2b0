"""llama.cpp's `llama-bench` on the same weights, for the benchmark to print beside its own figures.

The peer is not part of the product: the user builds it (`../shared/tools/llamacpp-peer.sh build` in this
project's workspace, or any llama.cpp build) and converts the checkpoint to GGUF; the benchmark only runs the
executable it is given, with the same prompt lengths, decode length, contexts and thread count, and reads its JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import MlxOssError


@dataclass(frozen=True)
class PeerFigure:
    """One llama-bench test: a prompt of `prompt_tokens` (prefill) or `gen_tokens` decoded after `context_tokens`."""

    prompt_tokens: int
    gen_tokens: int
    context_tokens: int
    tok_s: float
    stddev_tok_s: float
    rounds: tuple[float, ...] = ()  # tokens/s of each run of llama-bench, when it ran several times


def merge_peer_rounds(rounds: list[list[PeerFigure]]) -> list[PeerFigure]:
    """One figure per test over several runs of llama-bench (which lists its tests in the same order every run):
    the median tokens/s and spread, and each run's tokens/s."""
    merged = []
    for figures in zip(*rounds, strict=True):
        first = figures[0]
        merged.append(
            PeerFigure(
                first.prompt_tokens,
                first.gen_tokens,
                first.context_tokens,
                statistics.median(f.tok_s for f in figures),
                statistics.median(f.stddev_tok_s for f in figures),
                tuple(f.tok_s for f in figures),
            )
        )
    return merged


def gguf_beside(model_dir: Path) -> Path:
    """Where the peer script writes a checkpoint's GGUF: beside its folder, `DIR.gguf`."""
    return Path(str(model_dir).rstrip("/") + ".gguf")


def check_peer(llama_bench: Path, gguf: Path) -> None:
    """One clear error when the executable or the GGUF is missing (before the benchmark spends minutes)."""
    if not llama_bench.is_file():
        raise MlxOssError(f"{llama_bench}: no llama-bench there (build it with ../shared/tools/llamacpp-peer.sh build)")
    if not gguf.is_file():
        raise MlxOssError(f"{gguf}: no GGUF of the model (make it with ../shared/tools/llamacpp-peer.sh gguf MODEL)")


def run_peer(
    llama_bench: Path,
    gguf: Path,
    prompt_tokens: list[int],
    gen_tokens: int,
    contexts: list[int],
    threads: int,
    repeats: int = 3,
    timeout: float = 3600,
) -> list[PeerFigure]:
    """Run `llama_bench` (prefill of each prompt length; decode of `gen_tokens` at a short context and at each of
    `contexts`) and return its figures; one clear error when it is missing or fails."""
    check_peer(llama_bench, gguf)
    common = [str(llama_bench), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    # Warm the page cache (llama-bench maps the file) so the first timed test does not read the disk.
    _run([*common[:-4], "-p", "16", "-n", "4", "-r", "1"], timeout)
    figures = _figures(_run([*common, "-p", ",".join(map(str, prompt_tokens)), "-n", "0"], timeout))
    if gen_tokens:
        depths = ",".join(map(str, [0, *contexts]))
        figures += _figures(_run([*common, "-p", "0", "-n", str(gen_tokens), "-d", depths], timeout))
    return figures


def drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the OS to drop these files' pages from its page cache (those no process maps), where it can.

    The 20b and its GGUF rarely fit the page cache together, and Linux keeps the pages read twice (the last turn's,
    over its repetitions) ahead of those read once: the next turn, faulting its own weights back in, kept losing
    part of them to the disk while it was timed (our 128-token prompt ran at 9-15 tokens/s after llama-bench's turn,
    21-23 without it). Each turn starts with the other's file out of the cache, its own read back untimed."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _run(command: list[str], timeout: float) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MlxOssError(f"llama-bench took more than {timeout:.0f} s: {' '.join(command)}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise MlxOssError(f"llama-bench failed ({last}): {' '.join(command)}")
    return out.stdout


def _figures(output: str) -> list[PeerFigure]:
    try:
        tests = json.loads(output)
    except json.JSONDecodeError:
        raise MlxOssError("llama-bench did not print JSON (is it llama.cpp's llama-bench?)") from None
    return [
        PeerFigure(
            int(t["n_prompt"]), int(t["n_gen"]), int(t.get("n_depth", 0)), float(t["avg_ts"]), float(t["stddev_ts"])
        )
        for t in tests
    ]

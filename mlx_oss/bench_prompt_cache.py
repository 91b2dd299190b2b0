"""Time to first token of an agent's prompt: cold, warm from the in-memory prompt cache, and warm from the disk
cache in a new process; and the bytes the caches take.

    python -m mlx_oss.bench_prompt_cache --model DIR [--backend numpy] [--request codex_request.json]

The prompt is a recorded Codex CLI request (a Responses API body) rendered through the server's own conversion:
the repository's `tests/data/codex_0.171.0_request.json` unless `--request` names another. "Warm" is a new session
of the same agent: the same request with another last user message, so it shares all but its end with the first.
The disk cache is written to a temporary folder (or `--disk-dir`), never the user's.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cli import format_bytes, number_from, run
from .errors import MlxOssError
from .loading import BACKENDS

PROG = "python -m mlx_oss.bench_prompt_cache"
WARM_UP = [200006, 1428, 200008, 12194, 200007]  # a few tokens (harmony's "<|start|>user<|message|>Hi<|end|>")
RECORDED = Path(__file__).resolve().parents[1] / "tests" / "data" / "codex_0.171.0_request.json"


def agent_prompts(body: dict) -> tuple[list[int], list[int]]:
    """The request's prompt, and the prompt of the same request whose last user message says something else."""
    from .api.responses import parse_responses
    from .harmony import render_prompt

    other = copy.deepcopy(body)
    last = next((item for item in reversed(other.get("input", [])) if item.get("role") == "user"), None)
    if last is None:
        raise MlxOssError("the request has no user message in its input")
    last["content"] = [{"type": "input_text", "text": "Now list the files of this folder and explain each one."}]
    return tuple(render_prompt(parse_responses(b, b.get("model", "")).conversation) for b in (body, other))


def timed_turn(engine, prompt: list[int]) -> dict:
    from .engine import Done, SamplingParams

    start = time.perf_counter()
    done = next(e for e in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1)) if isinstance(e, Done))
    return {
        "seconds": time.perf_counter() - start,
        "ttft": done.stats.time_to_first_token_s,
        "reused": done.stats.reused_tokens,
        "source": done.stats.reused_from,
        "tokens": done.tokens,
    }


def engine_for(args, warm_up: list[int]):
    """The engine to measure, after a short turn on another engine of the same model: the first call's one-time
    costs (compiling kernels, reading the vocabulary) are not the prompt cache's to count."""
    from .engine import Engine
    from .loading import load
    from .prompt_cache import GIB, PromptCacheSettings

    model = load(args.model, backend=args.backend)
    timed_turn(Engine(model, prompt_cache=PromptCacheSettings(0, 0)), warm_up)
    settings = PromptCacheSettings(int(args.prompt_cache_gb * GIB), int(args.disk_cache_gb * GIB), args.disk_dir)
    return Engine(model, prompt_cache=settings)


def child(args, prompt: list[int]) -> None:
    """The new process: load, then one turn on the prompt (its prefix found on disk)."""
    engine = engine_for(args, WARM_UP)
    result = timed_turn(engine, prompt)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--request", type=Path, help=f"a Responses API request body (default {RECORDED.name})")
    p.add_argument("--disk-dir", type=Path, help="the disk cache's folder (default: a temporary one)")
    p.add_argument("--prompt-cache-gb", type=number_from(0), default=2.0, metavar="GB")
    p.add_argument("--disk-cache-gb", type=number_from(0), default=8.0, metavar="GB")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    request = args.request or RECORDED
    if not request.is_file():
        raise MlxOssError(f"{request}: no such request file; give one with --request")
    first, second = agent_prompts(json.loads(request.read_text(encoding="utf-8")))
    if args.child:
        child(args, second)
        return 0
    with tempfile.TemporaryDirectory(prefix="mlx-oss-bench-prompt-cache-") as temporary:
        args.disk_dir = args.disk_dir or Path(temporary)
        engine = engine_for(args, WARM_UP)
        print(f"{engine.model.backend} backend, prompt of {len(first)} tokens ({request.name})", flush=True)
        cold = timed_turn(engine, first)
        engine.flush()  # the cold prompt's write to disk, which a user's next session would not wait on either
        # The new process first, while the disk holds the cold prompt only: both warm cases then start the second
        # session from the same prefix and prefill the same few tokens.
        command = [sys.executable, "-m", "mlx_oss.bench_prompt_cache", "--child", "--model", str(args.model)]
        command += ["--backend", engine.model.backend, "--request", str(request), "--disk-dir", str(args.disk_dir)]
        command += ["--prompt-cache-gb", str(args.prompt_cache_gb), "--disk-cache-gb", str(args.disk_cache_gb)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            raise MlxOssError(f"the new process failed: {out.stderr.strip()[-500:]}")
        restarted = json.loads(out.stdout.strip().splitlines()[-1])
        warm = timed_turn(engine, second)
        engine.flush()
        memory_bytes, disk_bytes = engine.cache_bytes()
    # wall time from the call to the first token: finding, reading and restoring a cache included
    print(f"{'case':<28}{'first token':>12}{'reused':>9}{'prefilled':>10}  from")
    for name, r, tokens in (
        ("cold", cold, first),
        ("warm, in memory", warm, second),
        ("warm, from disk (new proc)", restarted, second),
    ):
        prefilled = len(tokens) - r["reused"]
        print(f"{name:<28}{r['seconds']:>11.3f}s{r['reused']:>9}{prefilled:>10}  {r['source'] or '-'}")
    same = "yes" if restarted["tokens"] == warm["tokens"] else "NO"
    print(f"same first token from disk as from memory: {same}")
    print(f"prompt cache: {format_bytes(memory_bytes)} in memory, {format_bytes(disk_bytes)} on disk")
    return 0


if __name__ == "__main__":
    run(main, PROG)

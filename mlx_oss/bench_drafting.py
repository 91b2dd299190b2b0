"""`python -m mlx_oss.bench_drafting`: what speculative decoding costs and gains, at forced acceptance rates.

A benchmark, not a test: it prints figures and asserts nothing. It first times one pass over 1 + k tokens after
the prompt against a pass over one (on a mixture of experts, k more tokens read the union of their experts, so a
rejected draft is not free). It then decodes the same greedy completion plainly and with drafts whose acceptance
it forces: 100 % (the known greedy continuation, replayed), about 50 % (half of each draft right, then a wrong
token) and 0 % (a wrong first token), as many as asked and as many as the adaptive rules choose; and with prompt
lookup, the drafter generation uses, on a prompt that repeats itself (random weights seldom repeat it). The runs
interleave, round after round, so that a machine busy at one moment weighs on all.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cli import run
from .drafting import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, PromptLookup
from .generate import Completion, Decoder
from .loading import BACKENDS, load
from .sampling import SamplingParams, make_sampler

PROG = "python -m mlx_oss.bench_drafting"


class Replay:
    """A drafter that knows the completion (`continuation`) and drafts `max_tokens` tokens a pass, the first
    `round(rate * k)` right and the next one wrong, so that `rate` of the drafted tokens are accepted."""

    def __init__(self, continuation: Sequence[int], rate: float, max_tokens: int, vocab_size: int):
        self.continuation, self.rate, self.max_tokens, self.vocab_size = (
            list(continuation),
            rate,
            max_tokens,
            vocab_size,
        )

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        truth = self.continuation[len(output) : len(output) + min(limit, self.max_tokens)]
        right = round(self.rate * len(truth))
        if right < len(truth):
            truth[right] = (truth[right] + 1) % self.vocab_size
        return truth

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        pass


class AdaptiveReplay(PromptLookup):
    """`Replay`'s drafts, as many as `PromptLookup`'s rules choose: what adaptivity saves at a forced rate."""

    def __init__(self, prompt: Sequence[int], replay: Replay):
        super().__init__(prompt, replay.max_tokens)
        self.replay, self.prompt_length = replay, len(prompt)

    def draft(self, history: np.ndarray, length: int) -> list[int]:
        return self.replay.propose(history[self.prompt_length :].tolist(), length)


def pass_seconds(model, prompt: Sequence[int], ks: Sequence[int], repeats: int, seed: int) -> dict[int, float]:
    """The median seconds of one pass over 1 + k tokens after `prompt`, for each k, passes interleaved."""
    decoder = Decoder(model)
    decoder.prefill(prompt)
    rng = np.random.default_rng(seed)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            tokens = rng.integers(0, model.config.vocab_size, k + 1).tolist()
            start = time.perf_counter()
            decoder.forward(tokens)
            times[k].append(time.perf_counter() - start)
            decoder.truncate(len(prompt))
    return {k: float(np.median(t)) for k, t in times.items()}


def decode_rates(model, prompt: list[int], tokens: int, draft: int, rounds: int) -> list[tuple[str, float, str]]:
    """(run, median decode tokens/s, note) for plain decoding and each drafting run, `rounds` times interleaved."""
    greedy = SamplingParams(temperature=0)
    vocab = model.config.vocab_size
    decoder = Decoder(model)
    continuation = list(Completion(decoder, prompt, make_sampler(greedy), max_tokens=tokens))
    repeated = prompt + continuation + prompt  # lookup finds the continuation after the second copy of the prompt
    lookup_truth = list(Completion(decoder, repeated, make_sampler(greedy), max_tokens=tokens))

    def adaptive(rate: float) -> AdaptiveReplay:
        return AdaptiveReplay(prompt, Replay(continuation, rate, draft, vocab))

    runs = {
        "plain": (prompt, None, continuation),
        "drafts 100 % right": (prompt, lambda: Replay(continuation, 1.0, draft, vocab), continuation),
        "drafts ~50 % right": (prompt, lambda: Replay(continuation, 0.5, draft, vocab), continuation),
        "drafts 0 % right": (prompt, lambda: Replay(continuation, 0.0, draft, vocab), continuation),
        "adaptive, drafts ~50 % right": (prompt, lambda: adaptive(0.5), continuation),
        "adaptive, drafts 0 % right": (prompt, lambda: adaptive(0.0), continuation),
        "prompt lookup on the repeated prompt": (repeated, lambda: PromptLookup(repeated, draft), lookup_truth),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    notes: dict[str, str] = {}
    for _ in range(rounds):
        for name, (text, drafter, truth) in runs.items():
            completion = Completion(
                decoder, text, make_sampler(greedy), max_tokens=tokens, drafter=drafter() if drafter else None
            )
            out = list(completion)
            stats = completion.stats()
            rates[name].append(stats.decode_tokens_per_s)
            same = "same tokens as plain" if out == truth else "TOKENS DIFFER from plain"
            accepted = f"{stats.accepted_tokens}/{stats.drafted_tokens} drafted accepted, " if drafter else ""
            notes[name] = accepted + same
    return [(name, float(np.median(r)), notes[name]) for name, r in rates.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    parser.add_argument(
        "--draft",
        type=int,
        default=DEFAULT_DRAFT_TOKENS,
        help=f"tokens drafted per pass (default {DEFAULT_DRAFT_TOKENS})",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are shown (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1 or args.tokens < 2 or args.rounds < 1 or not 1 <= args.draft <= MAX_DRAFT_TOKENS:
        parser.error(
            "--prompt-tokens and --rounds must be at least 1, --tokens at least 2, "
            f"--draft from 1 to {MAX_DRAFT_TOKENS}"
        )
    model = load(args.model, backend=args.backend)
    prompt = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, args.prompt_tokens).tolist()
    print(f"{args.model} on {model.backend}; prompt {args.prompt_tokens} tokens, {args.tokens} decoded per run")
    ks = sorted({0, 1, 2, 4, args.draft})
    costs = pass_seconds(model, prompt, ks, 5 * args.rounds, args.seed)
    for k, seconds in costs.items():
        print(f"pass over {k + 1:2d} tokens  {seconds * 1e3:8.1f} ms  ({seconds / costs[0]:.2f} x one token)")
    for name, rate, note in decode_rates(model, prompt, args.tokens, args.draft, args.rounds):
        print(f"{name:38s} {rate:8.2f} tokens/s  {note}")
    return 0


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)

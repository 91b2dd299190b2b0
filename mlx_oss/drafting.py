"""Drafting tokens for speculative decoding by prompt lookup: no draft model, the text itself.

Decoding reads every weight a token uses once per pass, so checking several tokens in one pass costs less than
several passes. Agents and editors mostly write again what the prompt already holds (code being edited, a file
quoted, a name used before), so the tokens that followed the latest occurrence of the output's last few tokens are
often what comes next. `find_draft` is that lookup; `PromptLookup` keeps the history and decides how much to draft.

gpt-oss is a mixture of experts: a pass over several tokens reads the union of the experts they choose, so a
rejected draft is not free. `PromptLookup` therefore drafts only on a match of `min_match` tokens or more, shrinks
its length after a rejection and pauses for longer after each draft rejected outright, and grows it after drafts
accepted whole; and it times the passes, so that it drafts only as many tokens as are worth their cost at the
acceptance it has seen (`best_draft_length`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

DEFAULT_DRAFT_TOKENS = 4  # drafted tokens a pass checks at most; 0 turns drafting off
MAX_DRAFT_TOKENS = 16
MAX_PAUSE = 16  # decode steps drafting waits at most after drafts rejected outright
PRIOR_ACCEPTANCE = 0.6  # the chance a drafted token is accepted, before any is checked; worth 2 checked tokens
PRIOR_SLOPE = 0.5  # a pass's extra seconds per extra token, as a share of a one-token pass's, before any is timed
FORGET = 0.95  # the weight the acceptance and pass times seen so far keep at each new one
PROBE_AFTER = 64  # decode steps without a draft worth its cost, after which one token is drafted to time it again


class Drafter(Protocol):
    """What `generate.Completion` asks of a source of drafted tokens."""

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens guessed to follow the prompt and `output` (the completion so far)."""
        ...

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        """How many of the `drafted` tokens last proposed were accepted, and the seconds the pass took (one that
        checked `drafted` tokens after the last; `drafted` 0 for a plain decode step)."""
        ...


def find_draft(history: np.ndarray, limit: int, min_match: int = 2, max_match: int = 4) -> list[int]:
    """Up to `limit` tokens that followed an earlier occurrence of `history`'s last n tokens, n from `max_match`
    down to `min_match` (the longest match first); of the occurrences, the latest that `limit` tokens follow, else
    the latest. Empty when no such n-gram occurs before."""
    history = np.asarray(history).reshape(-1)
    n = history.size
    if limit <= 0:
        return []
    for m in range(min(max_match, n - 1), max(min_match, 1) - 1, -1):
        tail = history[n - m :]
        starts = np.flatnonzero(history[: n - m] == tail[0])  # a start j < n - m leaves a token after the match
        for offset in range(1, m):
            starts = starts[history[starts + offset] == tail[offset]]
        if starts.size:
            whole = starts[starts + m + limit <= n]
            j = int(whole[-1] if whole.size else starts[-1])
            return history[j + m : j + m + limit].tolist()
    return []


def best_draft_length(acceptance: float, seconds: dict[int, float], longest: int) -> int:
    """How many tokens to draft, 0 to `longest`, to decode the most tokens a second: a pass over 1 + k tokens gives
    `1 + a + ... + a^k` tokens on average (each drafted token accepted with chance `acceptance`, until the first
    rejected) and takes `seconds[1 + k]`, known or drawn as a line through the one-token pass and the longest
    timed one (`PRIOR_SLOPE` until one is timed). Without a timed one-token pass: `longest`."""
    one = seconds.get(1)
    if not one:
        return longest
    timed = max((n for n in seconds if n > 1), default=None)
    slope = (seconds[timed] - one) / (timed - 1) if timed else PRIOR_SLOPE * one
    best, best_rate, expected = 0, 1 / one, 1.0
    for k in range(1, longest + 1):
        expected += acceptance**k
        cost = seconds.get(k + 1) or one + max(slope, 0.0) * k
        if expected / cost > best_rate:
            best, best_rate = k, expected / cost
    return best


class PromptLookup:
    """Drafts from the prompt and the completion so far (`find_draft`), as many tokens as recent passes accepted.

    The draft length starts at `max_tokens`, doubles (up to it) after a draft accepted whole, and drops to one more
    than what was accepted after a partial one. A draft rejected outright halves it and pauses drafting for 1, 2,
    4, ... decode steps (up to `MAX_PAUSE`), until one is accepted again. Within that length it drafts what
    `best_draft_length` finds worth the passes' measured cost (nothing, when none is); what it saw fades
    (`FORGET`) at every step, and after `PROBE_AFTER` steps without a draft it drafts one token to time it again.
    """

    def __init__(self, prompt: Sequence[int], max_tokens: int = DEFAULT_DRAFT_TOKENS, min_match: int = 2,
                 max_match: int = 4):  # fmt: skip
        self.max_tokens, self.min_match, self.max_match = max_tokens, min_match, max_match
        self.length = max_tokens
        self._history = np.empty(max(64, 2 * len(prompt)), dtype=np.int64)
        self._history[: len(prompt)] = prompt
        self._size = len(prompt)
        self._absorbed = 0  # tokens of the output already in `_history`
        self._misses = 0  # drafts rejected outright in a row
        self._pause = 0
        self._accepted = self._checked = 0.0  # drafted tokens accepted, of those checked (up to the first rejected)
        self._seconds: dict[int, float] = {}  # tokens in a pass -> its seconds, a moving average
        self._idle = 0  # steps in a row where no draft was worth its cost

    def propose(self, output: Sequence[int], limit: int) -> list[int]:
        self._absorb(output)
        if self._pause > 0:
            self._pause -= 1
            return []
        length = best_draft_length(self.acceptance, self._seconds, min(self.length, limit))
        self._idle = 0 if length else self._idle + 1
        if self._idle > PROBE_AFTER:
            length, self._idle = min(1, limit), 0
        return self.draft(self._history[: self._size], length) if length else []

    def draft(self, history: np.ndarray, length: int) -> list[int]:
        """Up to `length` tokens guessed to follow `history` (the prompt and the output)."""
        return find_draft(history, length, self.min_match, self.max_match)

    @property
    def acceptance(self) -> float:
        """The chance a drafted token is accepted, as recent drafts tell."""
        return (self._accepted + 2 * PRIOR_ACCEPTANCE) / (self._checked + 2)

    def update(self, drafted: int, accepted: int, seconds: float) -> None:
        rows = 1 + drafted
        before = self._seconds.get(rows)
        self._seconds[rows] = seconds if before is None else FORGET * before + (1 - FORGET) * seconds
        self._accepted *= FORGET
        self._checked *= FORGET
        if drafted == 0:
            return
        self._accepted += accepted
        self._checked += accepted + (accepted < drafted)
        if accepted == drafted:
            self._misses = 0
            self.length = min(self.max_tokens, 2 * self.length)
        elif accepted > 0:
            self._misses = 0
            self.length = min(self.max_tokens, accepted + 1)
        else:
            self._misses += 1
            self._pause = min(MAX_PAUSE, 2 ** (self._misses - 1))
            self.length = max(1, self.length // 2)

    def _absorb(self, output: Sequence[int]) -> None:
        new = output[self._absorbed :]
        if not new:
            return
        if self._size + len(new) > self._history.size:
            grown = np.empty(2 * (self._size + len(new)), dtype=np.int64)
            grown[: self._size] = self._history[: self._size]
            self._history = grown
        self._history[self._size : self._size + len(new)] = new
        self._size += len(new)
        self._absorbed = len(output)


def add_draft_arguments(parser) -> None:
    """`--draft N` and `--no-draft`, as the chat and the server take them (into `args.draft`)."""
    import argparse

    from .cli import non_negative_int

    def draft_count(text: str) -> int:
        value = non_negative_int(text)
        if value > MAX_DRAFT_TOKENS:
            raise argparse.ArgumentTypeError(f"{value} is above {MAX_DRAFT_TOKENS}")
        return value

    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--draft",
        type=draft_count,
        default=DEFAULT_DRAFT_TOKENS,
        metavar="N",
        help=f"speculative decoding: check up to N tokens looked up in the prompt per pass, fewer after rejections "
        f"(0 to {MAX_DRAFT_TOKENS}, default {DEFAULT_DRAFT_TOKENS}; 0 is off)",
    )
    group.add_argument("--no-draft", dest="draft", action="store_const", const=0, help="speculative decoding off")

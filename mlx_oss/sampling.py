"""How the next token is picked from a row of logits: the settings, the draw, and the shapes that plug into it.

A `Sampler` maps a row of logits to one token id; `make_sampler` builds the one `SamplingParams` describe. A
`LogitsProcessor` rewrites the row before the draw (a grammar that masks what may not come next, a penalty):
`generate.Completion` applies any it is given, in order, to the completion's tokens so far and the row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import MlxOssError

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Temperature 0 is greedy; `seed` makes sampling reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until a stop token or the context limit
    logprobs: int | None = None  # None: none reported; n: each token's log-probability and the n likeliest others

    def __post_init__(self):
        if not self.temperature >= 0:
            raise MlxOssError(f"temperature must be 0 or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MlxOssError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MlxOssError(f"max tokens must be at least 1, not {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise MlxOssError(f"top log-probabilities must be from 0 to {MAX_TOP_LOGPROBS}, not {self.logprobs}")


MAX_TOP_LOGPROBS = 20  # as OpenAI


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability, and the `top` likeliest tokens with theirs (likeliest first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, temperature: float, top: int) -> TokenLogprob:
    """`token`'s log-probability in the distribution it was drawn from: the logits at `temperature` (greedy
    decoding reports the model's own distribution, at temperature 1), after any logits processor; top-p only
    narrows the draw, not the reported distribution, as OpenAI reports it."""
    scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / (temperature or 1.0)
    shifted = scaled - scaled.max()
    log_probs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-log_probs, top)[:top] if 0 < top < log_probs.size else np.arange(min(top, log_probs.size))
    best = best[np.argsort(-log_probs[best], kind="stable")]
    return TokenLogprob(token, float(log_probs[token]), tuple((int(t), float(log_probs[t])) for t in best))


def make_sampler(sampling: SamplingParams) -> Sampler:
    """The draw `sampling` describes, with its own random generator (seeded by `sampling.seed`): one per
    completion, so that a seed gives the same tokens whatever ran before."""
    temperature, top_p = sampling.temperature, sampling.top_p
    rng = np.random.default_rng(sampling.seed)
    return lambda logits: sample_token(logits, temperature, top_p, rng)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a row of logits: argmax at temperature 0, else a draw from the top-p nucleus."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if temperature == 0:
        return int(np.argmax(logits))
    probs = np.exp((logits - logits.max()) / np.float32(temperature))
    ids = None
    if top_p < 1:
        ids = nucleus(probs, top_p * probs.sum(dtype=np.float64))
        probs = probs[ids]
    cumulative = np.cumsum(probs, dtype=np.float64)
    pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), probs.size - 1)
    return int(ids[pick]) if ids is not None else pick


def nucleus(probs: np.ndarray, mass: float) -> np.ndarray:
    """Ids of the most likely tokens, likeliest first, up to the first whose running sum reaches `mass`.

    Sorting the whole vocabulary is slow next to a decode step, so the top 64, 512, ... are tried first.
    """
    k = 64
    while k < probs.size:
        top = np.argpartition(probs, -k)[-k:]
        top = top[np.argsort(-probs[top], kind="stable")]
        cumulative = np.cumsum(probs[top], dtype=np.float64)
        if cumulative[-1] >= mass:
            return top[: int(np.searchsorted(cumulative, mass)) + 1]
        k *= 8
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order], dtype=np.float64)
    return order[: int(np.searchsorted(cumulative, mass)) + 1]

"""How the next token is picked from a row of logits: the settings, the draw, and the shapes that plug into it.

A `Sampler` maps a row of logits to one token id; `make_sampler` builds the one `SamplingParams` describe, a
`TokenSampler`, which can also judge a drafted token (`verify`, speculative decoding) without changing the
distribution the tokens are drawn from. A `LogitsProcessor` rewrites the row before the draw (a grammar that
masks what may not come next, a penalty): `generate.Completion` applies any it is given, in order, to the
completion's tokens so far and the row.
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


# A greedy pick from a row computed with other rows (verifying drafted tokens) counts only when the winner leads by
# more than this, relative to its size: the NumPy backend's several-row pass sums in another order than its one-row
# decode (`cpu.kernels.attention` over the last query's span, experts shared by rows grouped), so the rows differ
# from the one-row logits in the last bits, and on a near-tie the argmax could differ from plain decoding's.
TIE_MARGIN = 1e-4


@dataclass
class TokenSampler:
    """The draw of one completion: `SamplingParams`' temperature and top-p, and its own random generator."""

    temperature: float
    top_p: float
    rng: np.random.Generator

    def __call__(self, logits: np.ndarray) -> int:
        return sample_token(logits, self.temperature, self.top_p, self.rng)

    def verify(self, logits: np.ndarray, draft: int | None, exact: bool = True) -> tuple[int, bool] | None:
        """The token drawn from `logits` given the drafted `draft` (None: nothing drafted), and whether it is the
        draft. Greedy: the argmax. Sampling: `accept_or_resample`, so the tokens keep the sampler's distribution.

        `exact` False says the row came from a several-row pass, not bit-for-bit the one-row decode: greedy then
        answers None on a near-tie (`clear_argmax`), for the caller to decode that position on its own.
        """
        if self.temperature == 0:
            token = int(np.argmax(logits)) if exact else clear_argmax(logits)
            return None if token is None else (token, token == draft)
        if draft is None:
            return self(logits), False
        return accept_or_resample(logits, draft, self.temperature, self.top_p, self.rng)


def make_sampler(sampling: SamplingParams) -> TokenSampler:
    """The draw `sampling` describes, with its own random generator (seeded by `sampling.seed`): one per
    completion, so that a seed gives the same tokens whatever ran before."""
    return TokenSampler(sampling.temperature, sampling.top_p, np.random.default_rng(sampling.seed))


def clear_argmax(logits: np.ndarray, margin: float = TIE_MARGIN) -> int | None:
    """The argmax of `logits`, or None when the runner-up is within `margin * (1 + |best|)` of it."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    top2 = np.argpartition(-logits, 1)[:2] if logits.size > 1 else np.array([0, 0])
    best, second = (top2[0], top2[1]) if logits[top2[0]] >= logits[top2[1]] else (top2[1], top2[0])
    if logits.size > 1 and logits[best] - logits[second] <= margin * (1 + abs(float(logits[best]))):
        return None
    return int(best)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a row of logits: argmax at temperature 0, else a draw from the top-p nucleus."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if temperature == 0:
        return int(np.argmax(logits))
    ids, probs = sampling_weights(logits, temperature, top_p)
    return _draw(ids, probs, rng)


def sampling_weights(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """The distribution a draw at `temperature` > 0 and `top_p` picks from, unnormalized: `(ids, weights)`, the
    nucleus's ids (likeliest first) and their weights, or `(None, weights)` over the whole vocabulary."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    probs = np.exp((logits - logits.max()) / np.float32(temperature))
    if top_p < 1:
        ids = nucleus(probs, top_p * probs.sum(dtype=np.float64))
        return ids, probs[ids]
    return None, probs


def accept_or_resample(
    logits: np.ndarray, draft: int, temperature: float, top_p: float, rng: np.random.Generator
) -> tuple[int, bool]:
    """Speculative sampling for a drafted token chosen with certainty (a one-hot draft distribution q): accept
    `draft` with probability p(draft), p the sampler's final distribution; else draw from p without `draft`,
    renormalized. Either way the token has distribution p: P(x) = p(x)·[x = draft] + (1 - p(draft))·p(x)/(1 -
    p(draft))·[x ≠ draft] = p(x). Returns the token and whether it is the draft."""
    ids, weights = sampling_weights(logits, temperature, top_p)
    weights = weights.astype(np.float64)
    where = np.flatnonzero(ids == draft) if ids is not None else [draft]
    total = weights.sum()
    p_draft = weights[where[0]] / total if len(where) else 0.0
    if rng.random() < p_draft:
        return int(draft), True
    if len(where):
        weights[where[0]] = 0.0
    return _draw(ids, weights, rng), False


def _draw(ids: np.ndarray | None, weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn in proportion to `weights` (mapped through `ids` when given)."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), weights.size - 1)
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

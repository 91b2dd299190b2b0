"""The token-level loop, for any backend and any chat format: prefill, decode one token, sample.

`Decoder` holds one model's KV cache and the tokens in it: `reuse` cuts the cache back to what a new prompt
shares with them, `prefill` runs the rest of the prompt in chunks, `step` decodes one token. `forward` runs
several tokens at once and returns every row, as verifying drafted tokens needs; `truncate` drops the ones
rejected. `Completion` is the loop over them: iterating it yields the tokens of one completion, sampled after
any logits processors. It knows no chat format: the caller stops iterating at the tokens that end a turn (the
engine at harmony's), the benchmark after as many as it times.

It asks of a model only what `backend.Model` and `backend.Cache` promise, and imports no backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .cancel import CancelToken
from .sampling import LogitsProcessor, Sampler, TokenLogprob, token_logprob

PREFILL_CHUNK = 512  # prompt tokens per forward pass; cancellation is checked between chunks


@dataclass(frozen=True)
class GenerationStats:
    """The figures of one completion, as the chat, the app and the server report them."""

    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose keys/values came from the cache of the previous call
    generated_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    reused_from: str = ""  # where the reused keys/values came from: "memory" or "disk" ("" when none were)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Decoder:
    """One model, one KV cache and the tokens run through it (`fed`; the first `cache.length` are in the cache).

    The cache is kept between prompts: cutting it back to a shared prefix and extending it gives what a fresh
    prefill gives, so reuse never changes the output.
    """

    def __init__(self, model, cache=None, tokens: Sequence[int] = ()):
        """`cache`, when given, holds the keys and values of `tokens` (a cache kept or filled elsewhere)."""
        self.model = model
        self.cache = model.new_cache() if cache is None else cache
        self.fed: list[int] = [int(t) for t in tokens]

    def take(self, cache, tokens: Sequence[int]) -> None:
        """Go on from `cache`, which holds the keys and values of `tokens` (a prompt cache's entry), instead of the
        cache held so far."""
        self.cache, self.fed = cache, [int(t) for t in tokens]

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the cached prefix `prompt` starts with, all but its last token at most (which must be run to
        give the logits of what follows); returns how many tokens were kept."""
        shared = min(common_prefix_length(self.fed[: self.cache.length], prompt), len(prompt) - 1)
        return self.truncate(shared)

    def truncate(self, length: int) -> int:
        """Forget the tokens from `length` on; returns the length kept (a cache with bounded sliding layers may
        keep less)."""
        kept = self.cache.truncate(length)
        del self.fed[kept:]
        return kept

    def prefill(
        self, tokens: Sequence[int], cancel: CancelToken | None = None, chunk: int = PREFILL_CHUNK
    ) -> np.ndarray | None:
        """Run `tokens` in chunks of `chunk`; the logits row after the last, or None when `cancel` came before
        the first chunk. A cancel between chunks stops early: the cache keeps what was run."""
        logits = None
        for start in range(0, len(tokens), chunk):
            if cancel is not None and cancel.cancelled:
                break
            logits = self.step(tokens[start : start + chunk])
        return logits

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Run `tokens` (one, to decode) after the cache; the logits row of what follows the last."""
        return self.forward(tokens, last_only=True)[-1]

    def forward(self, tokens: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Run `tokens` after the cache; the logits rows of what follows each (`last_only`: the last only)."""
        self.fed[self.cache.length :] = tokens
        return np.asarray(self.model.forward(tokens, self.cache, last_only=last_only))


class Completion:
    """The tokens that follow `prompt` in `decoder`, as an iterator; one iteration at a time.

    Iterating prefills what the cache lacks, then samples a token, yields it and (when asked for the next one)
    decodes it. The loop ends by itself at `max_tokens` ("length"), when the cache holds `context_length`
    positions ("context_limit") or on `cancel` ("cancelled"), checked between steps; `stop_reason` then says
    which. A caller that stops at a token of its own just stops iterating: that token is never decoded.
    """

    def __init__(
        self,
        decoder: Decoder,
        prompt: Sequence[int],
        sampler: Sampler,
        *,
        max_tokens: int | None = None,
        context_length: int | None = None,
        cancel: CancelToken | None = None,
        processors: Sequence[LogitsProcessor] = (),
        logprobs: int | None = None,
        temperature: float = 1.0,
    ):
        """`logprobs` (None: off) asks for each token's log-probability at `temperature` and that many
        alternatives, in `self.logprobs` beside `self.tokens`."""
        self.decoder, self.prompt, self.sampler = decoder, prompt, sampler
        self.top_logprobs, self.temperature = logprobs, temperature
        self.logprobs: list[TokenLogprob] = []
        self.max_tokens, self.context_length = max_tokens, context_length
        self.cancel = cancel or CancelToken()
        self.processors = tuple(processors)
        self.tokens: list[int] = []
        self.stop_reason: str | None = None
        self.reused = 0
        self._prefill_s = self._first_token_s = self._decode_s = 0.0

    def __iter__(self) -> Iterator[int]:
        decoder, cache, cancel, tokens = self.decoder, self.decoder.cache, self.cancel, self.tokens
        start = time.perf_counter()
        self.reused = decoder.reuse(self.prompt)
        logits = decoder.prefill(self.prompt[self.reused :], cancel)
        self._prefill_s = time.perf_counter() - start
        while logits is not None and not cancel.cancelled:
            step_start = time.perf_counter()
            for process in self.processors:
                logits = process(tokens, logits)
            token = self.sampler(logits)
            tokens.append(token)
            if self.top_logprobs is not None:
                self.logprobs.append(token_logprob(logits, token, self.temperature, self.top_logprobs))
            if len(tokens) == 1:
                self._first_token_s = time.perf_counter() - start
            else:
                self._decode_s += time.perf_counter() - step_start
            yield token
            if self.max_tokens is not None and len(tokens) >= self.max_tokens:
                self.stop_reason = "length"
                return
            if self.context_length is not None and cache.length >= self.context_length:
                self.stop_reason = "context_limit"
                return
            if cancel.cancelled:
                break
            step_start = time.perf_counter()
            logits = decoder.step([token])
            self._decode_s += time.perf_counter() - step_start
        self.stop_reason = "cancelled"

    def stats(self) -> GenerationStats:
        """The figures of the completion so far: decoding counts sampling and every step after the first token."""
        prefilled = len(self.prompt) - self.reused
        return GenerationStats(
            prompt_tokens=len(self.prompt),
            reused_tokens=self.reused,
            generated_tokens=len(self.tokens),
            time_to_first_token_s=self._first_token_s,
            prefill_tokens_per_s=prefilled / self._prefill_s if self._prefill_s > 0 else 0.0,
            decode_tokens_per_s=(len(self.tokens) - 1) / self._decode_s if self._decode_s > 0 else 0.0,
        )

"""The token-level loop, for any backend and any chat format: prefill, decode one token, sample.

`Decoder` holds one model's KV cache and the tokens in it: `reuse` cuts the cache back to what a new prompt
shares with them, `prefill` runs the rest of the prompt in chunks, `step` decodes one token. `forward` runs
several tokens at once and returns every row, as verifying drafted tokens needs; `truncate` drops the ones
rejected. `Completion` is the loop over them: iterating it yields the tokens of one completion, sampled after
any logits processors, with speculative decoding when given a drafter (`drafting`). It knows no chat format:
the caller stops iterating at the tokens that end a turn (the engine at harmony's, which it also passes as
`stop_tokens` so that drafted tokens past them never stay in the cache), the benchmark after as many as it
times.

It asks of a model only what `backend.Model` and `backend.Cache` promise, and imports no backend.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .cancel import CancelToken
from .drafting import MAX_DRAFT_TOKENS, Drafter
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
    drafted_tokens: int = 0  # tokens drafted for speculative decoding, and how many of them were accepted
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """The share of drafted tokens accepted; None when nothing was drafted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


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
    positions ("context_limit"), after a token of `stop_tokens` ("stop") or on `cancel` ("cancelled"), checked
    between tokens; `stop_reason` then says which. A caller that stops at a token of its own just stops
    iterating: that token is never decoded.

    With a `drafter` (speculative decoding) a pass runs the last token and the tokens drafted to follow it, and the
    tokens yield one by one while the sampler accepts the drafts (`TokenSampler.verify`), then the sampler's own
    token; the cache drops the rejected rest. Greedy tokens are those of plain decoding (a near-tie in a row of
    the several-row pass is decoded again alone); sampled ones keep the sampler's distribution. The cache may hold
    accepted tokens not yet yielded; it is cut back to the tokens yielded (but the last, as plain decoding leaves
    it) before a stop token is yielded and whenever the iteration ends, closed early included. Logits processors
    (grammars, which keep state per token) turn drafting off.
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
        stop_tokens: Collection[int] = (),
        drafter: Drafter | None = None,
    ):
        """`logprobs` (None: off) asks for each token's log-probability at `temperature` and that many
        alternatives, in `self.logprobs` beside `self.tokens`. `drafter` needs a sampler with `verify`
        (`make_sampler`'s)."""
        self.decoder, self.prompt, self.sampler = decoder, prompt, sampler
        self.top_logprobs, self.temperature = logprobs, temperature
        self.logprobs: list[TokenLogprob] = []
        self.max_tokens, self.context_length = max_tokens, context_length
        self.cancel = cancel or CancelToken()
        self.processors = tuple(processors)
        self.stop_tokens = frozenset(stop_tokens)
        self.drafter = drafter if hasattr(sampler, "verify") and not self.processors else None
        self.tokens: list[int] = []
        self.stop_reason: str | None = None
        self.reused = self.drafted = self.accepted = 0
        self._prefill_s = self._first_token_s = self._decode_s = 0.0

    def __iter__(self) -> Iterator[int]:
        decoder, cancel, tokens = self.decoder, self.cancel, self.tokens
        start = time.perf_counter()
        self.reused = decoder.reuse(self.prompt)
        last = decoder.prefill(self.prompt[self.reused :], cancel)
        self._prefill_s = time.perf_counter() - start
        rows, drafts, pass_s = (None if last is None else last[None]), [], None
        try:
            while rows is not None and not cancel.cancelled:
                step_start = time.perf_counter()
                accepted, alone = 0, False
                for i, row in enumerate(rows):
                    draft = drafts[i] if i < len(drafts) else None
                    chosen = self._choose(row, draft, exact=len(rows) == 1)
                    if chosen is None:  # a near-tie in a several-row pass: this position is decoded again alone
                        alone = True
                        break
                    token, hit = chosen
                    accepted += hit
                    self.accepted += hit
                    tokens.append(token)
                    if token in self.stop_tokens:
                        self._forget_unyielded()
                    now = time.perf_counter()
                    if len(tokens) == 1:
                        self._first_token_s = now - start
                    else:
                        self._decode_s += now - step_start
                    yield token
                    step_start = time.perf_counter()
                    if self._ended(token):
                        return
                    if cancel.cancelled or not hit:
                        break
                if self.drafter is not None and pass_s is not None:
                    self.drafter.update(len(drafts), accepted, pass_s)
                if cancel.cancelled:
                    break
                step_start = time.perf_counter()
                self._forget_unyielded()
                drafts = [] if alone else self._drafts()
                self.drafted += len(drafts)
                pass_start = time.perf_counter()
                rows = decoder.forward([tokens[-1], *drafts]) if drafts else decoder.step([tokens[-1]])[None]
                pass_s = time.perf_counter() - pass_start
                if len(rows) != 1 + len(drafts):
                    raise ValueError(f"the model returned {len(rows)} rows of logits for {1 + len(drafts)} tokens")
                self._decode_s += time.perf_counter() - step_start
            self.stop_reason = "cancelled"
        finally:
            self._forget_unyielded()

    def _choose(self, row: np.ndarray, draft: int | None, exact: bool) -> tuple[int, bool] | None:
        """The token of `row` after the processors and whether it is `draft`; None for a greedy near-tie in a row
        of a several-row pass (not `exact`). Records its log-probability."""
        for process in self.processors:
            row = process(self.tokens, row)
        if hasattr(self.sampler, "verify"):
            chosen = self.sampler.verify(row, draft, exact)
        else:
            chosen = (self.sampler(row), False)
        if chosen is not None and self.top_logprobs is not None:
            self.logprobs.append(token_logprob(row, chosen[0], self.temperature, self.top_logprobs))
        return chosen

    def _ended(self, token: int) -> bool:
        """Whether the loop ends after `token`, setting `stop_reason`; the cache then holds the plain loop's."""
        length = len(self.prompt) + len(self.tokens) - 1  # positions plain decoding would hold now
        if token in self.stop_tokens:
            self.stop_reason = "stop"
        elif self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            self.stop_reason = "length"
        elif self.context_length is not None and length >= self.context_length:
            self.stop_reason = "context_limit"
        return self.stop_reason is not None

    def _drafts(self) -> list[int]:
        """Tokens drafted to follow the last, as many as fit before `max_tokens` and `context_length`."""
        if self.drafter is None:
            return []
        limit = MAX_DRAFT_TOKENS
        if self.max_tokens is not None:
            limit = min(limit, self.max_tokens - len(self.tokens) - 1)
        if self.context_length is not None:
            limit = min(limit, self.context_length - len(self.prompt) - len(self.tokens))
        return self.drafter.propose(self.tokens, limit) if limit > 0 else []

    def _forget_unyielded(self) -> None:
        """Cut the cache back to the prompt and the tokens yielded but the last, dropping drafted tokens not (yet)
        yielded, so that `decoder.fed` is what plain decoding would have fed."""
        fed = len(self.prompt) + len(self.tokens) - 1
        if self.tokens and self.decoder.cache.length > fed:
            kept = self.decoder.truncate(fed)
            if kept < fed:  # a backend that cannot step back this far: run what it dropped again
                self.decoder.prefill([*self.prompt, *self.tokens][kept:fed])

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
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
        )

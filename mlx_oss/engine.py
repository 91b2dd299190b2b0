"""The generation engine: prompt tokens in, typed events out, for every backend.

`Engine.generate` prefills the prompt (reusing the KV cache for whatever prefix it shares with the previous
call), samples one token at a time, parses the tokens as harmony and yields `ReasoningDelta`, `AnswerDelta`,
`ToolCall` and finally one `Done` with the messages and the figures of the turn. It works with any model that
offers `.forward(token_ids, cache, last_only=True)`, `.new_cache()` (with `.length` and `.truncate(n)`, which
returns the length it kept) and
`.config`; it never imports a backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .cancel import CancelToken
from .errors import MlxOssError
from .harmony import (
    CALL,
    STOP_TOKENS,
    AnswerDelta,
    Conversation,
    HarmonyStream,
    Message,
    ReasoningDelta,
    ToolCall,
    render_prompt,
)

PREFILL_CHUNK = 512  # prompt tokens per forward pass; cancellation is checked between chunks

__all__ = [
    "AnswerDelta",
    "CancelToken",
    "ContextLimitError",
    "Done",
    "Engine",
    "EngineBusyError",
    "GenerationStats",
    "ReasoningDelta",
    "SamplingParams",
    "ToolCall",
    "sample_token",
]


class ContextLimitError(MlxOssError):
    """The prompt does not fit in the model's context."""


class EngineBusyError(MlxOssError):
    """`generate` was called while another generation on the same engine was still running."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Temperature 0 is greedy; `seed` makes sampling reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until a stop token or the context limit

    def __post_init__(self):
        if not self.temperature >= 0:
            raise MlxOssError(f"temperature must be 0 or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MlxOssError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MlxOssError(f"max tokens must be at least 1, not {self.max_tokens}")


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose keys/values came from the cache of the previous call
    generated_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Done:
    """The end of a turn.

    `stop_reason` is "stop" (`<|return|>` or `<|endoftext|>`), "tool_call" (`<|call|>`), "length" (max tokens),
    "context_limit" or "cancelled". `messages` are the assistant messages of the turn (an unfinished one
    included), ready to append to the conversation; `malformed` says some output broke the harmony format
    and was shown as plain text.
    """

    stop_reason: str
    stats: GenerationStats
    messages: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    malformed: bool = False


Event = ReasoningDelta | AnswerDelta | ToolCall | Done


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

    Sorting the whole vocabulary costs tens of milliseconds per token, so the top 64, 512, ... are tried first.
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


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Generates with one model and one KV cache; one generation at a time.

    The cache is kept between calls: a prompt that starts like the tokens of the previous call (the next turn
    of the same conversation) only prefills what is new. Cutting the cache back to the shared prefix and
    extending it gives what a fresh prefill gives, so reuse never changes the output.
    """

    def __init__(self, model, context_length: int | None = None):
        self.model = model
        limit = model.config.max_position_embeddings
        self.context_length = min(context_length or limit, limit)
        self._cache = model.new_cache()
        self._fed: list[int] = []  # tokens run through the model; the first `cache.length` are in the cache
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget the cached prefix (the next call prefills its whole prompt)."""
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("cannot reset the engine while it generates; cancel that generation first")
        try:
            self._cache.truncate(0)
            self._fed = []
        finally:
            self._lock.release()

    def respond(
        self, conversation: Conversation, sampling: SamplingParams | None = None, cancel: CancelToken | None = None
    ) -> Iterator[Event]:
        """The assistant's next turn in `conversation` (which is not changed: append `Done.messages` yourself)."""
        return self.generate(render_prompt(conversation), sampling, cancel)

    def generate(
        self, prompt: Sequence[int], sampling: SamplingParams | None = None, cancel: CancelToken | None = None
    ) -> Iterator[Event]:
        """Events of the completion of `prompt`, ending with one `Done`.

        Raises `ContextLimitError` (on the first `next`) when the prompt leaves no room to generate, and
        `EngineBusyError` when another generation on this engine is still running.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.context_length:
            raise ContextLimitError(
                f"the conversation is {len(prompt)} tokens long and the context holds {self.context_length}: "
                "start a new conversation or shorten it"
            )
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("the engine is already generating; cancel that generation first")
        try:
            yield from self._run(prompt, sampling or SamplingParams(), cancel or CancelToken())
        finally:
            self._lock.release()

    def _forward(self, tokens: list[int]) -> np.ndarray:
        self._fed[self._cache.length :] = tokens
        logits = self.model.forward(tokens, self._cache, last_only=True)
        return np.asarray(logits[-1])

    def _run(self, prompt: list[int], sampling: SamplingParams, cancel: CancelToken) -> Iterator[Event]:
        start = time.perf_counter()
        shared = min(common_prefix_length(self._fed[: self._cache.length], prompt), len(prompt) - 1)
        reused = self._cache.truncate(shared)  # a cache with bounded sliding layers may keep less
        del self._fed[reused:]
        logits = None
        for chunk_start in range(reused, len(prompt), PREFILL_CHUNK):
            if cancel.cancelled:
                break
            logits = self._forward(prompt[chunk_start : chunk_start + PREFILL_CHUNK])
        prefill_s = time.perf_counter() - start

        rng = np.random.default_rng(sampling.seed)
        stream = HarmonyStream()
        generated: list[int] = []
        first_token_s = decode_s = 0.0
        stop_reason = "cancelled"
        while logits is not None and not cancel.cancelled:
            step_start = time.perf_counter()
            token = sample_token(logits, sampling.temperature, sampling.top_p, rng)
            generated.append(token)
            if len(generated) == 1:
                first_token_s = time.perf_counter() - start
            else:
                decode_s += time.perf_counter() - step_start
            yield from stream.feed(token)
            if token in STOP_TOKENS:
                stop_reason = "tool_call" if token == CALL else "stop"
                break
            if sampling.max_tokens is not None and len(generated) >= sampling.max_tokens:
                stop_reason = "length"
                break
            if self._cache.length >= self.context_length:
                stop_reason = "context_limit"
                break
            if cancel.cancelled:
                break
            step_start = time.perf_counter()
            logits = self._forward([token])
            decode_s += time.perf_counter() - step_start
        yield from stream.finish()

        prefilled = len(prompt) - reused
        stats = GenerationStats(
            prompt_tokens=len(prompt),
            reused_tokens=reused,
            generated_tokens=len(generated),
            time_to_first_token_s=first_token_s,
            prefill_tokens_per_s=prefilled / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=(len(generated) - 1) / decode_s if decode_s > 0 else 0.0,
        )
        yield Done(stop_reason, stats, stream.messages(), generated, stream.malformed)

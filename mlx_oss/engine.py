"""The generation engine: prompt tokens in, harmony's typed events out, for every backend.

`Engine.generate` runs the token loop of `generate` (prefill what the cache lacks, sample, decode one token at
a time) and is the harmony layer on top of it: it parses the tokens into `ReasoningDelta`, `AnswerDelta` and
`ToolCall`, ends the turn at harmony's stop tokens and closes with one `Done` with the messages and the figures
of the turn. It keeps one KV cache between calls, so a prompt that shares a prefix with the previous call only
prefills what is new. It never imports a backend.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .backend import Model
from .cancel import CancelToken
from .drafting import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, PromptLookup
from .errors import MlxOssError
from .generate import Completion, Decoder, GenerationStats
from .grammar import TurnConstraints, constrainer
from .harmony import (
    CALL,
    STOP_TOKENS,
    AnswerDelta,
    Conversation,
    HarmonyStream,
    Message,
    ReasoningDelta,
    ToolCall,
    encoding,
    render_prompt,
)
from .sampling import SamplingParams, TokenLogprob, make_sampler

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
]


class ContextLimitError(MlxOssError):
    """The prompt does not fit in the model's context."""


class EngineBusyError(MlxOssError):
    """`generate` was called while another generation on the same engine was still running."""


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


class AnswerScores:
    """Pairs answer text with the log-probabilities of the tokens it came from: a token may end a header, carry
    reasoning, or hold half a character whose text comes with the next one, so the scores of answer tokens wait
    until their text is out."""

    def __init__(self):
        self.waiting: list[TokenLogprob] = []

    def attach(self, events: list, token: int, score: TokenLogprob) -> list:
        if encoding().is_special_token(token):  # a header's or a message's end: what came before was not answer
            self.waiting = []
            return events
        self.waiting.append(score)
        out = []
        for event in events:
            if isinstance(event, AnswerDelta):
                event, self.waiting = dataclasses.replace(event, logprobs=tuple(self.waiting)), []
            elif isinstance(event, ReasoningDelta):
                self.waiting = []
            out.append(event)
        return out


class Engine:
    """Generates with one model and one KV cache; one generation at a time.

    The cache is kept between calls: a prompt that starts like the tokens of the previous call (the next turn
    of the same conversation) only prefills what is new. Cutting the cache back to the shared prefix and
    extending it gives what a fresh prefill gives, so reuse never changes the output.
    """

    def __init__(self, model, context_length: int | None = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        """`draft_tokens`: how many tokens speculative decoding drafts at most per pass (`drafting`); 0: off."""
        if not 0 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise MlxOssError(f"draft tokens must be from 0 to {MAX_DRAFT_TOKENS}, not {draft_tokens}")
        self.model = model
        self.draft_tokens = draft_tokens
        # Verifying drafts needs every row's logits, which `backend.Model` promises (test doubles may not).
        self._drafts = draft_tokens > 0 and isinstance(model, Model)
        limit = model.config.max_position_embeddings
        self.context_length = min(context_length or limit, limit)
        self.decoder = Decoder(model)
        self._lock = threading.Lock()

    @property
    def _cache(self):
        return self.decoder.cache

    @property
    def _fed(self) -> list[int]:
        return self.decoder.fed

    def reset(self) -> None:
        """Forget the cached prefix (the next call prefills its whole prompt)."""
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("cannot reset the engine while it generates; cancel that generation first")
        try:
            self.decoder.truncate(0)
        finally:
            self._lock.release()

    def respond(
        self,
        conversation: Conversation,
        sampling: SamplingParams | None = None,
        cancel: CancelToken | None = None,
        constraints: TurnConstraints | None = None,
    ) -> Iterator[Event]:
        """The assistant's next turn in `conversation` (which is not changed: append `Done.messages` yourself)."""
        return self.generate(render_prompt(conversation), sampling, cancel, constraints)

    def generate(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        cancel: CancelToken | None = None,
        constraints: TurnConstraints | None = None,
    ) -> Iterator[Event]:
        """Events of the completion of `prompt`, ending with one `Done`; `constraints` hold the answer and the
        tool calls to their grammars.

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
            yield from self._run(prompt, sampling or SamplingParams(), cancel or CancelToken(), constraints)
        finally:
            self._lock.release()

    def _run(
        self, prompt: list[int], sampling: SamplingParams, cancel: CancelToken, constraints: TurnConstraints | None
    ) -> Iterator[Event]:
        """The harmony layer: the completion's tokens as events, until a stop token or the loop's own end."""
        constrain = constrainer(constraints) if constraints else None
        completion = Completion(
            self.decoder,
            prompt,
            make_sampler(sampling),
            max_tokens=sampling.max_tokens,
            context_length=self.context_length,
            cancel=cancel,
            processors=[constrain] if constrain else (),
            logprobs=sampling.logprobs,
            temperature=sampling.temperature,
            stop_tokens=STOP_TOKENS,
            drafter=PromptLookup(prompt, self.draft_tokens) if self._drafts and not constrain else None,
        )
        stream = HarmonyStream()
        stop_reason = None
        scored = AnswerScores() if sampling.logprobs is not None else None
        for token in completion:
            events = stream.feed(token)
            yield from scored.attach(events, token, completion.logprobs[-1]) if scored else events
            if token in STOP_TOKENS:
                stop_reason = "tool_call" if token == CALL else "stop"
                break
        yield from stream.finish()
        yield Done(
            stop_reason or completion.stop_reason,
            completion.stats(),
            stream.messages(),
            completion.tokens,
            stream.malformed,
        )

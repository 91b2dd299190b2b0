"""The generation engine: prompt tokens in, harmony's typed events out, for every backend.

`Engine.generate` runs the token loop of `generate` (prefill what the cache lacks, sample, decode one token at
a time) and is the harmony layer on top of it: it parses the tokens into `ReasoningDelta`, `AnswerDelta` and
`ToolCall`, ends the turn at harmony's stop tokens and closes with one `Done` with the messages and the figures
of the turn. It keeps the KV states of recent prompts (`prompt_cache`, and on disk `prompt_cache_disk` when
asked), so a prompt that shares a prefix with any of them only prefills what is new. It never imports a backend.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .backend import Model
from .cancel import CancelToken
from .drafting import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, PromptLookup
from .errors import MlxOssError
from .generate import Completion, Decoder, GenerationStats, common_prefix_length
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
from .prompt_cache import MemoryPromptCache, PromptCacheSettings
from .sampling import SamplingParams, TokenLogprob, make_sampler

log = logging.getLogger(__name__)

# A prompt is saved to disk when this many of its tokens were prefilled, or when at least `DISK_REPEATED` of them
# were reused from another conversation's cache (a prefix asked for more than once).
DISK_PREFILLED = 1024
DISK_REPEATED = 512
# A disk entry is read only when it saves this many more tokens of prefill than what memory holds: reading a state
# costs as much as prefilling some tokens on a CPU.
DISK_MIN_GAIN = 32

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
    """Generates with one model; one generation at a time.

    The decoder's cache is kept between calls, and so are the caches of recent prompts of other conversations (a
    `MemoryPromptCache` of `prompt_cache.memory_bytes`) and, when `prompt_cache.disk_bytes` and a folder allow,
    long or repeated prompts on disk for the next process. Each call starts from the cache sharing the longest
    prefix with its prompt. Cutting a cache back to a shared prefix and extending it gives what a fresh prefill
    gives, so reuse never changes the output. Without `prompt_cache` an engine keeps prompts in memory only, with
    the default budget; the chat, the server and the app pass their settings.
    """

    def __init__(
        self,
        model,
        context_length: int | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        prompt_cache: PromptCacheSettings | None = None,
    ):
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
        settings = prompt_cache or PromptCacheSettings.memory_only()
        self.memory = MemoryPromptCache(settings.memory_bytes)
        self.disk = _disk_cache(model, settings)
        self._prompt_length = 0  # of the prompt the decoder's tokens continue: a call sharing less moves away
        self._writer = None  # the thread writing the last state to disk
        self._lock = threading.Lock()

    @property
    def _cache(self):
        return self.decoder.cache

    @property
    def _fed(self) -> list[int]:
        return self.decoder.fed

    def reset(self) -> None:
        """Forget the cached prefixes kept in memory (the next call prefills its whole prompt, but for what the disk
        cache holds)."""
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("cannot reset the engine while it generates; cancel that generation first")
        try:
            self.decoder.truncate(0)
            self.memory = MemoryPromptCache(self.memory.budget)
            self._prompt_length = 0
        finally:
            self._lock.release()

    def flush(self) -> None:
        """Wait for the state being written to disk (before the process ends, or a test reads the folder)."""
        writer = self._writer
        if writer is not None:
            writer.join()

    def cache_bytes(self) -> tuple[int, int]:
        """Bytes the prompt caches take: in memory (the decoder's own cache included) and this model's on disk."""
        return self.memory.nbytes() + self.decoder.cache.nbytes(), self.disk.nbytes() if self.disk else 0

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
        source, across = self._start_from_best_prefix(prompt)
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
        try:
            for token in completion:
                events = stream.feed(token)
                yield from scored.attach(events, token, completion.logprobs[-1]) if scored else events
                if token in STOP_TOKENS:
                    stop_reason = "tool_call" if token == CALL else "stop"
                    break
            yield from stream.finish()
            stats = completion.stats()
            if stats.reused_tokens:
                stats = dataclasses.replace(stats, reused_from=source)
                log.info("prompt cache: %d of %d prompt tokens from %s", stats.reused_tokens, len(prompt), source)
            yield Done(
                stop_reason or completion.stop_reason,
                stats,
                stream.messages(),
                completion.tokens,
                stream.malformed,
            )
        finally:  # after the Done (or a consumer that stopped early): what the user waits for is out
            self._prompt_length = len(prompt)
            self._save_to_disk(prompt, completion.reused, across)

    def _start_from_best_prefix(self, prompt: list[int]) -> tuple[str, bool]:
        """Put in the decoder the cache sharing the longest prefix with `prompt`: its own, one kept in memory, or
        one on disk; keep the decoder's own as a memory entry when the prompt leaves its conversation. Returns
        where the prefix comes from ("memory" or "disk") and whether another conversation shared it (in memory)."""
        decoder, limit = self.decoder, len(prompt) - 1
        held = decoder.fed[: decoder.cache.length]
        own = min(common_prefix_length(held, prompt), limit)
        kept = self.memory.lookup(prompt, limit)
        best = max(own, kept[2] if kept else 0)
        writing = self._writer is not None and self._writer.is_alive()  # its prompt is in memory anyway
        on_disk = self.disk.lookup(prompt, limit) if self.disk and best < limit and not writing else None
        if on_disk and on_disk[2] < best + DISK_MIN_GAIN:
            on_disk = None
        moving_away = own < min(self._prompt_length, len(held))
        if moving_away:  # a copy: it holds only its positions, where the decoder's buffers have room to grow
            self.memory.put(held, decoder.cache.copy())
        if on_disk and self._load_from_disk(on_disk[0], on_disk[1]):
            return "disk", False
        if kept and kept[2] > own:
            decoder.take(kept[1].copy(), kept[0])
            return "memory", True
        return "memory", moving_away

    def _load_from_disk(self, key: str, tokens: tuple[int, ...]) -> bool:
        """Put the disk's cache of `tokens` in the decoder; False (the decoder untouched) when it is not usable."""
        state = self.disk.load(key, tokens)
        if state is None:
            return False
        try:
            cache = self.model.restore_cache(state)
        except (ValueError, TypeError) as e:
            self.disk.warn("damaged", f"ignoring and removing a saved prompt that does not fit the model: {e}")
            self.disk.discard(key)
            return False
        self.decoder.take(cache, tokens)
        return True

    def _save_to_disk(self, prompt: list[int], reused: int, across: bool) -> None:
        """Write the prompt's cache to disk in a thread when it is worth it: long to prefill, or a prefix that
        another conversation asked for too (not the next turn of the same one, which would write every turn).
        The state is taken here, from a copy, so the writer never touches what the decoder extends next."""
        if self.disk is None or not self.disk.writable:
            return
        prefilled = len(prompt) - reused
        if prefilled < DISK_PREFILLED and not (across and reused >= DISK_REPEATED):
            return
        cache = self.decoder.cache
        length = min(len(prompt), cache.length)
        if self.decoder.fed[:length] != prompt[:length] or length == 0:
            return
        self.flush()  # one writer at a time
        try:
            copy = cache.copy()
            length = copy.truncate(length)
            state, tokens = copy.state(), prompt[:length]
        except (ValueError, TypeError, NotImplementedError) as e:  # a cache kind that cannot be saved
            self.disk.warn("state", f"cannot save this cache: {e}")
            self.disk.writable = False
            return
        if length == 0:
            return
        self._writer = threading.Thread(target=self.disk.save, args=(tokens, state), name="prompt-cache-writer")
        self._writer.start()


def _disk_cache(model, settings: PromptCacheSettings):
    folder = settings.disk_folder()
    if folder is None:
        return None
    from .prompt_cache_disk import DiskPromptCache, model_identity

    if getattr(model, "kv_bits", None) == 8:  # quantized caches are kept in memory only (they offer no `state`)
        return None
    identity = model_identity(model) if hasattr(model, "restore_cache") else None
    return DiskPromptCache(folder, identity, settings.disk_bytes) if identity else None

"""Generations one at a time for many asyncio callers, and each one's events gathered into a `Turn`.

One engine runs one generation at a time, on a worker thread, in submission order; at most `max_waiting` more
wait, and one more is refused (`QueueFull`) rather than queued without bound. Events cross back to the caller's
event loop; stop sequences end the answer there, and cancel the generation at its next token. Nothing here
knows an API: the server answers `QueueFull`, and the `api` modules format the `Turn`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .cancel import CancelToken
from .engine import AnswerDelta, Done, Engine, ReasoningDelta, SamplingParams, ToolCall
from .grammar import TurnConstraints
from .sampling import TokenLogprob
from .stops import StopFilter

_FINISHED = object()  # the last item of every job's events, after its `Done` or its error


class QueueFull(Exception):
    """One generation runs and `max_waiting` more wait already."""


class Job:
    """One generation: events cross from the worker thread to the submitting event loop."""

    def __init__(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        constraints: TurnConstraints | None = None,
    ):
        self.prompt, self.sampling, self.loop, self.constraints = prompt, sampling, loop, constraints
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = CancelToken()

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class GenerationQueue:
    def __init__(self, engine: Engine, max_waiting: int = 8):
        self.engine, self.max_waiting = engine, max_waiting
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    def submit(self, prompt: list[int], sampling: SamplingParams, constraints: TurnConstraints | None = None) -> Job:
        """The generation's job, from the running event loop; `QueueFull` if too many wait already."""
        with self._lock:
            if self._queued > self.max_waiting:  # one running plus `max_waiting` waiting
                raise QueueFull
            self._queued += 1
        job = Job(prompt, sampling, asyncio.get_running_loop(), constraints)
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if not job.cancel.cancelled:
                    for event in self.engine.generate(job.prompt, job.sampling, job.cancel, job.constraints):
                        job.push(event)
            except Exception as e:  # noqa: BLE001 - the caller answers it
                job.push(e)
            finally:
                with self._lock:
                    self._queued -= 1
                job.push(_FINISHED)


@dataclass
class Turn:
    """What one generation produced, as events arrive (after stop sequences)."""

    reasoning: str = ""
    reasoning_tokens: int = 0  # generated tokens that carried reasoning (one delta each)
    answer: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the answer's tokens, when asked for
    done: Done | None = None
    stopped_by_sequence: bool = False

    @property
    def stop_reason(self) -> str:
        """The engine's stop reason, but "stop" where a stop sequence ended the answer."""
        if self.stopped_by_sequence or self.done is None:
            return "stop"
        return self.done.stop_reason


async def pieces(job: Job, stops: StopFilter, turn: Turn) -> AsyncIterator[ReasoningDelta | AnswerDelta | ToolCall]:
    """The turn's reasoning, answer (cut at the first stop sequence) and tool calls as they come; `turn` collects
    them and the final `Done`. The generation's error raises here."""
    scores: list[TokenLogprob] = []
    while (item := await job.events.get()) is not _FINISHED:
        if isinstance(item, Exception):
            raise item
        if isinstance(item, ReasoningDelta):
            turn.reasoning += item.text
            turn.reasoning_tokens += 1
            yield item
        elif isinstance(item, AnswerDelta):
            text = stops.feed(item.text)
            if stops.stopped and not turn.stopped_by_sequence:
                turn.stopped_by_sequence = True
                job.cancel.cancel()
            scores += item.logprobs  # held with the text the stop filter holds back
            if text:
                turn.answer += text
                turn.logprobs += scores
                yield AnswerDelta(text, item.channel, tuple(scores))
                scores = []
        elif isinstance(item, ToolCall):
            turn.calls.append(item)
            yield item
        elif isinstance(item, Done):
            rest = stops.flush()
            if rest:
                turn.answer += rest
                turn.logprobs += scores
                yield AnswerDelta(rest, logprobs=tuple(scores))
            turn.done = item

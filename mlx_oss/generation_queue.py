"""Generations one at a time for many asyncio callers, and each one's events gathered into a `Turn`.

One engine runs one generation at a time, on a worker thread, in submission order; at most `max_waiting` more
wait, and one more is refused (`QueueFull`) rather than queued without bound. Events cross back to the caller's
event loop; stop sequences end the answer there, and cancel the generation at its next token. Nothing here
knows an API: the server answers `QueueFull`, and the `api` modules format the `Turn`.

A job runs either as a plain generation (prompt tokens into `Engine.generate`) or, when its request enabled
built-in tools the server runs, through the agent loop (`agent.run_turn` with the job's conversation): then the
tool calls come as the loop's `ToolStarted` / `ToolFinished` between the model's steps, and the one `Done` at
the end has the whole turn's figures (a client is told the whole turn's usage, as OpenAI's hosted tools bill it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from . import agent
from .agent import ToolFinished, ToolStarted
from .cancel import CancelToken
from .engine import AnswerDelta, Done, Engine, ReasoningDelta, SamplingParams, ToolCall
from .grammar import TurnConstraints
from .harmony import Conversation
from .sampling import TokenLogprob
from .stops import StopFilter
from .tools import BuiltinTool

log = logging.getLogger("mlx_oss.generation_queue")
_FINISHED = object()  # the last item of every job's events, after its `Done` or its error


class QueueFull(Exception):
    """One generation runs and `max_waiting` more wait already."""


class Job:
    """One generation: events cross from the worker thread to the submitting event loop. With `tools` (built-in
    tools by name) it runs through the agent loop on `conversation`, which then grows by the turn's steps; those
    of them made for this job alone (`owned`) are closed once it has run."""

    def __init__(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        constraints: TurnConstraints | None = None,
        conversation: Conversation | None = None,
        tools: Mapping[str, BuiltinTool] | None = None,
        max_steps: int | None = None,
        owned: tuple[BuiltinTool, ...] = (),
    ):
        self.prompt, self.sampling, self.loop, self.constraints = prompt, sampling, loop, constraints
        self.conversation, self.tools, self.max_steps = conversation, dict(tools or {}), max_steps
        self.owned = owned
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

    def submit(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        constraints: TurnConstraints | None = None,
        conversation: Conversation | None = None,
        tools: Mapping[str, BuiltinTool] | None = None,
        max_steps: int | None = None,
        owned: tuple[BuiltinTool, ...] = (),
    ) -> Job:
        """The generation's job, from the running event loop; `QueueFull` if too many wait already. With `tools`
        the job runs `conversation` (whose rendering `prompt` is) through the agent loop, making at most
        `max_steps` tool calls (None: the loop's own limit); the `owned` ones are closed after it (or at once, if
        it is refused)."""
        if tools and conversation is None:
            raise ValueError("a job with built-in tools needs its conversation")
        with self._lock:
            if self._queued > self.max_waiting:  # one running plus `max_waiting` waiting
                _close(owned)
                raise QueueFull
            self._queued += 1
        job = Job(prompt, sampling, asyncio.get_running_loop(), constraints, conversation, tools, max_steps, owned)
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if not job.cancel.cancelled:
                    for event in self._events(job):
                        job.push(event)
            except Exception as e:  # noqa: BLE001 - the caller answers it
                job.push(e)
            finally:
                _close(job.owned)
                with self._lock:
                    self._queued -= 1
                job.push(_FINISHED)

    def _events(self, job: Job):
        """The job's events: the engine's, or the agent loop's."""
        if not job.tools:
            return self.engine.generate(job.prompt, job.sampling, job.cancel, job.constraints)
        steps = {} if job.max_steps is None else {"max_steps": job.max_steps}
        return agent.run_turn(
            self.engine, job.conversation, job.tools, job.sampling, job.cancel, job.constraints, **steps
        )


def _close(tools: tuple[BuiltinTool, ...]) -> None:
    for tool in tools:
        try:
            tool.close()
        except Exception:  # noqa: BLE001 - a tool that fails to close must not stop the queue
            log.exception("closing the %s tool failed", getattr(tool, "name", "?"))


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
    tool_runs: list[ToolFinished] = field(default_factory=list)  # the built-in tools' calls, in order

    @property
    def stop_reason(self) -> str:
        """The engine's stop reason, but "stop" where a stop sequence ended the answer."""
        if self.stopped_by_sequence or self.done is None:
            return "stop"
        return self.done.stop_reason


Piece = ReasoningDelta | AnswerDelta | ToolCall | ToolStarted | ToolFinished


async def pieces(job: Job, stops: StopFilter, turn: Turn) -> AsyncIterator[Piece]:
    """The turn's reasoning, answer (cut at the first stop sequence), tool calls and built-in tools' runs as they
    come; `turn` collects them and the final `Done`. The generation's error raises here."""
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
        elif isinstance(item, ToolStarted | ToolFinished):
            if isinstance(item, ToolFinished):
                turn.tool_runs.append(item)
            yield item
        elif isinstance(item, Done):
            rest = stops.flush()
            if rest:
                turn.answer += rest
                turn.logprobs += scores
                yield AnswerDelta(rest, logprobs=tuple(scores))
            turn.done = item

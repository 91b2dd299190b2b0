"""The agent loop: a turn in which gpt-oss may call its built-in tools (`python`, `browser.*`) before it answers.

The engine generates one step (up to `<|return|>` or `<|call|>`); when the step ends in a call of a built-in tool,
`run_turn` runs the tool, appends the call and its result to the conversation as harmony requires, and generates
again, until the model answers, calls a function tool (the client runs those: the turn ends as the engine's does),
is cancelled, or has made `max_steps` tool calls. Front ends (terminal chat, app, server) all use this one loop and
show its `ToolStarted` / `ToolFinished` events.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .cancel import CancelToken
from .engine import Done, Event
from .grammar import TurnConstraints
from .harmony import Conversation
from .sampling import SamplingParams
from .tools import BuiltinTool, ToolOutput

__all__ = ["MAX_STEPS", "ToolFinished", "ToolStarted", "run_turn"]

MAX_STEPS = 16  # built-in tool calls in one turn before the loop stops (see run_turn)


@dataclass(frozen=True)
class ToolStarted:
    """The model called a built-in tool; it runs now."""

    recipient: str  # "python", "browser.search", ...
    content: str  # the code, or the JSON arguments


@dataclass(frozen=True)
class ToolFinished:
    """A built-in tool call ended: `output` is what the model reads (`text`) and the user sees (`display`)."""

    recipient: str
    content: str
    output: ToolOutput
    seconds: float


def run_turn(
    engine,
    conversation: Conversation,
    tools: Mapping[str, BuiltinTool],
    sampling: SamplingParams | None = None,
    cancel: CancelToken | None = None,
    constraints: TurnConstraints | None = None,
    max_steps: int = MAX_STEPS,
) -> Iterator[Event | ToolStarted | ToolFinished]:
    """The assistant's whole turn in `conversation`, built-in tool calls included (skeleton: implemented next)."""
    raise NotImplementedError
    yield Done  # pragma: no cover

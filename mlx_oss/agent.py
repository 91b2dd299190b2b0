"""The agent loop: a turn in which gpt-oss may call its built-in tools (`python`, `browser.*`) before it answers.

The engine generates one step (up to `<|return|>` or `<|call|>`); when the step ends in a call of a built-in tool,
`run_turn` runs the tool, appends the call and its result to the conversation as harmony requires (both on the
analysis channel, the result spoken by the recipient called), and generates again, until the model answers, calls a
function tool (the client runs those: the turn ends as the engine's does), is cancelled, or has used up its steps.
Front ends (terminal chat, app, server) all use this one loop and show its `ToolStarted` / `ToolFinished` events.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .cancel import CancelToken
from .engine import ContextLimitError, Done, Event
from .generate import GenerationStats
from .grammar import TurnConstraints
from .harmony import BUILTIN_RECIPIENTS, Conversation, Message, ToolCall, builtin_namespace
from .sampling import SamplingParams
from .tools import BuiltinTool, ToolOutput

__all__ = ["MAX_STEPS", "STEP_LIMIT", "ToolFinished", "ToolStarted", "run_turn"]

log = logging.getLogger("mlx_oss.agent")

# Built-in tool calls one turn may run. gpt-oss browses in chains (search, open, find, open again) and retries code
# that failed, so a hard task takes several calls of each; a model looping on the same call would otherwise run
# until cancelled (with python's 120 s per call, 16 calls already bound a turn's tool time at half an hour).
MAX_STEPS = 16
STEP_LIMIT = "step_limit"  # Done.stop_reason of a turn the model would not end within its steps
CANCELLED_CALL = "The user stopped this call before it ran."  # the result of a call cancelled as it was written


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
    """The assistant's whole turn in `conversation`, built-in tool calls included.

    `tools` runs the built-in tools by name (`python`, `browser`); `conversation.builtin_tools` declares them to
    the model. Yields each step's `ReasoningDelta` / `AnswerDelta`, a `ToolStarted` and a `ToolFinished` around
    each built-in call (its engine `ToolCall` is not yielded: a `ToolCall` always means a call the caller runs,
    a function tool), and one `Done` at the very end: its `stop_reason` is the last step's ("stop", "tool_call"
    for a function call, "length", "context_limit", "cancelled") or `STEP_LIMIT`; its `messages` are every message
    the turn added to the conversation, its `tokens` all the model generated, its `stats` the whole turn's.

    The conversation is appended to as the turn goes (each step's messages, each call's result), so after the turn,
    whatever ended it, it holds the whole exchange; do not append `Done.messages` again. A built-in call always gets
    a result, so the conversation stays well formed: a tool the conversation does not run (not enabled, or
    `unavailable()`) answers that it is unavailable and why, and the model goes on; a call cancelled while the
    model wrote it answers that it did not run. Calls past `max_steps` are not run: the model is told the limit is
    reached and gets one more step to answer; a call in that step ends the turn with `STEP_LIMIT`.
    `sampling.max_tokens` bounds each step. `cancel` stops generation and is handed to the running tool. A prompt
    that outgrows the context after a tool result ends the turn with "context_limit" (the first step's raises
    `ContextLimitError`, as `Engine.respond` does).
    """
    cancel = cancel or CancelToken()
    if constraints:
        recipients = (r for name in tools for r in BUILTIN_RECIPIENTS.get(name, ()))
        constraints = dataclasses.replace(constraints, builtin=constraints.builtin | frozenset(recipients))
    turn = Turn()
    calls = 0
    while True:
        try:
            events = engine.respond(conversation, sampling, cancel, constraints)
            builtin_call, done = None, None
            for event in events:
                if isinstance(event, Done):
                    done = event
                elif isinstance(event, ToolCall) and is_builtin(event.recipient, conversation):
                    builtin_call = event
                else:
                    yield event
        except ContextLimitError:
            if not turn.steps:
                raise
            yield turn.done("context_limit")
            return
        turn.add_step(done, conversation)
        if done.stop_reason != "tool_call" or builtin_call is None:
            unfinished = conversation.messages[-1] if turn.messages else None
            if done.stop_reason == "cancelled" and unfinished and is_builtin(unfinished.recipient, conversation):
                turn.add(Message.builtin_result(unfinished.recipient, CANCELLED_CALL), conversation)
            yield turn.done(done.stop_reason)
            return
        calls += 1
        yield ToolStarted(builtin_call.recipient, builtin_call.arguments)
        started = time.perf_counter()
        if calls > max_steps:
            output = ToolOutput(step_limit_text(max_steps), error=True)
        else:
            output = call_tool(tools, builtin_call, conversation, cancel)
        yield ToolFinished(builtin_call.recipient, builtin_call.arguments, output, time.perf_counter() - started)
        turn.add(Message.builtin_result(builtin_call.recipient, output.text), conversation)
        if cancel.cancelled:
            yield turn.done("cancelled")
            return
        if calls > max_steps + 1:
            yield turn.done(STEP_LIMIT)
            return


def is_builtin(recipient: str, conversation: Conversation) -> bool:
    """Whether a call goes to a built-in tool (which we answer) rather than to the client: its namespace is
    python's or browser's, and no client tool of the conversation has that name."""
    return builtin_namespace(recipient) is not None and all(t.recipient != recipient for t in conversation.tools)


def call_tool(tools: Mapping[str, BuiltinTool], call: ToolCall, conversation, cancel: CancelToken) -> ToolOutput:
    """Runs one built-in call, or says why it cannot run; never raises (the model reads what went wrong)."""
    name = builtin_namespace(call.recipient)
    tool = tools.get(name)
    if tool is None:
        declared = name in conversation.builtin_tools
        why = "it is not enabled in this conversation" if declared else "it is not one of your tools here"
        return unavailable_output(name, why)
    reason = tool.unavailable()
    if reason:
        return unavailable_output(name, reason)
    if cancel.cancelled:
        return ToolOutput(CANCELLED_CALL, error=True)
    try:
        return tool.run(call.recipient, call.arguments, cancel)
    except Exception as e:  # the contract says run() never raises; a bug in a tool must not end the chat
        log.exception("the %s tool failed", name)
        return ToolOutput(f"The {name} tool failed: {type(e).__name__}: {e}", error=True)


def unavailable_output(name: str, why: str) -> ToolOutput:
    text = f"The {name} tool is unavailable: {why}. Go on without it."
    return ToolOutput(text, display=f"{name} is unavailable: {why}", error=True)


def step_limit_text(max_steps: int) -> str:
    return (
        f"This call was not run: the limit of {max_steps} tool calls in one turn is reached. "
        "Answer the user now with what you have, without calling any tool."
    )


class Turn:
    """What the turn's steps add up to: the messages appended, the tokens generated, the figures of each step."""

    def __init__(self):
        self.messages: list[Message] = []
        self.tokens: list[int] = []
        self.steps: list[GenerationStats] = []
        self.malformed = False

    def add(self, message: Message, conversation: Conversation) -> None:
        conversation.messages.append(message)
        self.messages.append(message)

    def add_step(self, done: Done, conversation: Conversation) -> None:
        for message in done.messages:
            self.add(message, conversation)
        self.tokens += done.tokens
        self.steps.append(done.stats)
        self.malformed |= done.malformed

    def done(self, stop_reason: str) -> Done:
        return Done(stop_reason, combined_stats(self.steps), list(self.messages), list(self.tokens), self.malformed)


def combined_stats(steps: list[GenerationStats]) -> GenerationStats:
    """The turn's figures from its steps': tokens summed (every prompt is read again, mostly from the cache, as
    OpenAI counts a hosted tool's turn), the first step's time to first token (what the user waited), and the rates
    over the time all steps spent prefilling and decoding."""
    if len(steps) == 1:
        return steps[0]
    if not steps:
        return GenerationStats(0, 0, 0, 0.0, 0.0, 0.0)
    prefilled = [s.prompt_tokens - s.reused_tokens for s in steps]
    prefill_s = sum(
        n / s.prefill_tokens_per_s for n, s in zip(prefilled, steps, strict=True) if s.prefill_tokens_per_s > 0
    )
    decoded = [max(s.generated_tokens - 1, 0) for s in steps]
    decode_s = sum(n / s.decode_tokens_per_s for n, s in zip(decoded, steps, strict=True) if s.decode_tokens_per_s > 0)
    return GenerationStats(
        prompt_tokens=sum(s.prompt_tokens for s in steps),
        reused_tokens=sum(s.reused_tokens for s in steps),
        generated_tokens=sum(s.generated_tokens for s in steps),
        time_to_first_token_s=steps[0].time_to_first_token_s,
        prefill_tokens_per_s=sum(prefilled) / prefill_s if prefill_s > 0 else 0.0,
        decode_tokens_per_s=sum(decoded) / decode_s if decode_s > 0 else 0.0,
        drafted_tokens=sum(s.drafted_tokens for s in steps),
        accepted_tokens=sum(s.accepted_tokens for s in steps),
    )

"""What every API's request shares, read into our types once: the model it names, its sampling, and the harmony
`Conversation` built from its messages (instructions first, tool calls before their results), tools, tool
choice and reasoning effort. Each API module reads its own JSON shape and hands the pieces to a
`ConversationBuilder`, so the rules of a well-formed conversation are written here alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..engine import SamplingParams
from ..grammar import TurnConstraints
from ..harmony import JSON_CONTENT, Conversation, Message, Tool
from . import fields as f
from . import tools as t
from .fields import ApiError
from .tools import Toolbox, chat_tools, choose, constraints, responses_tools

FUNCTIONS = t.FUNCTIONS + "."  # harmony's namespace of the client's function tools, as recipients begin


@dataclass
class ParsedRequest:
    """What every API's request asks for, in our terms; each API adds its own fields."""

    conversation: Conversation
    sampling: SamplingParams
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    constraints: TurnConstraints = field(default_factory=TurnConstraints)  # grammars of the answer and tool calls
    warnings: list[str] = field(default_factory=list)  # what was asked but left out (sent back in a header)


def same_model(requested: str, served: str) -> bool:
    """Whether a request's `model` names the served one: exactly, or as clients configured for other local servers
    spell it (`gpt-oss-20b` or Ollama's `gpt-oss:20b` for `openai/gpt-oss-20b`), in any case."""

    def plain(name: str) -> str:
        return name.rsplit("/", 1)[-1].replace(":", "-").lower()

    return requested == served or plain(requested) == plain(served)


def check_model(body: dict, served: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the name of the served model", "model")
    if not same_model(model, served):
        shown = model if len(model) <= 200 else model[:200] + "..."
        raise ApiError(
            404, f"The model '{shown}' does not exist; this server serves '{served}'", "model", "model_not_found"
        )
    return model


def sampling(body: dict, max_names: tuple[str, ...]) -> SamplingParams:
    return SamplingParams(
        temperature=f.number(body, "temperature", 0, 2, 1.0),
        top_p=f.number(body, "top_p", 1e-9, 1, 1.0),
        seed=f.seed(body),
        max_tokens=f.positive_int(body, *max_names),
    )


# Efforts other models take, as the nearest of gpt-oss's three: an agent set up for them must not get a 400.
EFFORTS = {
    "none": "low",
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def effort(value: Any, param: str) -> str:
    """A reasoning effort: gpt-oss's low, medium or high; none and minimal are low, xhigh and max are high."""
    if value is None:
        return "medium"
    if not isinstance(value, str) or value not in EFFORTS:
        raise ApiError(400, f"'{param}' must be one of {', '.join(EFFORTS)}, not {f.shown(value)}", param)
    return EFFORTS[value]


def tool(spec: dict, param: str) -> Tool:
    """A function tool from its `name`, `description` and `parameters` (for APIs that read their own tools)."""
    return t.function(spec, param, t.FUNCTIONS, False)


def function_tools(body: dict, limit: int, nested: bool) -> list[Tool]:
    """The request's function tools: chat's `{"type": "function", "function": {...}}` (`nested`) or the
    Responses API's tools (see `tools.responses_tools`, which also reads custom, namespace and hosted ones)."""
    return (chat_tools(body, limit) if nested else responses_tools(body, limit)).tools


def arguments(value: Any, param: str) -> str:
    """A tool call's arguments: the JSON text OpenAI sends, or (as some clients send) the object itself."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    raise ApiError(400, f"'{param}' must be a string of JSON, not {f.json_type(value)}", param)


class ConversationBuilder:
    """A conversation, message by message in the request's order: instructions only before it begins, a tool
    result only for a call made earlier, and an end the model can answer."""

    def __init__(self, instructions: str | None = None):
        self.instructions: list[str] = [instructions] if instructions else []
        self.messages: list[Message] = []
        self._calls: dict[str, str] = {}  # call id -> the recipient called
        self._tools: list[Tool] = []
        self._namespaces: dict[str, str] = {}
        self._joined: str | None = None  # the instructions with what the tool choice asks, once closed
        self.constraints = TurnConstraints()  # what the offered tools' calls must match, once offered

    def instruction(self, role: str, content: Any, where: str) -> None:
        """A system or developer message's `content` (read after its place is checked)."""
        if self.messages:
            raise ApiError(400, f"'{where}': {role} messages must come before the conversation", where)
        self.instructions.append(f.text(content, f"{where}.content"))

    def user(self, text: str) -> None:
        self.messages.append(Message.user(text))

    def note(self, text: str) -> None:
        """A note from the server about the conversation: with the instructions before it begins, else said
        by the user where it happened."""
        if self.messages:
            self.user(text)
        else:
            self.instructions.append(text)

    def reasoning(self, text: str) -> None:
        if text:
            self.messages.append(Message.reasoning(text))

    def answer(self, text: str) -> None:
        self.messages.append(Message.answer(text))

    def tool_call(
        self, call_id: str, name: str, arguments: str, namespace: str | None = None, freeform: bool = False
    ) -> None:
        """A call of the tool `name` (in `namespace`, else the functions): JSON `arguments`, or a freeform
        tool's input text."""
        recipient = f"{namespace or t.FUNCTIONS}.{name}"
        self._calls[call_id] = recipient
        self.messages.append(Message.tool_call(recipient, arguments, None if freeform else JSON_CONTENT))

    def called(self, call_id: str) -> bool:
        """Whether an earlier message made the call `call_id` (a result answers one)."""
        return call_id in self._calls

    def tool_result(self, call_id: str, output: str) -> None:
        self.messages.append(Message.tool_result(self._calls[call_id], output))

    def close(self, param: str, max_items: int) -> None:
        """Checks the messages' count and end: at least one, no more than fit, and an end the model can answer."""
        messages = self.messages
        if not messages:
            raise ApiError(400, f"'{param}' must hold at least one user message", param)
        if len(messages) > max_items:
            raise ApiError(
                400,
                f"'{param}' makes {len(messages)} messages; at most {max_items} fit in this server's context",
                param,
            )
        if messages[-1].role == "assistant" and messages[-1].recipient is None:
            raise ApiError(400, f"the last of '{param}' must be a user or tool message, not an assistant answer", param)
        if messages[-1].role == "assistant":
            raise ApiError(400, f"the tool calls at the end of '{param}' need their tool results", param)

    def offer(self, tools: list[Tool] | Toolbox, tool_choice: Any) -> list[Tool]:
        """Offers `tools` as the request's `tool_choice` asks (see `tools.choose`): `none` hides them, a required
        call is asked for in the instructions and in `constraints.must_call`; the tools offered."""
        box = tools if isinstance(tools, Toolbox) else Toolbox(tools=list(tools))
        choice = choose(tool_choice, box)
        joined = "\n\n".join(self.instructions) or None
        if choice.ask:
            joined = f"{joined}\n\n{choice.ask}" if joined else choice.ask
        self._tools, self._joined = list(choice.tools), joined
        offered = {t.namespace for t in choice.tools}
        self._namespaces = {name: text for name, text in box.namespaces.items() if name in offered}
        self.constraints = constraints(choice.tools, choice.must_call)
        return self._tools

    def conversation(self, reasoning_effort: str) -> Conversation:
        """The conversation, once `close` has checked it and `offer` has given its tools."""
        return Conversation(
            self.messages,
            reasoning_effort=reasoning_effort,
            instructions=self._joined,
            tools=self._tools,
            current_date=time.strftime("%Y-%m-%d"),
            namespace_descriptions=self._namespaces,
        )

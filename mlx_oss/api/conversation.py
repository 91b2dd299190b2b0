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
from ..harmony import REASONING_EFFORTS, Conversation, Message, Tool
from . import fields as f
from .fields import ApiError

FUNCTIONS = "functions."  # harmony's namespace of the client's function tools


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


def effort(value: Any, param: str) -> str:
    if value is None:
        return "medium"
    if value == "minimal":
        return "low"
    if not isinstance(value, str) or value not in REASONING_EFFORTS:
        raise ApiError(400, f"'{param}' must be one of low, medium, high, not {f.shown(value)}", param)
    return value


def tool(spec: dict, param: str) -> Tool:
    """A function tool from its `name`, `description` and `parameters`."""
    name, parameters = spec.get("name"), spec.get("parameters")
    if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum():
        raise ApiError(
            400, f"'{param}.name' must be a function name (letters, digits, _ and -), not {f.shown(name)}", param
        )
    description = f.string(spec, "description", f"{param}.description") or ""
    if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type", "object") != "object"):
        raise ApiError(400, f"'{param}.parameters' of '{name}' must be a JSON schema of type object", param)
    if f.nesting(parameters, f.MAX_SCHEMA_DEPTH) > f.MAX_SCHEMA_DEPTH:
        raise ApiError(
            400, f"'{param}.parameters' of '{name}' is nested more than {f.MAX_SCHEMA_DEPTH} levels deep", param
        )
    return Tool(name, description, parameters or None)


def function_tools(body: dict, limit: int, nested: bool) -> list[Tool]:
    """The request's function tools: chat's `{"type": "function", "function": {...}}` (`nested`) or responses'
    flat `{"type": "function", "name", ...}`."""
    tools = []
    for i, t in enumerate(f.items(body, "tools", limit)):
        kind = t.get("type", "function" if nested else None) if isinstance(t, dict) else None
        spec = (t.get("function") if nested else t) if kind == "function" else None
        if not isinstance(spec, dict):
            raise ApiError(400, f"'tools[{i}]' must be a function tool", f"tools[{i}]")
        tools.append(tool(spec, f"tools[{i}].function" if nested else f"tools[{i}]"))
    return tools


def chosen_name(choice: dict) -> Any:
    """The function a `tool_choice` object names: chat's `{"function": {"name"}}` or responses' `{"name"}`."""
    function = choice.get("function")
    return function.get("name") if isinstance(function, dict) else choice.get("name")


def apply_tool_choice(choice: Any, tools: list[Tool], instructions: str | None) -> tuple[list[Tool], str | None]:
    """`none` hides the tools; `required` or a named function asks for a call in the instructions (harmony has
    no way to force one)."""
    if choice is None or choice == "auto":
        return tools, instructions
    if choice == "none":
        return [], instructions
    if choice == "required":
        if not tools:
            raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice")
        ask = "Call one of the functions before you answer."
    elif isinstance(choice, dict) and isinstance(name := chosen_name(choice), str):
        if name not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice names {f.shown(name)}, which is not among the tools", "tool_choice")
        ask = f"Call the function {name} before you answer."
    else:
        raise ApiError(
            400, f"'tool_choice' must be none, auto, required or a function, not {f.json_type(choice)}", "tool_choice"
        )
    return tools, f"{instructions}\n\n{ask}" if instructions else ask


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
        self._calls: dict[str, str] = {}  # call id -> function name
        self._tools: list[Tool] = []
        self._joined: str | None = None  # the instructions with what the tool choice asks, once closed

    def instruction(self, role: str, content: Any, where: str) -> None:
        """A system or developer message's `content` (read after its place is checked)."""
        if self.messages:
            raise ApiError(400, f"'{where}': {role} messages must come before the conversation", where)
        self.instructions.append(f.text(content, f"{where}.content"))

    def user(self, text: str) -> None:
        self.messages.append(Message.user(text))

    def reasoning(self, text: str) -> None:
        if text:
            self.messages.append(Message.reasoning(text))

    def answer(self, text: str) -> None:
        self.messages.append(Message.answer(text))

    def tool_call(self, call_id: str, name: str, arguments: str) -> None:
        self._calls[call_id] = name
        self.messages.append(Message.tool_call(FUNCTIONS + name, arguments))

    def called(self, call_id: str) -> bool:
        """Whether an earlier message made the call `call_id` (a result answers one)."""
        return call_id in self._calls

    def tool_result(self, call_id: str, output: str) -> None:
        self.messages.append(Message.tool_result(FUNCTIONS + self._calls[call_id], output))

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

    def offer(self, tools: list[Tool], tool_choice: Any) -> list[Tool]:
        """Offers `tools` as the request's `tool_choice` asks (see `apply_tool_choice`); the tools offered."""
        joined = "\n\n".join(self.instructions) or None
        self._tools, self._joined = apply_tool_choice(tool_choice, tools, joined)
        return self._tools

    def conversation(self, reasoning_effort: str) -> Conversation:
        """The conversation, once `close` has checked it and `offer` has given its tools."""
        return Conversation(
            self.messages,
            reasoning_effort=reasoning_effort,
            instructions=self._joined,
            tools=self._tools,
            current_date=time.strftime("%Y-%m-%d"),
        )

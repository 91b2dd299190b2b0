"""OpenAI's Chat Completions and Responses formats, to and from our conversations. No web framework here.

Requests become a `Conversation` and `SamplingParams`, or an `ApiError` with the status, message and parameter an
OpenAI client expects (each field's type is checked in `api_fields`). The model's reasoning goes in its own field
(`reasoning_content` in chat completions, a `reasoning` item in responses), never into the answer text.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from . import api_fields as f
from .api_fields import MAX_ITEMS, ApiError
from .engine import SamplingParams
from .harmony import REASONING_EFFORTS, Conversation, Message, Tool

__all__ = ["ApiError", "Request", "parse_chat", "parse_responses"]

FUNCTIONS = "functions."


@dataclass
class Request:
    """What a chat completion or response asks for, in our terms."""

    conversation: Conversation
    sampling: SamplingParams
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False
    extras: dict[str, Any] = field(default_factory=dict)  # echoed back (responses: instructions, tools, ...)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


# -- checking pieces -------------------------------------------------------------------------------------------


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
    """A function tool from its `name`, `description` and `parameters` (chat nests them under `function`)."""
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
    elif isinstance(choice, dict) and isinstance(name := _chosen_name(choice), str):
        if name not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice names {f.shown(name)}, which is not among the tools", "tool_choice")
        ask = f"Call the function {name} before you answer."
    else:
        raise ApiError(
            400, f"'tool_choice' must be none, auto, required or a function, not {f.json_type(choice)}", "tool_choice"
        )
    return tools, f"{instructions}\n\n{ask}" if instructions else ask


def _chosen_name(choice: dict) -> Any:
    """The function a `tool_choice` object names: chat's `{"function": {"name"}}` or responses' `{"name"}`."""
    function = choice.get("function")
    return function.get("name") if isinstance(function, dict) else choice.get("name")


def _arguments(value: Any, param: str) -> str:
    """A tool call's arguments: the JSON text OpenAI sends, or (as some clients send) the object itself."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    raise ApiError(400, f"'{param}' must be a string of JSON, not {f.json_type(value)}", param)


def _check_order(messages: list[Message], param: str, limit: int) -> None:
    if not messages:
        raise ApiError(400, f"'{param}' must hold at least one user message", param)
    if len(messages) > limit:
        raise ApiError(
            400, f"'{param}' makes {len(messages)} messages; at most {limit} fit in this server's context", param
        )
    if messages[-1].role == "assistant" and messages[-1].recipient is None:
        raise ApiError(400, f"the last of '{param}' must be a user or tool message, not an assistant answer", param)
    if messages[-1].role == "assistant":
        raise ApiError(400, f"the tool calls at the end of '{param}' need their tool results", param)


def _tools(body: dict, limit: int, nested: bool) -> list[Tool]:
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


# -- chat completions ------------------------------------------------------------------------------------------


def parse_chat(body: Any, served: str, max_items: int = MAX_ITEMS) -> Request:
    """A chat completion request; `max_items` bounds its messages and tools (see `api_fields.items_limit`)."""
    body = f.request_object(body)
    check_model(body, served)
    raw = f.items(body, "messages", max_items)
    if not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported", "n")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format is not supported; ask for the format in the messages", "response_format")
    instructions: list[str] = []
    messages: list[Message] = []
    calls: dict[str, str] = {}  # tool_call_id -> function name
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if messages:
                raise ApiError(400, f"'{where}': {role} messages must come before the conversation", where)
            instructions.append(f.text(m.get("content"), f"{where}.content"))
        elif role == "user":
            messages.append(Message.user(f.text(m.get("content"), f"{where}.content")))
        elif role == "assistant":
            thought = f.string(m, "reasoning_content", f"{where}.reasoning_content") or f.string(
                m, "reasoning", f"{where}.reasoning"
            )
            if thought:
                messages.append(Message.reasoning(thought))
            text = f.text(m.get("content"), f"{where}.content")
            if text:
                messages.append(Message.answer(text))
            for j, call in enumerate(f.items(m, "tool_calls", max_items, f"{where}.tool_calls")):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ApiError(400, f"'{where}.tool_calls[{j}]' needs a function name", where)
                calls[f.identifier(call.get("id"), f"{where}.tool_calls[{j}].id")] = function["name"]
                arguments = _arguments(function.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")
                messages.append(Message.tool_call(FUNCTIONS + function["name"], arguments))
        elif role == "tool":
            call_id = f.identifier(m.get("tool_call_id"), f"{where}.tool_call_id")
            if call_id not in calls:
                raise ApiError(
                    400,
                    f"'{where}' answers tool_call_id {f.shown(call_id)}, which no earlier assistant message made",
                    where,
                )
            messages.append(
                Message.tool_result(FUNCTIONS + calls[call_id], f.text(m.get("content"), f"{where}.content"))
            )
        else:
            raise ApiError(
                400, f"'{where}.role' must be system, developer, user, assistant or tool, not {f.shown(role)}", where
            )
    _check_order(messages, "messages", max_items)
    tools, joined = apply_tool_choice(
        body.get("tool_choice"), _tools(body, max_items, nested=True), "\n\n".join(instructions) or None
    )
    options = f.obj(body, "stream_options")
    return Request(
        Conversation(
            messages,
            reasoning_effort=effort(body.get("reasoning_effort"), "reasoning_effort"),
            instructions=joined,
            tools=tools,
            current_date=time.strftime("%Y-%m-%d"),
        ),
        sampling(body, ("max_completion_tokens", "max_tokens")),
        stream=f.boolean(body, "stream"),
        stop=f.stops(body),
        include_usage=f.boolean(options, "include_usage", "stream_options.include_usage"),
    )


FINISH = {"stop": "stop", "tool_call": "tool_calls", "length": "length", "context_limit": "length", "cancelled": "stop"}


def chat_usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def tool_call_json(index: int, call_id: str, name: str, arguments: str) -> dict:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- responses -------------------------------------------------------------------------------------------------


def _tool_output(value: Any, param: str) -> str:
    """A function_call_output's `output`: a string, text parts, or (as some clients send) a JSON object."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str | list):
        return f.text(value, param)
    raise ApiError(400, f"'{param}' must be a string, not {f.json_type(value)}", param)


def parse_responses(body: Any, served: str, max_items: int = MAX_ITEMS) -> Request:
    """A Responses API request; `max_items` bounds its input items and tools."""
    body = f.request_object(body)
    check_model(body, served)
    if body.get("previous_response_id") is not None:
        raise ApiError(
            400,
            "previous_response_id is not supported (responses are not stored): send the whole conversation in 'input'",
            "previous_response_id",
        )
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else f.items(body, "input", max_items)
    if not items:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", "input")
    instructions = f.string(body, "instructions")
    text_format = f.obj(f.obj(body, "text"), "format", "text.format")
    if text_format.get("type", "text") != "text":
        raise ApiError(400, "text.format other than text is not supported; ask for the format in the input", "text")
    notes: list[str] = [instructions] if instructions else []
    messages: list[Message] = []
    calls: dict[str, str] = {}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = f.text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                if messages:
                    raise ApiError(400, f"'{where}': {role} messages must come before the conversation", where)
                notes.append(text)
            elif role == "user":
                messages.append(Message.user(text))
            elif role == "assistant":
                messages.append(Message.answer(text))
            else:
                raise ApiError(
                    400, f"'{where}.role' must be system, developer, user or assistant, not {f.shown(role)}", where
                )
        elif kind == "reasoning":
            text = _reasoning_text(f.items(item, "content", MAX_ITEMS, f"{where}.content"), f"{where}.content")
            if text:
                messages.append(Message.reasoning(text))
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise ApiError(400, f"'{where}' needs a function name", where)
            calls[f.identifier(item.get("call_id"), f"{where}.call_id")] = item["name"]
            arguments = _arguments(item.get("arguments", ""), f"{where}.arguments")
            messages.append(Message.tool_call(FUNCTIONS + item["name"], arguments))
        elif kind == "function_call_output":
            call_id = f.identifier(item.get("call_id"), f"{where}.call_id")
            if call_id not in calls:
                raise ApiError(
                    400, f"'{where}' answers call_id {f.shown(call_id)}, which no earlier function_call made", where
                )
            output = _tool_output(item.get("output"), f"{where}.output")
            messages.append(Message.tool_result(FUNCTIONS + calls[call_id], output))
        else:
            raise ApiError(400, f"'{where}.type' {f.shown(kind)} is not supported", where)
    _check_order(messages, "input", max_items)
    tools = _tools(body, max_items, nested=False)
    tools, joined = apply_tool_choice(body.get("tool_choice"), tools, "\n\n".join(notes) or None)
    reasoning = f.obj(body, "reasoning")
    parsed_sampling = sampling(body, ("max_output_tokens",))
    return Request(
        Conversation(
            messages,
            reasoning_effort=effort(reasoning.get("effort"), "reasoning.effort"),
            instructions=joined,
            tools=tools,
            current_date=time.strftime("%Y-%m-%d"),
        ),
        parsed_sampling,
        stream=f.boolean(body, "stream"),
        extras={
            "instructions": instructions,
            "tools": [
                {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}
                for t in tools
            ],
            "tool_choice": _choice_echo(body.get("tool_choice")),
            "temperature": parsed_sampling.temperature,
            "top_p": parsed_sampling.top_p,
            "max_output_tokens": parsed_sampling.max_tokens,
        },
    )


def _reasoning_text(parts: list, param: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ApiError(400, f"'{param}[{j}]' must be a reasoning_text part", param)
        texts.append(f.string(part, "text", f"{param}[{j}].text") or "")
    return "".join(texts)


def _choice_echo(choice: Any) -> str | dict:
    """The tool_choice as a response shows it: what was asked, rebuilt (never the client's object itself)."""
    if isinstance(choice, dict):
        return {"type": "function", "name": _chosen_name(choice)}
    return choice or "auto"


def response_usage(prompt: int, completion: int, cached: int, reasoning_tokens: int) -> dict:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt + completion,
    }


def response_object(
    response_id: str,
    model: str,
    status: str,
    output: list,
    usage: dict | None,
    extras: dict,
    incomplete: str | None = None,
) -> dict:
    return {
        "id": response_id,
        "object": "response",
        "created_at": now(),
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": False,
        "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "metadata": {},
        "usage": usage,
        **extras,
    }

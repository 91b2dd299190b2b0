"""OpenAI's Chat Completions and Responses formats, to and from our conversations. No web framework here.

Requests become a `Conversation` and `SamplingParams`, or an `ApiError` with the status, message and parameter an
OpenAI client expects. The model's reasoning goes in its own field (`reasoning_content` in chat completions, a
`reasoning` item in responses), never into the answer text.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .engine import SamplingParams
from .harmony import REASONING_EFFORTS, Conversation, Message, Tool

FUNCTIONS = "functions."
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error to answer with OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


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
        raise ApiError(
            404, f"The model '{model}' does not exist; this server serves '{served}'", "model", "model_not_found"
        )
    return model


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low} to {high}, not {value!r}", name)
    return float(value)


def _positive_int(body: dict, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"'{name}' must be a positive integer, not {value!r}", name)
        return value
    return None


def sampling(body: dict, max_names: tuple[str, ...]) -> SamplingParams:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ApiError(400, f"'seed' must be an integer of 0 or more, not {seed!r}", "seed")
    return SamplingParams(
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 1e-9, 1, 1.0),
        seed=seed,
        max_tokens=_positive_int(body, *max_names),
    )


def effort(value: Any, param: str) -> str:
    if value is None:
        return "medium"
    if value == "minimal":
        return "low"
    if value not in REASONING_EFFORTS:
        raise ApiError(400, f"'{param}' must be one of low, medium, high, not {value!r}", param)
    return value


def tool(name: Any, description: Any, parameters: Any, param: str) -> Tool:
    if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum():
        raise ApiError(400, f"'{param}.name' must be a function name (letters, digits, _ and -), not {name!r}", param)
    if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type", "object") != "object"):
        raise ApiError(400, f"'{param}.parameters' of '{name}' must be a JSON schema of type object", param)
    return Tool(name, description if isinstance(description, str) else "", parameters or None)


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
            raise ApiError(400, f"tool_choice names '{name}', which is not among the tools", "tool_choice")
        ask = f"Call the function {name} before you answer."
    else:
        raise ApiError(400, f"'tool_choice' must be none, auto, required or a function, not {choice!r}", "tool_choice")
    return tools, f"{instructions}\n\n{ask}" if instructions else ask


def _chosen_name(choice: dict) -> Any:
    """The function a `tool_choice` object names: chat's `{"function": {"name"}}` or responses' `{"name"}`."""
    function = choice.get("function")
    return function.get("name") if isinstance(function, dict) else choice.get("name")


def _list(body: dict, name: str, param: str | None = None) -> list:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, f"'{param or name}' must be a list", param or name)
    return value


def _id(value: Any, param: str) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ApiError(400, f"'{param}' must be a string", param)
    return str(value)


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "input_text", "output_text"):
                raise ApiError(400, f"'{param}[{i}]' has type {kind!r}; only text parts are supported", param)
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(400, f"'{param}' must be a string or a list of text parts", param)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} strings", "stop")
    return stops


def _check_order(messages: list[Message], param: str) -> None:
    if not messages:
        raise ApiError(400, f"'{param}' must hold at least one user message", param)
    if messages[-1].role == "assistant" and messages[-1].recipient is None:
        raise ApiError(400, f"the last of '{param}' must be a user or tool message, not an assistant answer", param)
    if messages[-1].role == "assistant":
        raise ApiError(400, f"the tool calls at the end of '{param}' need their tool results", param)


# -- chat completions ------------------------------------------------------------------------------------------


def parse_chat(body: Any, served: str) -> Request:
    body = _object(body)
    check_model(body, served)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    if body.get("n") not in (None, 1):
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
            instructions.append(_text(m.get("content"), f"{where}.content"))
        elif role == "user":
            messages.append(Message.user(_text(m.get("content"), f"{where}.content")))
        elif role == "assistant":
            thought = m.get("reasoning_content") or m.get("reasoning")
            if isinstance(thought, str) and thought:
                messages.append(Message.reasoning(thought))
            text = _text(m.get("content"), f"{where}.content")
            if text:
                messages.append(Message.answer(text))
            for j, call in enumerate(_list(m, "tool_calls", f"{where}.tool_calls")):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ApiError(400, f"'{where}.tool_calls[{j}]' needs a function name", where)
                calls[_id(call.get("id"), f"{where}.tool_calls[{j}].id")] = function["name"]
                arguments = function.get("arguments")
                messages.append(
                    Message.tool_call(
                        FUNCTIONS + function["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)
                    )
                )
        elif role == "tool":
            call_id = _id(m.get("tool_call_id"), f"{where}.tool_call_id")
            if call_id not in calls:
                raise ApiError(
                    400, f"'{where}' answers tool_call_id {call_id!r}, which no earlier assistant message made", where
                )
            messages.append(
                Message.tool_result(FUNCTIONS + calls[call_id], _text(m.get("content"), f"{where}.content"))
            )
        else:
            raise ApiError(
                400, f"'{where}.role' must be system, developer, user, assistant or tool, not {role!r}", where
            )
    _check_order(messages, "messages")
    tools = []
    for i, t in enumerate(_list(body, "tools")):
        function = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise ApiError(400, f"'tools[{i}]' must be a function tool", f"tools[{i}]")
        tools.append(
            tool(function.get("name"), function.get("description"), function.get("parameters"), f"tools[{i}].function")
        )
    tools, joined = apply_tool_choice(body.get("tool_choice"), tools, "\n\n".join(instructions) or None)
    options = body.get("stream_options") or {}
    return Request(
        Conversation(
            messages,
            reasoning_effort=effort(body.get("reasoning_effort"), "reasoning_effort"),
            instructions=joined,
            tools=tools,
            current_date=time.strftime("%Y-%m-%d"),
        ),
        sampling(body, ("max_completion_tokens", "max_tokens")),
        stream=bool(body.get("stream")),
        stop=_stop(body),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
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


def parse_responses(body: Any, served: str) -> Request:
    body = _object(body)
    check_model(body, served)
    if body.get("previous_response_id") is not None:
        raise ApiError(
            400,
            "previous_response_id is not supported (responses are not stored): send the whole conversation in 'input'",
            "previous_response_id",
        )
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", "instructions")
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
            text = _text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                if messages:
                    raise ApiError(400, f"'{where}': {role} messages must come before the conversation", where)
                notes.append(text)
            elif role == "user":
                messages.append(Message.user(text))
            elif role == "assistant":
                messages.append(Message.answer(text))
            else:
                raise ApiError(400, f"'{where}.role' must be system, developer, user or assistant, not {role!r}", where)
        elif kind == "reasoning":
            parts = _list(item, "content", f"{where}.content")
            text = "".join(str(part.get("text", "")) for part in parts if isinstance(part, dict))
            if text:
                messages.append(Message.reasoning(text))
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise ApiError(400, f"'{where}' needs a function name", where)
            calls[_id(item.get("call_id"), f"{where}.call_id")] = item["name"]
            messages.append(Message.tool_call(FUNCTIONS + item["name"], str(item.get("arguments", ""))))
        elif kind == "function_call_output":
            call_id = _id(item.get("call_id"), f"{where}.call_id")
            if call_id not in calls:
                raise ApiError(
                    400, f"'{where}' answers call_id {call_id!r}, which no earlier function_call made", where
                )
            output = item.get("output")
            messages.append(
                Message.tool_result(
                    FUNCTIONS + calls[call_id], output if isinstance(output, str) else json.dumps(output)
                )
            )
        else:
            raise ApiError(400, f"'{where}.type' {kind!r} is not supported", where)
    _check_order(messages, "input")
    tools = []
    for i, t in enumerate(_list(body, "tools")):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ApiError(400, f"'tools[{i}]' must be a function tool", f"tools[{i}]")
        tools.append(tool(t.get("name"), t.get("description"), t.get("parameters"), f"tools[{i}]"))
    tools, joined = apply_tool_choice(body.get("tool_choice"), tools, "\n\n".join(notes) or None)
    reasoning = body.get("reasoning") or {}
    return Request(
        Conversation(
            messages,
            reasoning_effort=effort(
                reasoning.get("effort") if isinstance(reasoning, dict) else None, "reasoning.effort"
            ),
            instructions=joined,
            tools=tools,
            current_date=time.strftime("%Y-%m-%d"),
        ),
        sampling(body, ("max_output_tokens",)),
        stream=bool(body.get("stream")),
        extras={
            "instructions": instructions,
            "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice") or "auto",
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "max_output_tokens": body.get("max_output_tokens"),
        },
    )


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

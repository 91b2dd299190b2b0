"""OpenAI's Chat Completions API: a request read into our types, a turn formatted as a completion or as its
streamed chunks. The model's reasoning goes in `reasoning_content` (as llama.cpp's and vLLM's servers do), never
into the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..engine import AnswerDelta, ReasoningDelta, ToolCall
from ..generation_queue import Turn
from . import fields as f
from . import logprobs as scores
from .conversation import (
    ConversationBuilder,
    ParsedRequest,
    arguments,
    check_model,
    effort,
    function_tools,
    sampling,
)
from .fields import MAX_ITEMS, ApiError
from .formats import format_instructions, response_format
from .wire import new_id, sse

# The engine's stop reasons as a choice's finish_reason.
FINISH = {"stop": "stop", "tool_call": "tool_calls", "length": "length", "context_limit": "length", "cancelled": "stop"}


@dataclass
class ChatRequest(ParsedRequest):
    include_usage: bool = False  # a streamed answer ends with a chunk of usage


def parse_chat(body: Any, served: str, max_items: int = MAX_ITEMS) -> ChatRequest:
    """A chat completion request; `max_items` bounds its messages and tools (see `fields.items_limit`)."""
    body = f.request_object(body)
    check_model(body, served)
    raw = f.items(body, "messages", max_items)
    if not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported", "n")
    answer = response_format(body["response_format"]) if body.get("response_format") is not None else None
    built = ConversationBuilder()
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            built.instruction(role, m.get("content"), where)
        elif role == "user":
            built.user(f.text(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            built.reasoning(
                f.string(m, "reasoning_content", f"{where}.reasoning_content")
                or f.string(m, "reasoning", f"{where}.reasoning")
                or ""
            )
            text = f.text(m.get("content"), f"{where}.content")
            if text:
                built.answer(text)
            for j, call in enumerate(f.items(m, "tool_calls", max_items, f"{where}.tool_calls")):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ApiError(400, f"'{where}.tool_calls[{j}]' needs a function name", where)
                call_id = f.identifier(call.get("id"), f"{where}.tool_calls[{j}].id")
                built.tool_call(
                    call_id,
                    function["name"],
                    arguments(function.get("arguments"), f"{where}.tool_calls[{j}].function.arguments"),
                )
        elif role == "tool":
            call_id = f.identifier(m.get("tool_call_id"), f"{where}.tool_call_id")
            if not built.called(call_id):
                raise ApiError(
                    400,
                    f"'{where}' answers tool_call_id {f.shown(call_id)}, which no earlier assistant message made",
                    where,
                )
            built.tool_result(call_id, f.text(m.get("content"), f"{where}.content"))
        else:
            raise ApiError(
                400, f"'{where}.role' must be system, developer, user, assistant or tool, not {f.shown(role)}", where
            )
    built.close("messages", max_items)
    if (told := format_instructions(body.get("response_format"))) is not None:
        built.instructions.append(told)
    built.offer(function_tools(body, max_items, nested=True), body.get("tool_choice"))
    options = f.obj(body, "stream_options")
    return ChatRequest(
        built.conversation(effort(body.get("reasoning_effort"), "reasoning_effort")),
        dataclasses.replace(
            sampling(body, ("max_completion_tokens", "max_tokens")), logprobs=scores.chat_request(body)
        ),
        stream=f.boolean(body, "stream"),
        stop=f.stops(body),
        include_usage=f.boolean(options, "include_usage", "stream_options.include_usage"),
        constraints=dataclasses.replace(built.constraints, answer=answer),
    )


def chat_usage(turn: Turn) -> dict:
    s = turn.done.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.reused_tokens},
        "completion_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
    }


def tool_call_json(index: int, call: ToolCall) -> dict:
    """A tool call as a streamed delta shows it (a whole message's calls go without `index`)."""
    function = {"name": call.function_name, "arguments": call.arguments}
    return {"index": index, "id": new_id("call_"), "type": "function", "function": function}


def chat_logprobs(scored) -> dict:
    """A choice's `logprobs`: the answer's tokens (reasoning and tool calls are not scored, as OpenAI's)."""
    return {"content": scores.content(scored), "refusal": None}


def completion(completion_id: str, created: int, model: str, turn: Turn, logprobs: bool = False) -> dict:
    """The whole turn as one chat completion (`logprobs`: with the answer tokens' scores)."""
    message: dict = {"role": "assistant", "content": turn.answer or (None if turn.calls else "")}
    if turn.reasoning:
        message["reasoning_content"] = turn.reasoning
    if turn.calls:
        message["tool_calls"] = [tool_call_json(i, call) for i, call in enumerate(turn.calls)]
        for call in message["tool_calls"]:
            del call["index"]
    usage = chat_usage(turn)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": FINISH[turn.stop_reason],
                "logprobs": chat_logprobs(turn.logprobs) if logprobs else None,
            }
        ],
        "usage": usage,
    }


class ChatChunks:
    """A streamed chat completion: a chunk per piece of the turn, one that gives the finish reason, usage if
    asked, then `[DONE]`."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool, logprobs: bool = False):
        self.completion_id, self.created, self.model, self.include_usage = completion_id, created, model, include_usage
        self.logprobs = logprobs

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None, scored=None) -> str:
        body = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": chat_logprobs(scored) if scored is not None else None,
                }
            ],
        }
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return sse(body)

    def start(self) -> list[str]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def piece(self, piece: ReasoningDelta | AnswerDelta | ToolCall, turn: Turn) -> list[str]:
        if isinstance(piece, ReasoningDelta):
            return [self.chunk({"reasoning_content": piece.text})]
        if isinstance(piece, AnswerDelta):
            return [self.chunk({"content": piece.text}, scored=piece.logprobs if self.logprobs else None)]
        return [self.chunk({"tool_calls": [tool_call_json(len(turn.calls) - 1, piece)]})]

    def end(self, turn: Turn) -> Iterator[str]:
        yield self.chunk({}, FINISH[turn.stop_reason])
        if self.include_usage:
            yield self.chunk({}, usage=chat_usage(turn))
        yield sse("[DONE]")

    def error(self, error: ApiError) -> str:
        return sse(error.body())

"""OpenAI's Responses API: a request read into our types, a turn formatted as a response or as its streaming
events. The model's reasoning is a `reasoning` output item of its own, never part of the answer's message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import AnswerDelta, ReasoningDelta, ToolCall
from ..generation_queue import Turn
from . import fields as f
from .conversation import (
    ConversationBuilder,
    ParsedRequest,
    arguments,
    check_model,
    chosen_name,
    effort,
    function_tools,
    sampling,
)
from .fields import MAX_ITEMS, ApiError
from .wire import new_id, now, sse


@dataclass
class ResponsesRequest(ParsedRequest):
    echo: dict[str, Any] = field(default_factory=dict)  # shown back in the response: instructions, tools, ...


def parse_responses(body: Any, served: str, max_items: int = MAX_ITEMS) -> ResponsesRequest:
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
    built = ConversationBuilder(instructions)
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = f.text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                built.instruction(role, text, where)
            elif role == "user":
                built.user(text)
            elif role == "assistant":
                built.answer(text)
            else:
                raise ApiError(
                    400, f"'{where}.role' must be system, developer, user or assistant, not {f.shown(role)}", where
                )
        elif kind == "reasoning":
            built.reasoning(
                _reasoning_text(f.items(item, "content", MAX_ITEMS, f"{where}.content"), f"{where}.content")
            )
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise ApiError(400, f"'{where}' needs a function name", where)
            call_id = f.identifier(item.get("call_id"), f"{where}.call_id")
            built.tool_call(call_id, item["name"], arguments(item.get("arguments", ""), f"{where}.arguments"))
        elif kind == "function_call_output":
            call_id = f.identifier(item.get("call_id"), f"{where}.call_id")
            if not built.called(call_id):
                raise ApiError(
                    400, f"'{where}' answers call_id {f.shown(call_id)}, which no earlier function_call made", where
                )
            built.tool_result(call_id, _tool_output(item.get("output"), f"{where}.output"))
        else:
            raise ApiError(400, f"'{where}.type' {f.shown(kind)} is not supported", where)
    built.close("input", max_items)
    tools = built.offer(function_tools(body, max_items, nested=False), body.get("tool_choice"))
    reasoning = f.obj(body, "reasoning")
    parsed_sampling = sampling(body, ("max_output_tokens",))
    return ResponsesRequest(
        built.conversation(effort(reasoning.get("effort"), "reasoning.effort")),
        parsed_sampling,
        stream=f.boolean(body, "stream"),
        echo={
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


def _tool_output(value: Any, param: str) -> str:
    """A function_call_output's `output`: a string, text parts, or (as some clients send) a JSON object."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str | list):
        return f.text(value, param)
    raise ApiError(400, f"'{param}' must be a string, not {f.json_type(value)}", param)


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
        return {"type": "function", "name": chosen_name(choice)}
    return choice or "auto"


# -- answers ---------------------------------------------------------------------------------------------------


def response_usage(turn: Turn) -> dict:
    s = turn.done.stats
    return {
        "input_tokens": s.prompt_tokens,
        "input_tokens_details": {"cached_tokens": s.reused_tokens},
        "output_tokens": s.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
        "total_tokens": s.prompt_tokens + s.generated_tokens,
    }


def response(response_id: str, model: str, turn: Turn | None, echo: dict, items: list | None = None) -> dict:
    """The response object: in progress while `turn` is None or unfinished; else with the turn's output (or
    `items`, the ones already streamed) and usage."""
    status, output, usage, incomplete = "in_progress", [], None, None
    if turn is not None and turn.done is not None:
        usage = response_usage(turn)
        incomplete = "max_output_tokens" if turn.done.stop_reason in ("length", "context_limit") else None
        status = "incomplete" if incomplete else "completed"
        output = items if items is not None else output_items(turn)
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
        **echo,
    }


def output_items(turn: Turn) -> list[dict]:
    items = []
    if turn.reasoning:
        items.append(reasoning_item(new_id("rs_"), turn.reasoning))
    if turn.answer or not (turn.calls or turn.reasoning):
        items.append(message_item(new_id("msg_"), turn.answer, "completed"))
    items += [call_item(new_id("fc_"), call) for call in turn.calls]
    return items


def reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call: ToolCall) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": new_id("call_"),
        "name": call.function_name,
        "arguments": call.arguments,
        "status": "completed",
    }


class ResponseEvents:
    """The Responses API's streaming events for one turn: items open and close as the model moves from
    reasoning to answer to tool calls."""

    def __init__(self, response_id: str, model: str, echo: dict):
        self.response_id, self.model, self.echo = response_id, model, echo
        self.sequence = 0
        self.items: list[dict] = []
        self.open: tuple[str, str, str] | None = None  # (kind, item id, text so far)

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n" + sse(body)

    def start(self) -> list[str]:
        return [self.event("response.created", response=response(self.response_id, self.model, None, self.echo))]

    def end(self, turn: Turn) -> Iterator[str]:
        yield from self.close()
        done = response(self.response_id, self.model, turn, self.echo, self.items)
        yield self.event("response.completed", response=done)

    def error(self, error: ApiError) -> str:
        return self.event("error", message=error.message, code=error.code, param=error.param)

    def piece(self, piece: ReasoningDelta | AnswerDelta | ToolCall, turn: Turn) -> list[str]:
        kind = "call" if isinstance(piece, ToolCall) else "reasoning" if isinstance(piece, ReasoningDelta) else "answer"
        out = []
        if self.open and self.open[0] != kind:
            out += self.close()
        index = len(self.items)
        if isinstance(piece, ToolCall):
            item = call_item(new_id("fc_"), piece)
            out.append(self.event("response.output_item.added", output_index=index, item={**item, "arguments": ""}))
            where = {"item_id": item["id"], "output_index": index}
            out.append(self.event("response.function_call_arguments.delta", **where, delta=piece.arguments))
            out.append(self.event("response.function_call_arguments.done", **where, arguments=piece.arguments))
            out.append(self.event("response.output_item.done", output_index=index, item=item))
            self.items.append(item)
            return out
        if self.open is None:
            item_id = new_id("rs_" if kind == "reasoning" else "msg_")
            self.open = (kind, item_id, "")
            if kind == "reasoning":
                item = {"type": "reasoning", "id": item_id, "summary": [], "content": []}
                out.append(self.event("response.output_item.added", output_index=index, item=item))
            else:
                out.append(
                    self.event(
                        "response.output_item.added", output_index=index, item=message_item(item_id, "", "in_progress")
                    )
                )
                out.append(
                    self.event(
                        "response.content_part.added",
                        item_id=item_id,
                        output_index=index,
                        content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )
                )
        _, item_id, so_far = self.open
        self.open = (kind, item_id, so_far + piece.text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        out.append(self.event(name, item_id=item_id, output_index=index, content_index=0, delta=piece.text))
        return out

    def close(self) -> list[str]:
        """The open reasoning or message item's closing events, if one is open."""
        if self.open is None:
            return []
        kind, item_id, text = self.open
        self.open = None
        index = len(self.items)
        if kind == "reasoning":
            item = reasoning_item(item_id, text)
            out = [
                self.event(
                    "response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0, text=text
                )
            ]
        else:
            item = message_item(item_id, text, "completed")
            part = item["content"][0]
            out = [
                self.event(
                    "response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text
                ),
                self.event(
                    "response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part
                ),
            ]
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out

"""OpenAI's Responses API: a request read into our types, a turn formatted as a response or as its streaming
events, as agents (Codex CLI, the openai-agents SDK) use it. The model's reasoning is a `reasoning` output item of
its own, never part of the answer's message.

Reasoning is shown as the client asks:

- Always as the item's `reasoning_text` content (and `response.reasoning_text.*` events), which clients that show
  raw reasoning read (Codex with `show_raw_agent_reasoning`).
- With `reasoning.summary` (auto, concise or detailed; Codex asks for auto) also as the item's one summary part,
  streamed as `response.reasoning_summary_part.added`, `response.reasoning_summary_text.delta` / `.done` and
  `response.reasoning_summary_part.done`. gpt-oss has no summarizer, and a client that asks for a summary wants
  to see what the model thought, so the summary is the chain of thought itself: unfiltered, as the model wrote
  it. This is what makes the reasoning show in Codex without settings.
- With `include: ["reasoning.encrypted_content"]` (Codex, `store: false`) the item carries `encrypted_content`:
  the reasoning base64'd, not encrypted (see `wire.encrypt_reasoning`), so that the item sent back
  restores the chain of thought before a pending tool call.

Tool calls come back as the tool was offered (see `tools`): `function_call` (with `namespace` for a namespace's
tool), `custom_tool_call` with `input`, `local_shell_call` with `action`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import AnswerDelta, ReasoningDelta, SamplingParams, ToolCall
from ..generation_queue import Turn
from . import fields as f
from . import logprobs as scores
from .conversation import ConversationBuilder, ParsedRequest, check_model, effort, sampling
from .fields import MAX_ITEMS, ApiError
from .formats import format_instructions, text_format
from .response_input import read_input
from .tools import CUSTOM, LOCAL_SHELL, Offered, responses_tools
from .wire import encrypt_reasoning, new_id, now, sse

SUMMARIES = ("auto", "concise", "detailed")
ENCRYPTED_REASONING = "reasoning.encrypted_content"
TEXT_LOGPROBS = "message.output_text.logprobs"
TRUNCATIONS = ("auto", "disabled")
MAX_METADATA = 16  # key-value pairs, as OpenAI allows
MAX_INCLUDES = 64  # OpenAI knows about ten


@dataclass
class Shapes:
    """How this request's output is shown: the offered tools by recipient (a call's item type and name), whether
    reasoning also goes in a summary, and whether reasoning items carry `encrypted_content`."""

    tools: dict[str, Offered] = field(default_factory=dict)
    summary: bool = False
    encrypted: bool = False
    logprobs: bool = False  # the answer's text parts carry their tokens' log-probabilities


@dataclass
class ResponsesRequest(ParsedRequest):
    echo: dict[str, Any] = field(default_factory=dict)  # the request's fields a response shows back
    shapes: Shapes = field(default_factory=Shapes)


def parse_responses(body: Any, served: str, max_items: int = MAX_ITEMS) -> ResponsesRequest:
    """A Responses API request; `max_items` bounds its input items and tools."""
    body = f.request_object(body)
    check_model(body, served)
    for name, why in (
        ("previous_response_id", "responses are not stored: send the whole conversation in 'input'"),
        ("conversation", "conversations are not stored: send the whole conversation in 'input'"),
        ("prompt", "stored prompts are OpenAI's: send the instructions and input themselves"),
    ):
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is not supported ({why})", name)
    if f.boolean(body, "background"):
        raise ApiError(400, "background responses are not supported: this server answers while you wait", "background")
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else f.items(body, "input", max_items)
    if not items:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", "input")
    instructions = f.string(body, "instructions")
    text = f.obj(body, "text")
    answer = text_format(text["format"]) if text.get("format") is not None else None
    warnings: list[str] = []
    built = ConversationBuilder(instructions)
    read_input(items, built, warnings)
    built.close("input", max_items)
    if (told := format_instructions(text.get("format"))) is not None:
        built.instructions.append(told)
    box = responses_tools(body, max_items)
    offered = built.offer(box, body.get("tool_choice"))
    warnings += box.warnings
    reasoning = f.obj(body, "reasoning")
    summary = reasoning.get("summary", reasoning.get("generate_summary"))
    if summary is not None and summary not in SUMMARIES:
        raise ApiError(
            400, f"'reasoning.summary' must be auto, concise or detailed, not {f.shown(summary)}", "reasoning.summary"
        )
    include = f.strings(body, "include", MAX_INCLUDES)
    top = body.get("top_logprobs")
    top = scores.top_count(top, "top_logprobs") if top is not None else None
    scored = TEXT_LOGPROBS in include or top is not None
    parsed_sampling = dataclasses.replace(
        sampling(body, ("max_output_tokens",)), logprobs=(top or 0) if scored else None
    )
    shapes = Shapes(
        {t.recipient: t for t in offered if isinstance(t, Offered)},
        summary is not None,
        ENCRYPTED_REASONING in include,
        scored,
    )
    return ResponsesRequest(
        built.conversation(effort(reasoning.get("effort"), "reasoning.effort")),
        parsed_sampling,
        stream=f.boolean(body, "stream"),
        constraints=dataclasses.replace(built.constraints, answer=answer),
        warnings=warnings,
        echo=_echoed(body, instructions, box.echo, reasoning, summary, include, parsed_sampling),
        shapes=shapes,
    )


def _echoed(
    body: dict,
    instructions: str | None,
    tools: list[dict],
    reasoning: dict,
    summary: str | None,
    include: list[str],
    parsed: SamplingParams,
) -> dict:
    """The request's fields as the response shows them, each checked for the type OpenAI documents."""
    metadata = f.obj(body, "metadata")
    if len(metadata) > MAX_METADATA or not all(isinstance(v, str) for v in metadata.values()):
        raise ApiError(400, f"'metadata' must hold at most {MAX_METADATA} string values", "metadata")
    truncation = body.get("truncation") or "disabled"
    if truncation not in TRUNCATIONS:
        raise ApiError(400, f"'truncation' must be auto or disabled, not {f.shown(truncation)}", "truncation")
    text = f.obj(body, "text")
    verbosity = f.string(text, "verbosity", "text.verbosity")
    parallel = body.get("parallel_tool_calls")
    store = body.get("store")
    return {
        "instructions": instructions,
        "tools": tools,
        "tool_choice": _choice_echo(body.get("tool_choice")),
        "temperature": parsed.temperature,
        "top_p": parsed.top_p,
        "max_output_tokens": parsed.max_tokens,
        "parallel_tool_calls": True if parallel is None else f.boolean(body, "parallel_tool_calls"),
        "store": True if store is None else f.boolean(body, "store"),
        "metadata": metadata,
        "text": {"format": _format_echo(text.get("format")), **({"verbosity": verbosity} if verbosity else {})},
        "truncation": truncation,
        "reasoning": {"effort": reasoning.get("effort"), "summary": summary},
        "include": include,
        "prompt_cache_key": f.string(body, "prompt_cache_key"),
        "user": f.string(body, "user"),
        "safety_identifier": f.string(body, "safety_identifier"),
        "service_tier": f.string(body, "service_tier") or "default",
        "top_logprobs": parsed.logprobs,
        "max_tool_calls": f.positive_int(body, "max_tool_calls"),
        "background": False,
    }


def _format_echo(value: Any) -> dict:
    """The text.format as a response shows it (already checked by `formats.text_format`), rebuilt from its
    known fields."""
    if not isinstance(value, dict):
        return {"type": "text"}
    return {k: value[k] for k in ("type", "name", "schema", "strict", "description") if k in value}


def _choice_echo(choice: Any) -> str | dict:
    """The tool_choice as a response shows it: what was asked, rebuilt from its known fields."""
    if isinstance(choice, dict):
        kept = {k: choice[k] for k in ("type", "name", "namespace", "mode", "tools") if k in choice}
        function = choice.get("function")
        if "name" not in kept and isinstance(function, dict) and isinstance(function.get("name"), str):
            kept["name"] = function["name"]
        return {"type": "function", **kept}
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


def response(
    response_id: str, model: str, turn: Turn | None, request: ResponsesRequest, items: list | None = None
) -> dict:
    """The response object: in progress while `turn` is None or unfinished; else with the turn's output (or
    `items`, the ones already streamed) and usage."""
    status, output, usage, incomplete = "in_progress", [], None, None
    if turn is not None and turn.done is not None:
        usage = response_usage(turn)
        incomplete = "max_output_tokens" if turn.done.stop_reason in ("length", "context_limit") else None
        status = "incomplete" if incomplete else "completed"
        output = items if items is not None else output_items(turn, request.shapes)
    return {
        "id": response_id,
        "object": "response",
        "created_at": now(),
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "metadata": {},
        "usage": usage,
        **request.echo,
    }


def output_items(turn: Turn, shapes: Shapes | None = None) -> list[dict]:
    shapes = shapes or Shapes()
    items = []
    if turn.reasoning:
        items.append(reasoning_item(new_id("rs_"), turn.reasoning, shapes))
    if turn.answer or not (turn.calls or turn.reasoning):
        scored = scores.content(turn.logprobs) if shapes.logprobs else None
        items.append(message_item(new_id("msg_"), turn.answer, "completed", scored))
    items += [call_item(call, shapes) for call in turn.calls]
    return items


def reasoning_item(item_id: str, text: str, shapes: Shapes | None = None) -> dict:
    shapes = shapes or Shapes()
    item = {
        "type": "reasoning",
        "id": item_id,
        "summary": [{"type": "summary_text", "text": text}] if shapes.summary else [],
        "content": [{"type": "reasoning_text", "text": text}],
    }
    if shapes.encrypted:
        item["encrypted_content"] = encrypt_reasoning(text)
    return item


def message_item(item_id: str, text: str, status: str, logprobs: list[dict] | None = None) -> dict:
    """An answer's message item; `logprobs`, when asked for, the entries of its tokens."""
    part = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    content = [part] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(call: ToolCall, shapes: Shapes | None = None) -> dict:
    """A call as the offered tool's kind answers it: a local_shell_call with its `action`, a custom_tool_call
    with its `input`, else a function_call (with `namespace` for a tool in one; a recipient the model made up
    goes back as a function named after it)."""
    tool = (shapes or Shapes()).tools.get(call.recipient)
    call_id = new_id("call_")
    if tool is not None and tool.kind == LOCAL_SHELL:
        action = _shell_action(call.arguments)
        if action is not None:
            return {
                "type": "local_shell_call",
                "id": new_id("lsh_"),
                "call_id": call_id,
                "status": "completed",
                "action": action,
            }
    if tool is not None and tool.kind == CUSTOM:
        item = {
            "type": "custom_tool_call",
            "id": new_id("ctc_"),
            "call_id": call_id,
            "name": tool.name,
            "input": call.arguments,
        }
    else:
        namespace, _, name = call.recipient.rpartition(".") if tool is None else (tool.namespace, "", tool.name)
        item = {
            "type": "function_call",
            "id": new_id("fc_"),
            "call_id": call_id,
            "name": name,
            "arguments": call.arguments,
        }
        if namespace and namespace != "functions":
            item["namespace"] = namespace
    item["status"] = "completed"
    return item


def _shell_action(arguments: str) -> dict | None:
    """A local_shell call's arguments as OpenAI's exec action; None if they are not one."""
    try:
        action = json.loads(arguments)
    except ValueError:
        return None
    command = action.get("command") if isinstance(action, dict) else None
    if not isinstance(command, list) or not all(isinstance(part, str) for part in command):
        return None
    keys = ("working_directory", "timeout_ms", "env", "user")
    return {"type": "exec", "command": command, **{key: action.get(key) for key in keys}}


class ResponseEvents:
    """The Responses API's streaming events for one turn: items open and close as the model moves from
    reasoning to answer to tool calls; the last event is `response.completed`, or `response.incomplete` for a
    turn cut short by its token limit."""

    def __init__(self, response_id: str, model: str, request: ResponsesRequest):
        self.response_id, self.model, self.request = response_id, model, request
        self.shapes = request.shapes
        self.sequence = 0
        self.items: list[dict] = []
        self.open: tuple[str, str, str] | None = None  # (kind, item id, text so far)
        self.scored: list[dict] = []  # the open message's token entries, when log-probabilities are asked for

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n" + sse(body)

    def start(self) -> list[str]:
        started = response(self.response_id, self.model, None, self.request)
        return [self.event("response.created", response=started), self.event("response.in_progress", response=started)]

    def end(self, turn: Turn) -> Iterator[str]:
        yield from self.close()
        done = response(self.response_id, self.model, turn, self.request, self.items)
        yield self.event(
            "response.incomplete" if done["status"] == "incomplete" else "response.completed", response=done
        )

    def error(self, error: ApiError) -> str:
        return self.event("error", message=error.message, code=error.code, param=error.param)

    def piece(self, piece: ReasoningDelta | AnswerDelta | ToolCall, turn: Turn) -> list[str]:
        kind = "call" if isinstance(piece, ToolCall) else "reasoning" if isinstance(piece, ReasoningDelta) else "answer"
        out = []
        if self.open and self.open[0] != kind:
            out += self.close()
        index = len(self.items)
        if isinstance(piece, ToolCall):
            return out + self._call(piece, index)
        if self.open is None:
            out += self._open(kind, index)
        _, item_id, so_far = self.open
        self.open = (kind, item_id, so_far + piece.text)
        where = {"item_id": item_id, "output_index": index}
        if kind == "answer":
            entries = scores.content(piece.logprobs) if self.shapes.logprobs else []
            self.scored += entries
            out.append(
                self.event("response.output_text.delta", **where, content_index=0, delta=piece.text, logprobs=entries)
            )
            return out
        out.append(self.event("response.reasoning_text.delta", **where, content_index=0, delta=piece.text))
        if self.shapes.summary:
            out.append(self.event("response.reasoning_summary_text.delta", **where, summary_index=0, delta=piece.text))
        return out

    def _open(self, kind: str, index: int) -> list[str]:
        item_id = new_id("rs_" if kind == "reasoning" else "msg_")
        self.open = (kind, item_id, "")
        if kind == "reasoning":
            item = {"type": "reasoning", "id": item_id, "summary": [], "content": []}
            out = [self.event("response.output_item.added", output_index=index, item=item)]
            if self.shapes.summary:
                part = {"type": "summary_text", "text": ""}
                where = {"item_id": item_id, "output_index": index, "summary_index": 0}
                out.append(self.event("response.reasoning_summary_part.added", **where, part=part))
            return out
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self.event("response.output_item.added", output_index=index, item=message_item(item_id, "", "in_progress")),
            self.event("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=part),
        ]

    def _call(self, call: ToolCall, index: int) -> list[str]:
        item = call_item(call, self.shapes)
        out = []
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            added = {**item, "arguments": "", "status": "in_progress"}
            out.append(self.event("response.output_item.added", output_index=index, item=added))
            out.append(self.event("response.function_call_arguments.delta", **where, delta=call.arguments))
            out.append(self.event("response.function_call_arguments.done", **where, arguments=call.arguments))
        elif item["type"] == "custom_tool_call":
            added = {**item, "input": "", "status": "in_progress"}
            out.append(self.event("response.output_item.added", output_index=index, item=added))
            out.append(self.event("response.custom_tool_call_input.delta", **where, delta=call.arguments))
            out.append(self.event("response.custom_tool_call_input.done", **where, input=call.arguments))
        else:
            added = {**item, "status": "in_progress"}
            out.append(self.event("response.output_item.added", output_index=index, item=added))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out

    def close(self) -> list[str]:
        """The open reasoning or message item's closing events, if one is open."""
        if self.open is None:
            return []
        kind, item_id, text = self.open
        self.open = None
        index = len(self.items)
        where = {"item_id": item_id, "output_index": index}
        if kind == "reasoning":
            item = reasoning_item(item_id, text, self.shapes)
            out = [self.event("response.reasoning_text.done", **where, content_index=0, text=text)]
            if self.shapes.summary:
                part = item["summary"][0]
                out.append(self.event("response.reasoning_summary_text.done", **where, summary_index=0, text=text))
                out.append(self.event("response.reasoning_summary_part.done", **where, summary_index=0, part=part))
        else:
            item = message_item(item_id, text, "completed", self.scored if self.shapes.logprobs else None)
            part, entries, self.scored = item["content"][0], self.scored, []
            out = [
                self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=entries),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out

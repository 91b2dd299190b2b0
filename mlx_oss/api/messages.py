"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): a request read into our types, a turn
formatted as a message or as its streamed events, and errors in Anthropic's shape, so that Claude Code and the
`anthropic` clients run on the local model.

Decisions, each for a client that must keep working rather than for a perfect mirror of Anthropic:

- Any `model` name is answered by the served model (as llama.cpp's server does): Claude Code asks for its own
  model names for side tasks (a haiku model for titles and summaries) unless told otherwise, and a 404 there
  breaks the session. A name that is not the served one is said in the warning header.
- gpt-oss always reasons; `thinking` only chooses the reasoning effort and whether the reasoning is shown as
  `thinking` blocks (see `effort_of`). Without `thinking` enabled no thinking block is sent, as Anthropic does,
  so clients that read `content[0].text` find the text. Signatures are not checked: a thinking block sent back
  is the model's own reasoning, whatever its signature.
- Images and documents are replaced by a short note in the text: a 400 would stop an agent whose tool returned
  a screenshot, and the model reads text only. Of the tools Anthropic defines, the two the client runs itself
  (`bash_...`, `text_editor_...`) are declared with the inputs Anthropic documents (their schemas live in
  Claude); the rest (`web_search_...`, code execution, computer use, memory) are left out with a warning.
- Blocks of kinds this server cannot use (a hosted tool's `server_tool_use` and results in a conversation begun
  with Claude, kinds newer than this module) are left out with a warning rather than refused.
- `top_k` is accepted and ignored (said in the warning header); `disable_parallel_tool_use` holds anyway, since
  a harmony turn ends at its first call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import AnswerDelta, ReasoningDelta, ToolCall
from ..generation_queue import Turn
from ..grammar import Grammar, TurnConstraints
from ..harmony import Tool
from ..stops import StopFilter
from . import fields as f
from .conversation import FUNCTIONS, ConversationBuilder, ParsedRequest, same_model, sampling, tool
from .fields import MAX_ITEMS, ApiError
from .wire import decrypt_reasoning, encrypt_reasoning, new_id, sse

# The engine's stop reasons as Anthropic's.
STOP_REASONS = {
    "stop": "end_turn",
    "tool_call": "tool_use",
    "length": "max_tokens",
    "context_limit": "model_context_window_exceeded",
    "cancelled": "end_turn",
}
# Anthropic's error type for each status; any other 4xx is an invalid request, as Anthropic documents.
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
OVERLOADED = 529  # Anthropic's status for a server too busy for anyone (our full queue), which clients retry
UNPARSED = "mlx_oss_unparsed_input"  # a tool_use input that was not a JSON object: the model's text, kept whole
THINKING_SHOWN, THINKING_OMITTED, THINKING_HIDDEN = "shown", "omitted", "hidden"
# Tools Anthropic defines that the client runs: their schemas live in Claude, so they are declared here as
# Anthropic documents them (bash_20250124; text_editor_20250124 and later), and a call goes back as its tool_use.
CLIENT_TOOLS = {
    "bash_": (
        "Run a command in a persistent bash shell; its output is the result.",
        {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The bash command to run."},
                "restart": {"type": "boolean", "description": "Restart the shell instead of running a command."},
            },
        },
    ),
    "text_editor_": (
        "View, create and edit text files: view a file (with line numbers) or a directory, create a file, "
        "replace a unique string, insert text after a line.",
        {
            "type": "object",
            "properties": {
                "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
                "path": {"type": "string", "description": "The file or directory."},
                "view_range": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "view: first and last line, 1-based; -1 is the end of the file.",
                },
                "file_text": {"type": "string", "description": "create: the new file's content."},
                "old_str": {"type": "string", "description": "str_replace: the text to replace, exactly once."},
                "new_str": {"type": "string", "description": "str_replace: the new text; insert: the text."},
                "insert_line": {"type": "integer", "description": "insert: the line after which (0: the start)."},
            },
            "required": ["command", "path"],
        },
    ),
}
NOTE_FOR = {
    "image": "[an image was attached here; this model reads text only]",
    "document": "[a document was attached here; this model reads text only]",
}


@dataclass
class MessagesRequest(ParsedRequest):
    thinking: str = THINKING_HIDDEN  # thinking blocks: shown, omitted (empty, with a signature) or hidden


# -- the request -----------------------------------------------------------------------------------------------


def parse_messages(body: Any, served: str, max_items: int = MAX_ITEMS, counting: bool = False) -> MessagesRequest:
    """A Messages API request (`counting`: one for count_tokens, which takes no `max_tokens`); `max_items` bounds
    its messages and tools."""
    body = f.request_object(body)
    warnings: list[str] = []
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a model name (any name is answered by the served model)", "model")
    if not same_model(model, served):
        warnings.append(f"model {model[:100]!r} is answered by {served!r}, the model served here")
    if not counting and body.get("max_tokens") is None:
        raise ApiError(400, "'max_tokens' is required", "max_tokens")
    f.number(body, "temperature", 0, 1, 1.0)  # Anthropic's range, narrower than OpenAI's
    if body.get("top_k") is not None:
        top_k = body["top_k"]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ApiError(400, f"'top_k' must be a non-negative integer, not {f.shown(top_k)}", "top_k")
        warnings.append("top_k is ignored (temperature and top_p are used)")
    f.obj(body, "metadata")
    built = ConversationBuilder()
    system = _system(body.get("system"), "system")
    if system:
        built.instruction("system", system, "system")
    raw = f.items(body, "messages", max_items)
    if not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        role, content = message.get("role"), message.get("content")
        if role == "user":
            _user(built, content, f"{where}.content", warnings)
        elif role == "assistant":
            _assistant(built, content, f"{where}.content", warnings)
        elif role == "system":  # Claude Code sends them amid the conversation: said there, as the user's words
            text = _system(content, f"{where}.content")
            if i == 0 and not system:
                built.instruction("system", text, where)
            elif text:
                built.user(text)
        else:
            raise ApiError(
                400, f"'{where}.role' must be user, assistant or system, not {f.shown(role)}", f"{where}.role"
            )
    built.close("messages", max_items)
    tools, grammars = _tools(body, max_items, warnings)
    choice, must_call = _tool_choice(body.get("tool_choice"), tools)
    offered = {FUNCTIONS + t.name for t in built.offer(tools, choice)}
    output_config = f.obj(body, "output_config")
    answer_format = f.obj(output_config, "format", "output_config.format")
    constraints = TurnConstraints(
        answer=_answer_grammar(answer_format),
        calls={recipient: grammar for recipient, grammar in grammars.items() if recipient in offered},
        must_call=must_call,
    )
    shown, effort = effort_of(f.obj(body, "thinking"), output_config.get("effort"))
    return MessagesRequest(
        built.conversation(effort),
        sampling(body, ("max_tokens",)),
        stream=f.boolean(body, "stream"),
        stop=_stop_sequences(body),
        constraints=constraints,
        warnings=warnings,
        thinking=shown,
    )


def effort_of(thinking: dict, effort: Any) -> tuple[str, str]:
    """(how thinking blocks are shown, harmony's reasoning effort) for a request's `thinking` and
    `output_config.effort`.

    gpt-oss always reasons, so `disabled` is the least it can do (low) and hides the reasoning. `enabled` maps its
    budget: under 4096 tokens low, under 16384 medium, more high. `adaptive` leaves the choice to the model,
    whose default is medium. `output_config.effort` wins where given (xhigh and max are high). No `thinking` is
    medium with the reasoning hidden, as Anthropic sends no thinking blocks then.
    """
    kind = thinking.get("type")
    display = f.string(thinking, "display", "thinking.display")
    shown = THINKING_OMITTED if display == "omitted" else THINKING_SHOWN
    if kind is None and not thinking:
        shown, level = THINKING_HIDDEN, "medium"
    elif kind == "disabled":
        shown, level = THINKING_HIDDEN, "low"
    elif kind == "adaptive":
        level = "medium"
    elif kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ApiError(
                400, f"'thinking.budget_tokens' must be a positive integer, not {f.shown(budget)}", "thinking"
            )
        level = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    else:
        raise ApiError(
            400, f"'thinking.type' must be enabled, disabled or adaptive, not {f.shown(kind)}", "thinking.type"
        )
    if effort is not None:
        levels = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
        if not isinstance(effort, str) or effort not in levels:
            raise ApiError(
                400,
                f"'output_config.effort' must be low, medium, high, xhigh or max, not {f.shown(effort)}",
                "output_config.effort",
            )
        level = levels[effort]
    return shown, level


def _system(value: Any, where: str) -> str:
    """A system prompt: a string or text blocks (Claude Code sends several, some with cache_control)."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise ApiError(400, f"'{where}' must be a string or a list of text blocks, not {f.json_type(value)}", where)
    if len(value) > MAX_ITEMS:
        raise ApiError(400, f"'{where}' holds {len(value)} blocks; at most {MAX_ITEMS} are read", where)
    return "\n\n".join(_text_block(block, f"{where}[{i}]") for i, block in enumerate(value))


def _text_block(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise ApiError(400, f"'{where}' must be a text block", where)
    return f.string(block, "text", f"{where}.text") or ""


def _blocks(content: Any, where: str) -> list[dict]:
    """A message's content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(
            400, f"'{where}' must be a string or a list of content blocks, not {f.json_type(content)}", where
        )
    if len(content) > MAX_ITEMS:
        raise ApiError(400, f"'{where}' holds {len(content)} blocks; at most {MAX_ITEMS} are read", where)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ApiError(400, f"'{where}[{j}]' must be a content block with a type", f"{where}[{j}]")
    return content


def _user(built: ConversationBuilder, content: Any, where: str, warnings: list[str]) -> None:
    """A user turn: its text (images and documents as a note) and tool results, in their order."""
    texts: list[str] = []

    def flush() -> None:
        if texts:
            built.user("\n\n".join(texts))
            texts.clear()

    for j, block in enumerate(_blocks(content, where)):
        kind, here = block["type"], f"{where}[{j}]"
        if kind == "tool_result":
            flush()
            call_id = f.identifier(block.get("tool_use_id"), f"{here}.tool_use_id")
            if not built.called(call_id):
                raise ApiError(
                    400, f"'{here}' answers tool_use_id {f.shown(call_id)}, which no earlier tool_use made", here
                )
            output = _result_text(block.get("content"), f"{here}.content")
            if f.boolean(block, "is_error", f"{here}.is_error"):
                output = f"Error: {output}"
            built.tool_result(call_id, output)
        elif kind == "text":
            texts.append(f.string(block, "text", f"{here}.text") or "")
        elif kind in NOTE_FOR:
            texts.append(NOTE_FOR[kind])
        elif kind in ("thinking", "redacted_thinking", "tool_use"):
            raise ApiError(400, f"'{here}': a {kind} block belongs in an assistant message", here)
        else:
            _left_out(kind, here, warnings)
    flush()


def _result_text(content: Any, where: str) -> str:
    """A tool_result's content: a string, or blocks of text (images and documents as a note)."""
    if content is None:
        return ""
    parts = []
    for j, block in enumerate(_blocks(content, where)):
        kind = block["type"]
        if kind == "text":
            parts.append(f.string(block, "text", f"{where}[{j}].text") or "")
        elif kind in NOTE_FOR:
            parts.append(NOTE_FOR[kind])
        else:  # search results, tool references: their text if they have one, never a 400 that stops the agent
            parts.append(block["text"] if isinstance(block.get("text"), str) else f"[a {kind} block was left out]")
    return "\n\n".join(parts)


def _assistant(built: ConversationBuilder, content: Any, where: str, warnings: list[str]) -> None:
    """An assistant turn: its reasoning (thinking blocks), text and tool calls, in their order."""
    for j, block in enumerate(_blocks(content, where)):
        kind, here = block["type"], f"{where}[{j}]"
        if kind == "thinking":  # shown, or omitted and kept in our signature (see `wire.encrypt_reasoning`)
            shown = f.string(block, "thinking", f"{here}.thinking")
            built.reasoning(shown or decrypt_reasoning(f.string(block, "signature", f"{here}.signature") or "") or "")
        elif kind == "redacted_thinking":
            continue  # encrypted by Anthropic: nothing this model could read
        elif kind == "text":
            text = f.string(block, "text", f"{here}.text") or ""
            if text:
                built.answer(text)
        elif kind == "tool_use":
            name = block.get("name")
            if not isinstance(name, str) or not name:
                raise ApiError(400, f"'{here}.name' must be a tool name, not {f.shown(name)}", f"{here}.name")
            call_id = f.identifier(block.get("id"), f"{here}.id")
            built.tool_call(call_id, name, _arguments(block.get("input"), f"{here}.input"))
        else:
            _left_out(kind, here, warnings)


def _left_out(kind: str, where: str, warnings: list[str]) -> None:
    """A block this server cannot use (a hosted tool's use and result from a conversation begun with Claude, a
    kind newer than this module): left out and said, never a 400 that stops an agent mid-conversation."""
    warnings.append(f"{where} (a {kind[:60]!r} block) was left out")


def _arguments(value: Any, where: str) -> str:
    """A tool_use's input as the arguments' JSON text; one this server sent unparsed goes back as it came."""
    if not isinstance(value, dict):
        raise ApiError(400, f"'{where}' must be an object, not {f.json_type(value)}", where)
    if set(value) == {UNPARSED} and isinstance(value[UNPARSED], str):
        return value[UNPARSED]
    return json.dumps(value, ensure_ascii=False)


def _tools(body: dict, limit: int, warnings: list[str]) -> tuple[list[Tool], dict[str, Grammar]]:
    """The custom tools and the grammar of each one's input (by recipient); of the tools Anthropic defines, the
    client's bash and text editor are declared with their documented inputs, the others left out with a warning
    (hosted ones run on Anthropic's servers; computer use and memory need what this model lacks)."""
    tools, grammars = [], {}
    for i, spec in enumerate(f.items(body, "tools", limit)):
        where = f"tools[{i}]"
        if not isinstance(spec, dict):
            raise ApiError(400, f"'{where}' must be a tool object", where)
        kind = spec.get("type")
        if kind not in (None, "custom"):
            known = next((v for k, v in CLIENT_TOOLS.items() if isinstance(kind, str) and kind.startswith(k)), None)
            if known is None:
                name = spec.get("name") if isinstance(spec.get("name"), str) else "?"
                warnings.append(f"{where} ({name[:60]}, {f.shown(kind)[:60]}) is a tool Anthropic defines; left out")
                continue
            spec = {"name": spec.get("name"), "description": known[0], "input_schema": known[1]}
        schema = spec.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise ApiError(400, f"'{where}.input_schema' must be a JSON schema of type object", f"{where}.input_schema")
        made = tool({"name": spec.get("name"), "description": spec.get("description"), "parameters": schema}, where)
        strict = f.boolean(spec, "strict", f"{where}.strict")
        grammars[FUNCTIONS + made.name] = Grammar("json_schema", schema, strict, f"{where}.input_schema")
        tools.append(made)
    return tools, grammars


def _tool_choice(choice: Any, tools: list[Tool]) -> tuple[Any, frozenset[str]]:
    """Anthropic's `tool_choice` as the builder's (chat's values) and the recipients a turn must call."""
    if choice is None:
        return None, frozenset()
    if not isinstance(choice, dict):
        raise ApiError(400, f"'tool_choice' must be an object, not {f.json_type(choice)}", "tool_choice")
    f.boolean(choice, "disable_parallel_tool_use", "tool_choice.disable_parallel_tool_use")
    kind = choice.get("type")
    if kind == "auto":
        return "auto", frozenset()
    if kind == "none":
        return "none", frozenset()
    if kind == "any":
        if not tools:
            raise ApiError(400, "tool_choice 'any' needs tools", "tool_choice")
        return "required", frozenset(FUNCTIONS + t.name for t in tools)
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice names {f.shown(name)}, which is not among the tools", "tool_choice.name")
        return {"name": name}, frozenset({FUNCTIONS + name})
    raise ApiError(400, f"'tool_choice.type' must be auto, any, tool or none, not {f.shown(kind)}", "tool_choice.type")


def _answer_grammar(answer_format: dict) -> Grammar | None:
    """`output_config.format`: a JSON schema the answer must follow."""
    if not answer_format:
        return None
    if answer_format.get("type") != "json_schema" or not isinstance(answer_format.get("schema"), dict):
        raise ApiError(400, "'output_config.format' must be {type: json_schema, schema: {...}}", "output_config.format")
    return Grammar("json_schema", answer_format["schema"], True, "output_config.format.schema")


def _stop_sequences(body: dict) -> list[str]:
    value = body.get("stop_sequences")
    if value is not None and not isinstance(value, list):
        raise ApiError(400, f"'stop_sequences' must be a list of strings, not {f.json_type(value)}", "stop_sequences")
    try:
        return f.stops({"stop": value})
    except ApiError as e:  # the same limits as OpenAI's `stop`, named as this API names them
        raise ApiError(400, e.message.replace("'stop'", "'stop_sequences'"), "stop_sequences") from None


class SequenceStops(StopFilter):
    """A stop filter that also knows which stop sequence ended the answer (Anthropic's `stop_sequence`)."""

    def __init__(self, stops: list[str]):
        super().__init__(stops)
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        seen = self.pending + text
        out = super().feed(text)
        if self.stopped:  # a stop begins right after what is shown; the shortest of those that start there ended it
            self.matched = min((s for s in self.stops if seen.startswith(s, len(out))), key=len)
        return out


# -- the answer ------------------------------------------------------------------------------------------------


def tool_input(arguments: str) -> dict:
    """A call's arguments as a tool_use input: the JSON object the model wrote, or its text kept whole under
    `UNPARSED` when it is not one (never a crash; the grammar engine is to prevent it)."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {UNPARSED: arguments}


def usage(turn: Turn) -> dict:
    """Anthropic's usage: the prompt's tokens split into new (`input_tokens`) and reused from the cache."""
    s = turn.done.stats
    return {
        "input_tokens": s.prompt_tokens - s.reused_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": s.reused_tokens,
        "output_tokens": s.generated_tokens,
    }


def stop_of(turn: Turn, stops: SequenceStops) -> tuple[str, str | None]:
    if turn.stopped_by_sequence:
        return "stop_sequence", stops.matched
    return STOP_REASONS[turn.stop_reason], None


def message(message_id: str, model: str, turn: Turn, thinking: str, stops: SequenceStops) -> dict:
    """The whole turn as one message."""
    content: list[dict] = []
    if turn.reasoning and thinking != THINKING_HIDDEN:
        shown = turn.reasoning if thinking == THINKING_SHOWN else ""
        content.append({"type": "thinking", "thinking": shown, "signature": encrypt_reasoning(turn.reasoning)})
    if turn.answer or not turn.calls:  # an empty text block rather than none: clients read content[0].text
        content.append({"type": "text", "text": turn.answer})
    for call in turn.calls:
        content.append(_tool_use(call))
    reason, sequence = stop_of(turn, stops)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(turn),
    }


def _tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": new_id("toolu_"), "name": call.function_name, "input": tool_input(call.arguments)}


def event(kind: str, **fields) -> str:
    return f"event: {kind}\n" + sse({"type": kind, **fields})


def error_body(error: ApiError) -> dict:
    return {"type": "error", "error": {"type": error_type(error), "message": _message(error)}}


def _message(error: ApiError) -> str:
    """The error's message; a conversation too long for the context leads with Anthropic's own words ("prompt is
    too long: N tokens > M maximum"), which Claude Code reads to compact the conversation and try again."""
    lengths = re.search(r"holds (\d+) tokens, but the conversation is \D*(\d+) tokens", error.message)
    if error.code != "context_length_exceeded" or lengths is None:
        return error.message
    return f"prompt is too long: {lengths[2]} tokens > {lengths[1]} maximum ({error.message})"


def error_type(error: ApiError) -> str:
    status = anthropic_status(error)
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def anthropic_status(error: ApiError) -> int:
    """The status Anthropic gives `error`: a full queue is its 529 (overloaded), which its clients retry."""
    return OVERLOADED if error.code == "server_busy" else error.status


@dataclass
class MessageEvents:
    """A streamed message in Anthropic's events: message_start, then per content block content_block_start,
    its deltas and content_block_stop, then message_delta (stop reason, usage) and message_stop."""

    message_id: str
    model: str
    prompt_tokens: int
    thinking: str
    stops: SequenceStops
    index: int = -1  # the open or last block's index
    open: str | None = None  # the open block's type: thinking or text
    answered: bool = False  # a text or tool_use block was sent
    thought: str = ""  # the open thinking block's reasoning, signed when it closes
    sent: list[str] = field(default_factory=list)

    def start(self) -> list[str]:
        body = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.prompt_tokens,  # the reused part is known at the end (message_delta)
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        }
        return [event("message_start", message=body), event("ping")]

    def piece(self, piece: ReasoningDelta | AnswerDelta | ToolCall, turn: Turn) -> list[str]:
        if isinstance(piece, ToolCall):
            out = self.close()
            use = _tool_use(piece)
            self.index += 1
            self.answered = True
            out.append(event("content_block_start", index=self.index, content_block={**use, "input": {}}))
            delta = {"type": "input_json_delta", "partial_json": json.dumps(use["input"], ensure_ascii=False)}
            out.append(event("content_block_delta", index=self.index, delta=delta))
            out.append(event("content_block_stop", index=self.index))
            return out
        if isinstance(piece, ReasoningDelta):
            if self.thinking == THINKING_HIDDEN:
                return []
            out = self.opened("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.thought += piece.text
            if self.thinking == THINKING_SHOWN:
                delta = {"type": "thinking_delta", "thinking": piece.text}
                out.append(event("content_block_delta", index=self.index, delta=delta))
            return out
        out = self.opened("text", {"type": "text", "text": ""})
        self.answered = True
        out.append(event("content_block_delta", index=self.index, delta={"type": "text_delta", "text": piece.text}))
        return out

    def opened(self, kind: str, block: dict) -> list[str]:
        """The events that open a `kind` block, closing another one first (none if one is open)."""
        if self.open == kind:
            return []
        out = self.close()
        self.index += 1
        self.open = kind
        out.append(event("content_block_start", index=self.index, content_block=block))
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            delta = {"type": "signature_delta", "signature": encrypt_reasoning(self.thought)}
            self.thought = ""
            out.append(event("content_block_delta", index=self.index, delta=delta))
        out.append(event("content_block_stop", index=self.index))
        self.open = None
        return out

    def end(self, turn: Turn) -> Iterator[str]:
        yield from self.close()
        if not self.answered:  # as the whole message has it: an empty text block
            yield from self.opened("text", {"type": "text", "text": ""})
            yield from self.close()
        reason, sequence = stop_of(turn, self.stops)
        yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=usage(turn))
        yield event("message_stop")

    def error(self, error: ApiError) -> str:
        return f"event: error\n{sse(error_body(error))}"

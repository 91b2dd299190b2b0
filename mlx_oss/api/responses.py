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

Hosted tools the server runs itself (`--tools`: gpt-oss's built-in `python` and `browser`) come back as OpenAI's
items for them, in the order the model ran them between its reasoning and its answer:

- `code_interpreter_call` {id, status, code, container_id, outputs: [{type: logs, logs}, {type: image, url}]}:
  the logs are what the user sees in full (the model reads them truncated), an image a `data:` URL of the PNG the
  code made (the client may be on another computer: a path would not reach it). Streamed as
  `response.code_interpreter_call.in_progress`, `response.code_interpreter_call_code.delta` / `.done`,
  `.interpreting` while it runs, then `.completed`.
- `web_search_call` {id, status, action}: the action is `search` {query, sources: the pages found, when `include`
  asks for `web_search_call.action.sources`}, `open_page` {url} or `find_in_page` {url, pattern}. Streamed as
  `response.web_search_call.in_progress`, `.searching`, `.completed`.
- The answer's browser citations (`【cursor†Lx-Ly】`, as gpt-oss writes them) stay in its text as written, so the
  deltas add up to it, and each is a `url_citation` annotation {start_index, end_index, url, title} over its span,
  announced by `response.output_text.annotation.added` before the text is done.

A call that failed (a traceback, a time limit, a page that would not load) has status `failed`, its logs say why.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..agent import STEP_LIMIT, ToolFinished, ToolStarted
from ..engine import ReasoningDelta, SamplingParams, ToolCall
from ..generation_queue import Piece, Turn
from ..harmony import BUILTIN_RECIPIENTS
from ..tools import PYTHON, Citation, ToolOutput
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
# Turns cut short, by the reason a response gives: out of tokens, or still calling built-in tools past max_tool_calls
INCOMPLETE = {"length": "max_output_tokens", "context_limit": "max_output_tokens", STEP_LIMIT: "max_tool_calls"}
SEARCH_SOURCES = "web_search_call.action.sources"
CONTAINER_ID = "cntr_mlx_oss"  # the server's one python (its kernel and working folder), as a container's id
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}
MAX_IMAGE_BYTES = 8 << 20  # a bigger picture is left out of the item (it stays in the working folder)
CITATION = re.compile(r"【(\d+)†[^】\n]{0,40}】")  # gpt-oss's browser citation: 【cursor†Lx-Ly】


@dataclass
class Shapes:
    """How this request's output is shown: the offered tools by recipient (a call's item type and name), whether
    reasoning also goes in a summary, and whether reasoning items carry `encrypted_content`."""

    tools: dict[str, Offered] = field(default_factory=dict)
    summary: bool = False
    encrypted: bool = False
    logprobs: bool = False  # the answer's text parts carry their tokens' log-probabilities
    sources: bool = False  # web_search_call search actions carry the pages found


@dataclass
class ResponsesRequest(ParsedRequest):
    echo: dict[str, Any] = field(default_factory=dict)  # the request's fields a response shows back
    shapes: Shapes = field(default_factory=Shapes)
    builtin: tuple[str, ...] = ()  # the built-in tools the server runs for this request's hosted ones
    max_tool_calls: int | None = None  # of the built-in tools, in this turn (OpenAI's limit on its hosted ones)


def parse_responses(
    body: Any, served: str, max_items: int = MAX_ITEMS, runs: frozenset[str] = frozenset()
) -> ResponsesRequest:
    """A Responses API request; `max_items` bounds its input items and tools; `runs` names the built-in tools the
    server runs (`python`, `browser`), which a request's code_interpreter and web_search then enable."""
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
    box = responses_tools(body, max_items, runs)
    builtin = () if body.get("tool_choice") == "none" else tuple(box.builtin)
    built = ConversationBuilder(instructions)
    read_input(items, built, warnings, frozenset(builtin))
    built.close("input", max_items)
    if (told := format_instructions(text.get("format"))) is not None:
        built.instructions.append(told)
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
        SEARCH_SOURCES in include,
    )
    conversation = built.conversation(effort(reasoning.get("effort"), "reasoning.effort"))
    if builtin:
        conversation.builtin_tools = builtin  # harmony declares them in the system message
    return ResponsesRequest(
        conversation,
        parsed_sampling,
        stream=f.boolean(body, "stream"),
        constraints=dataclasses.replace(
            built.constraints,
            answer=answer,
            builtin=frozenset(r for name in builtin for r in BUILTIN_RECIPIENTS[name]),  # callable beside any grammar
        ),
        warnings=warnings,
        echo=_echoed(body, instructions, box.echo, reasoning, summary, include, parsed_sampling),
        shapes=shapes,
        builtin=builtin,
        max_tool_calls=f.positive_int(body, "max_tool_calls"),
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
        incomplete = INCOMPLETE.get(turn.done.stop_reason)
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


def message_item(
    item_id: str, text: str, status: str, logprobs: list[dict] | None = None, annotations: list[dict] | None = None
) -> dict:
    """An answer's message item; `logprobs`, when asked for, the entries of its tokens; `annotations` its
    citations."""
    part = {"type": "output_text", "text": text, "annotations": annotations or []}
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


def url_citations(text: str, citations: dict[int, Citation]) -> list[dict]:
    """The `url_citation` annotations of an answer: one over each `【cursor†Lx-Ly】` whose cursor is a page the
    browser opened in this turn (another one, from an earlier turn or made up, stays plain text)."""
    found = []
    for match in CITATION.finditer(text):
        page = citations.get(int(match.group(1)))
        if page is not None:
            found.append(
                {
                    "type": "url_citation",
                    "start_index": match.start(),
                    "end_index": match.end(),
                    "url": page.url,
                    "title": page.title,
                }
            )
    return found


def builtin_item(item_id: str, recipient: str, content: str, output: ToolOutput | None, shapes: Shapes) -> dict:
    """A built-in tool's call as OpenAI's hosted tool's item: running (`output` None) or done."""
    status = "in_progress" if output is None else "failed" if output.error else "completed"
    if recipient == PYTHON:
        outputs = None
        if output is not None:
            outputs = [{"type": "logs", "logs": output.display or output.text}]
            outputs += [{"type": "image", "url": url} for url in map(_image_url, output.files) if url]
        return {
            "type": "code_interpreter_call",
            "id": item_id,
            "status": status,
            "code": content,
            "container_id": CONTAINER_ID,
            "outputs": outputs,
        }
    return {
        "type": "web_search_call",
        "id": item_id,
        "status": status,
        "action": _web_action(recipient, content, output, shapes),
    }


def _image_url(path) -> str | None:
    """A picture the code made, as a `data:` URL; None for another file, or one too big to send."""
    kind = IMAGE_TYPES.get(path.suffix.lower())
    try:
        if kind is None or path.stat().st_size > MAX_IMAGE_BYTES:
            return None
        return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def _web_action(recipient: str, content: str, output: ToolOutput | None, shapes: Shapes) -> dict:
    """What a browser call did, as a web_search_call's action: search, open_page or find_in_page. The page's
    URL is the one the browser reports (`output.citations`) or, for open, the URL the model gave."""
    try:
        arguments = json.loads(content)
    except ValueError:
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    pages = list(output.citations) if output is not None else []
    url = pages[-1].url if pages else None
    action = recipient.rpartition(".")[2]
    if action == "search":
        query = arguments.get("query")
        found = {"type": "search", "query": query if isinstance(query, str) else content}
        if shapes.sources and output is not None:
            found["sources"] = [{"type": "url", "url": page.url} for page in pages]
        return found
    if action == "find":
        pattern = arguments.get("pattern")
        return {"type": "find_in_page", "url": url or "", "pattern": pattern if isinstance(pattern, str) else ""}
    given = arguments.get("id")
    if url is None and isinstance(given, str) and given.startswith(("http://", "https://")):
        url = given
    return {"type": "open_page", "url": url}


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
        self.running: tuple[str, ToolStarted] | None = None  # the built-in tool call under way, by its item's id
        self.citations: dict[int, Citation] = {}  # the pages the browser opened so far, by cursor

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n" + sse(body)

    def start(self) -> list[str]:
        started = response(self.response_id, self.model, None, self.request)
        return [self.event("response.created", response=started), self.event("response.in_progress", response=started)]

    def end(self, turn: Turn) -> Iterator[str]:
        yield from self.close()
        yield from self.close_tool()
        done = response(self.response_id, self.model, turn, self.request, self.items)
        yield self.event(
            "response.incomplete" if done["status"] == "incomplete" else "response.completed", response=done
        )

    def error(self, error: ApiError) -> str:
        return self.event("error", message=error.message, code=error.code, param=error.param)

    def piece(self, piece: Piece, turn: Turn) -> list[str]:
        if isinstance(piece, ToolCall | ToolStarted | ToolFinished):
            kind = "call"
        else:
            kind = "reasoning" if isinstance(piece, ReasoningDelta) else "answer"
        out = []
        if self.open and self.open[0] != kind:
            out += self.close()
        index = len(self.items)
        if isinstance(piece, ToolStarted):
            return out + self._tool_started(piece, index)
        if isinstance(piece, ToolFinished):
            return out + self._tool_finished(piece, index)
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

    def _tool_started(self, started: ToolStarted, index: int) -> list[str]:
        """A built-in tool's item opens, running: a python call's code is streamed whole (it is known only once
        the model has written it)."""
        out = self.close_tool()
        item_id = new_id("ci_" if started.recipient == PYTHON else "ws_")
        self.running = (item_id, started)
        item = builtin_item(item_id, started.recipient, started.content, None, self.shapes)
        where = {"item_id": item_id, "output_index": index}
        if item["type"] == "code_interpreter_call":
            out.append(self.event("response.output_item.added", output_index=index, item={**item, "code": ""}))
            out.append(self.event("response.code_interpreter_call.in_progress", **where))
            out.append(self.event("response.code_interpreter_call_code.delta", **where, delta=started.content))
            out.append(self.event("response.code_interpreter_call_code.done", **where, code=started.content))
            out.append(self.event("response.code_interpreter_call.interpreting", **where))
        else:
            out.append(self.event("response.output_item.added", output_index=index, item=item))
            out.append(self.event("response.web_search_call.in_progress", **where))
            out.append(self.event("response.web_search_call.searching", **where))
        return out

    def _tool_finished(self, finished: ToolFinished, index: int) -> list[str]:
        if self.running is None or self.running[1].recipient != finished.recipient:
            out = self._tool_started(ToolStarted(finished.recipient, finished.content), index)
        else:
            out = []
        item_id, _ = self.running
        self.running = None
        self.citations.update({c.cursor: c for c in finished.output.citations})
        item = builtin_item(item_id, finished.recipient, finished.content, finished.output, self.shapes)
        where = {"item_id": item_id, "output_index": index}
        kind = "code_interpreter_call" if item["type"] == "code_interpreter_call" else "web_search_call"
        out.append(self.event(f"response.{kind}.completed", **where))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out

    def close_tool(self) -> list[str]:
        """The item of a built-in call that never finished (the turn was cancelled while it ran), as incomplete."""
        if self.running is None:
            return []
        item_id, started = self.running
        self.running = None
        index = len(self.items)
        item = {**builtin_item(item_id, started.recipient, started.content, None, self.shapes), "status": "incomplete"}
        self.items.append(item)
        return [self.event("response.output_item.done", output_index=index, item=item)]

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
            annotations = url_citations(text, self.citations)
            item = message_item(item_id, text, "completed", self.scored if self.shapes.logprobs else None, annotations)
            part, entries, self.scored = item["content"][0], self.scored, []
            out = [
                self.event(
                    "response.output_text.annotation.added", **where, content_index=0, annotation_index=i, annotation=a
                )
                for i, a in enumerate(annotations)
            ]
            out += [
                self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=entries),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return out

"""A Responses request's `input` items into the conversation, as agents send them.

Agents send back everything the API gave them, and more than this server makes: messages with images or files
(a note in the text where they were: the model reads only text), their reasoning items (`encrypted_content:
null` and `summary` parts from a client with `store: false`), function, custom and local shell calls with their
outputs (outputs as text or content parts), and items of OpenAI's hosted tools. What cannot reach the model is
left out and said in the answer's warning header, never a 400 that stops the agent, except where going on would
mislead it:

- `item_reference` points at an item OpenAI stored; this server stores nothing, so the item it names would be
  missing from the conversation: refused, naming the field (send the item itself, as `store: false` clients do).
- `compaction` (Codex's remote compaction) holds OpenAI's encrypted summary of the conversation before it, which
  no one else can read: the model gets a note that earlier turns were compacted and are not shown, and the
  warning header says so. Codex compacts locally for other providers, so its own clients do not meet this.
- `code_interpreter_call` and `web_search_call` (this server's own built-in tool runs, or OpenAI's), when the
  request enabled the built-in tool that makes them (`python`, `browser`: a server with --tools), become its
  call and result as gpt-oss writes them (`python` with the code and its logs; `browser.search`, `.open`,
  `.find` with their arguments), on the analysis channel: a turn still in progress (a function call after a
  python run, say) goes on with them, and an answered turn's are dropped with its reasoning, as harmony asks. A
  web search's pages are not in the item, so its result says so. Without the tool they are left out, with a
  warning: the model would read calls of a tool it was not given.
- Other hosted tools' items (`image_generation_call`, `mcp_call`, ...): left out, with a warning.
"""

from __future__ import annotations

import json
from typing import Any

from ..harmony import Message
from ..tools import BROWSER, PYTHON
from . import fields as f
from .conversation import ConversationBuilder, arguments
from .fields import MAX_ITEMS, ApiError
from .wire import decrypt_reasoning

# Items of tools OpenAI runs (and other item kinds only OpenAI makes): nothing of them can reach the model here.
HOSTED_ITEMS = frozenset(
    {
        "web_search_call",
        "file_search_call",
        "image_generation_call",
        "code_interpreter_call",
        "computer_call",
        "computer_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
        "tool_search_call",
        "tool_search_output",
        "additional_tools",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "compaction_trigger",
        "program",
        "program_output",
        "configuration_update",
    }
)
NOT_KEPT = "[What the browser showed here was not kept in the conversation; open the page again to read it.]"
COMPACTED = "[Earlier turns of this conversation were compacted by another service and cannot be shown here.]"


def read_input(
    items: list, built: ConversationBuilder, warnings: list[str], builtin: frozenset[str] = frozenset()
) -> None:
    """Every input item into `built`, in order; what is left out goes to `warnings`. `builtin` names the built-in
    tools the request enabled, whose items are read."""
    omitted: list[str] = []
    skipped: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            _message(item, where, built, omitted)
        elif kind == "reasoning":
            text = _reasoning(item, where)
            if text is None:
                key = "reasoning encrypted by another service"
                skipped[key] = skipped.get(key, 0) + 1
            built.reasoning(text or "")
        elif kind in ("function_call", "custom_tool_call"):
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise ApiError(400, f"'{where}' needs a tool name", where)
            namespace = f.string(item, "namespace", f"{where}.namespace")
            call_id = f.identifier(item.get("call_id"), f"{where}.call_id")
            if kind == "function_call":
                built.tool_call(call_id, name, arguments(item.get("arguments", ""), f"{where}.arguments"), namespace)
            else:
                text = f.string(item, "input", f"{where}.input") or ""
                built.tool_call(call_id, name, text, namespace, freeform=True)
        elif kind == "local_shell_call":
            call_id = f.identifier(item.get("call_id", item.get("id")), f"{where}.call_id")
            action = f.obj(item, "action", f"{where}.action")
            shown = {k: v for k, v in action.items() if k != "type" and v is not None}  # as the model wrote it
            built.tool_call(call_id, "local_shell", json.dumps(shown, ensure_ascii=False))
        elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            id_field = "id" if kind == "local_shell_call_output" and "call_id" not in item else "call_id"
            call_id = f.identifier(item.get(id_field), f"{where}.{id_field}")
            if not built.called(call_id):
                raise ApiError(
                    400, f"'{where}' answers call_id {f.shown(call_id)}, which no earlier call in 'input' made", where
                )
            built.tool_result(call_id, tool_output(item.get("output"), f"{where}.output", omitted))
        elif kind == "code_interpreter_call" and PYTHON in builtin:
            code = f.string(item, "code", f"{where}.code") or ""
            built.messages.append(Message.builtin_call("python", code))
            built.messages.append(Message.builtin_result("python", _logs(item, where)))
        elif kind == "web_search_call" and BROWSER in builtin:
            recipient, content = _web_call(f.obj(item, "action", f"{where}.action"), where)
            built.messages.append(Message.builtin_call(recipient, content))
            built.messages.append(Message.builtin_result(recipient, NOT_KEPT))
        elif kind == "compaction":
            built.note(COMPACTED)
            skipped["compaction (its encrypted summary cannot be read here)"] = 1
        elif kind == "item_reference":
            raise ApiError(
                400,
                f"'{where}' is an item_reference: this server stores no items; send the item itself in 'input'",
                where,
            )
        elif isinstance(kind, str) and kind in HOSTED_ITEMS:
            skipped[kind] = skipped.get(kind, 0) + 1
        else:
            raise ApiError(400, f"'{where}.type' {f.shown(kind)} is not an input item this server reads", where)
    for kind in sorted(set(omitted)):
        warnings.append(f"input {kind}s omitted: this model reads text only (a note stands in their place)")
    if skipped:
        warnings.append("input items left out: " + ", ".join(f"{kind} x{n}" for kind, n in skipped.items()))


def _logs(item: dict, where: str) -> str:
    """A code_interpreter_call's outputs as python's result: its logs; an image is a note (the model reads text)."""
    texts = []
    for j, output in enumerate(f.items(item, "outputs", MAX_ITEMS, f"{where}.outputs")):
        if isinstance(output, dict) and output.get("type") == "logs":
            texts.append(f.string(output, "logs", f"{where}.outputs[{j}].logs") or "")
        elif isinstance(output, dict) and output.get("type") == "image":
            texts.append("[an image the code made]")
    return "\n".join(texts)


def _web_call(action: dict, where: str) -> tuple[str, str]:
    """A web_search_call's action as the browser call gpt-oss makes: search by query, open by URL, find a
    pattern."""
    kind = action.get("type")
    if kind == "search":
        query = f.string(action, "query", f"{where}.action.query")
        if query is None:
            queries = [q for q in action.get("queries") or [] if isinstance(q, str)]
            query = " ".join(queries)
        return "browser.search", json.dumps({"query": query}, ensure_ascii=False)
    if kind == "open_page":
        return "browser.open", json.dumps({"id": f.string(action, "url", f"{where}.action.url") or ""})
    if kind in ("find_in_page", "find"):
        pattern = f.string(action, "pattern", f"{where}.action.pattern") or ""
        return "browser.find", json.dumps({"pattern": pattern}, ensure_ascii=False)
    raise ApiError(400, f"'{where}.action.type' must be search, open_page or find_in_page, not {f.shown(kind)}", where)


def _message(item: dict, where: str, built: ConversationBuilder, omitted: list[str]) -> None:
    role = item.get("role")
    text = f.text(item.get("content"), f"{where}.content", omitted)
    if role in ("system", "developer"):
        built.instruction(role, text, where)
    elif role == "user":
        built.user(text)
    elif role == "assistant":
        built.answer(text)
    else:
        raise ApiError(400, f"'{where}.role' must be system, developer, user or assistant, not {f.shown(role)}", where)


def _reasoning(item: dict, where: str) -> str | None:
    """A reasoning item's chain of thought: its `reasoning_text` content, else our own `encrypted_content`, else
    its summary (this server's summary is the reasoning itself). None if only another service's encrypted
    content holds it."""
    text = "".join(_part_texts(f.items(item, "content", MAX_ITEMS, f"{where}.content"), f"{where}.content"))
    if text:
        return text
    encrypted = f.string(item, "encrypted_content", f"{where}.encrypted_content")
    if encrypted:
        found = decrypt_reasoning(encrypted)
        if found is not None:
            return found
    summary = "".join(_part_texts(f.items(item, "summary", MAX_ITEMS, f"{where}.summary"), f"{where}.summary"))
    return summary if summary or not encrypted else None


def _part_texts(parts: list, param: str) -> list[str]:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ApiError(400, f"'{param}[{j}]' must be a text part", param)
        texts.append(f.string(part, "text", f"{param}[{j}].text") or "")
    return texts


def tool_output(value: Any, param: str, omitted: list[str]) -> str:
    """A call's `output`: a string, content parts (input_text; an image or file becomes a note), or (as some
    clients send) a JSON object."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return ""
    if isinstance(value, str | list):
        return f.text(value, param, omitted)
    raise ApiError(400, f"'{param}' must be a string or a list of content parts, not {f.json_type(value)}", param)

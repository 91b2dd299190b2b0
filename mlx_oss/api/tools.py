"""The tools a request offers, read once for every API: what harmony declares, what each call's content must
match (`TurnConstraints`), how a call the model makes goes back to the client, and what was left out.

Kinds of tool, as OpenAI's Responses API names them:

- `function`: declared in harmony's `functions` namespace; a call goes to `functions.NAME` with JSON arguments,
  constrained by the tool's `parameters` (any JSON object without them).
- `namespace`: a group of function and custom tools under a name of its own. Harmony declares namespaces beside
  `functions` (`## multi_agent_v1` ... `namespace multi_agent_v1 {...}`), so a call goes to `NAMESPACE.NAME` and
  comes back as OpenAI's API answers it: a `function_call` (or `custom_tool_call`) with `name` and `namespace`
  apart, as Codex reads it (codex-rs `ResponseItem::FunctionCall { name, namespace, .. }`).
- `custom` (freeform): harmony has no declaration for a tool whose input is text, so it is declared as a function
  without parameters whose description says the input is freeform text, not JSON (with its grammar if it has one);
  the model writes the input itself as the call's content, without `<|constrain|>json`, and a grammar
  (`format: {"type": "grammar", "syntax": "lark" | "regex"}`) constrains it. A custom tool with text format is free.
- `local_shell`: declared as the function `local_shell` taking OpenAI's exec action (command, working directory,
  timeout, env, user); a call comes back as a `local_shell_call` with that `action`.
- hosted tools (`web_search`, `file_search`, `image_generation`, `mcp`, `code_interpreter`, computer use, ...):
  OpenAI runs them on its side. A server started with `--tools` runs two of them itself, as gpt-oss's built-in
  tools, which harmony declares in the system message: `code_interpreter` is `python`, `web_search` (and its
  preview and dated names) is `browser`. The rest, and these two on a server without them, are left out of the
  prompt and named in the answer's warning header, never refused: an agent that offers them goes on with the rest.

The strict flag of a function follows each API's default: chat's tools are strict only when they say so; the
Responses API makes a tool strict "when the schema is compatible" (objects closed with `additionalProperties:
false` and every property required) unless `strict` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..grammar import Grammar, TurnConstraints
from ..harmony import FUNCTIONS, Tool
from ..tools import BROWSER, PYTHON
from . import fields as f
from .fields import ApiError

FUNCTION, CUSTOM, LOCAL_SHELL = "function", "custom", "local_shell"
HOSTED = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "image_generation",
        "mcp",
        "code_interpreter",
        "computer",
        "computer_use_preview",
        "programmatic_tool_calling",
        "tool_search",
        "shell",
        "apply_patch",
    }
)
# The hosted tools a server with --tools runs, as the built-in tool that runs each.
BUILTIN = {
    "code_interpreter": PYTHON,
    "web_search": BROWSER,
    "web_search_preview": BROWSER,
    "web_search_2025_08_26": BROWSER,
    "web_search_preview_2025_03_11": BROWSER,
}
# OpenAI's exec action of a local_shell_call, as the arguments the model writes.
LOCAL_SHELL_ACTION = {
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"}, "description": "The command and its arguments."},
        "working_directory": {"type": "string", "description": "Where to run it."},
        "timeout_ms": {"type": "integer", "description": "How long it may run, in milliseconds."},
        "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Extra environment."},
        "user": {"type": "string", "description": "The user to run it as."},
    },
    "required": ["command"],
    "additionalProperties": False,
}
REQUIRED = "Call one of the functions before you answer."  # what tool_choice "required" asks, in the instructions
LOCAL_SHELL_DESCRIPTION = "Runs a shell command on the user's computer and returns its output."


@dataclass(frozen=True)
class Offered(Tool):
    """A tool as harmony declares it, with what the API needs to answer a call of it: its `kind` (function,
    custom or local_shell) and the grammar its calls' content must match (None: free text)."""

    kind: str = FUNCTION
    grammar: Grammar | None = None


@dataclass
class Toolbox:
    """A request's tools: offered to the model, echoed back, and what was left out."""

    tools: list[Tool] = field(default_factory=list)  # Offered ones, but other APIs' plain Tools too
    namespaces: dict[str, str] = field(default_factory=dict)  # namespace -> its description
    builtin: list[str] = field(default_factory=list)  # the built-in tools the server runs for hosted ones asked
    echo: list[dict] = field(default_factory=list)  # the tools as the response shows them
    warnings: list[str] = field(default_factory=list)

    def find(self, name: str, namespace: str | None = None) -> Tool | None:
        for tool in self.tools:
            if tool.name == name and (namespace is None or tool.namespace == namespace):
                return tool
        return None


def tool_name(value: Any, param: str) -> str:
    """A tool's (or namespace's) name: letters, digits, _ and -, as OpenAI allows."""
    if not isinstance(value, str) or not value or not value.replace("_", "a").replace("-", "a").isalnum():
        raise ApiError(
            400, f"'{param}.name' must be a function name (letters, digits, _ and -), not {f.shown(value)}", param
        )
    return value


def schema(parameters: Any, name: str, param: str) -> dict | None:
    """A function's `parameters`: a JSON schema of type object, nested no deeper than harmony renders."""
    if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type", "object") != "object"):
        raise ApiError(400, f"'{param}.parameters' of '{name}' must be a JSON schema of type object", param)
    if f.nesting(parameters, f.MAX_SCHEMA_DEPTH) > f.MAX_SCHEMA_DEPTH:
        raise ApiError(
            400, f"'{param}.parameters' of '{name}' is nested more than {f.MAX_SCHEMA_DEPTH} levels deep", param
        )
    return parameters or None


def strict_compatible(value: Any) -> bool:
    """Whether a schema is one OpenAI's strict mode takes: every object closed (`additionalProperties: false`)
    with all its properties required. No recursion: a schema may be nested as deep as MAX_SCHEMA_DEPTH."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            properties = node.get("properties")
            if node.get("type") == "object" or isinstance(properties, dict):
                if node.get("additionalProperties") is not False:
                    return False
                required = node.get("required") or []
                if isinstance(properties, dict) and set(properties) != set(
                    required if isinstance(required, list) else []
                ):
                    return False
            stack.extend(node.values())
    return True


def function(spec: dict, param: str, namespace: str, strict_default: bool | None) -> Offered:
    """A function tool from its `name`, `description`, `parameters` and `strict`; `strict_default` None means
    "strict if the schema is compatible" (the Responses API's rule)."""
    name = tool_name(spec.get("name"), param)
    description = f.string(spec, "description", f"{param}.description") or ""
    parameters = schema(spec.get("parameters"), name, param)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(400, f"'{param}.strict' must be true or false, not {f.json_type(strict)}", f"{param}.strict")
    if strict is None:
        strict = strict_compatible(parameters) if strict_default is None else strict_default
    grammar = (
        Grammar("json_schema", parameters, strict=strict, param=f"{param}.parameters")
        if parameters
        else Grammar("json_object", strict=strict, param=param)
    )
    return Offered(name, description, parameters, namespace, FUNCTION, grammar)


def custom(spec: dict, param: str, namespace: str) -> Offered:
    """A freeform tool: its input is text, constrained by its `format`'s grammar if it has one."""
    name = tool_name(spec.get("name"), param)
    description = f.string(spec, "description", f"{param}.description") or ""
    form = f.obj(spec, "format", f"{param}.format")
    kind = form.get("type", "text")
    grammar = None
    note = "Its input is freeform text, not JSON: write the input itself as the message to this tool."
    if kind == "grammar":
        syntax = form.get("syntax")
        if syntax not in ("lark", "regex"):
            raise ApiError(
                400, f"'{param}.format.syntax' must be lark or regex, not {f.shown(syntax)}", f"{param}.format"
            )
        definition = f.string(form, "definition", f"{param}.format.definition")
        if not definition:
            raise ApiError(400, f"'{param}.format.definition' must be the grammar's text", f"{param}.format")
        grammar = Grammar(syntax, definition, param=f"{param}.format")
        note += f" The input must match this {syntax} grammar:\n{definition}"
    elif kind != "text":
        raise ApiError(400, f"'{param}.format.type' must be text or grammar, not {f.shown(kind)}", f"{param}.format")
    return Offered(name, f"{description}\n\n{note}" if description else note, None, namespace, CUSTOM, grammar)


def responses_tools(body: dict, limit: int, runs: frozenset[str] = frozenset()) -> Toolbox:
    """The tools of a Responses request (`tools`): functions, custom tools, namespaces of them, local_shell;
    code_interpreter and web_search as the built-in tools when the server `runs` them (`python`, `browser`);
    other hosted tools and kinds this server does not know are left out with a warning."""
    box = Toolbox()
    for i, spec in enumerate(f.items(body, "tools", limit)):
        param = f"tools[{i}]"
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str):
            raise ApiError(400, f"'{param}' must be a tool object with a type", param)
        if kind == FUNCTION:
            _add(box, function(spec, param, FUNCTIONS, None), param)
        elif kind == CUSTOM:
            _add(box, custom(spec, param, FUNCTIONS), param)
        elif kind == "namespace":
            namespace = tool_name(spec.get("name"), param)
            if namespace == FUNCTIONS or namespace in box.namespaces:
                raise ApiError(400, f"'{param}.name': the namespace {namespace!r} is taken", param)
            box.namespaces[namespace] = f.string(spec, "description", f"{param}.description") or ""
            inner = []
            for j, member in enumerate(f.items(spec, "tools", limit, f"{param}.tools")):
                where = f"{param}.tools[{j}]"
                member_kind = member.get("type") if isinstance(member, dict) else None
                if member_kind == FUNCTION:
                    offered = function(member, where, namespace, None)
                elif member_kind == CUSTOM:
                    offered = custom(member, where, namespace)
                else:
                    raise ApiError(400, f"'{where}' must be a function or custom tool", where)
                _add(box, offered, where, echo=False)
                inner.append(_echo(offered))
            box.echo.append(
                {"type": "namespace", "name": namespace, "description": box.namespaces[namespace], "tools": inner}
            )
        elif kind == LOCAL_SHELL:
            offered = Offered(
                "local_shell",
                LOCAL_SHELL_DESCRIPTION,
                LOCAL_SHELL_ACTION,
                FUNCTIONS,
                LOCAL_SHELL,
                Grammar("json_schema", LOCAL_SHELL_ACTION, param=param),
            )
            _add(box, offered, param, echo=False)
            box.echo.append({"type": LOCAL_SHELL})
        elif BUILTIN.get(kind) in runs:
            if BUILTIN[kind] not in box.builtin:
                box.builtin.append(BUILTIN[kind])
            box.echo.append(spec)
        else:
            what = "a hosted tool this server does not run yet" if kind in HOSTED else "a kind of tool it does not know"
            box.warnings.append(f"{param} ({kind[:40]}) left out: {what}")
            box.echo.append(spec)
    return box


def chat_tools(body: dict, limit: int) -> Toolbox:
    """The tools of a chat request: `{"type": "function", "function": {...}}`, strict only when they say so."""
    box = Toolbox()
    for i, spec in enumerate(f.items(body, "tools", limit)):
        inner = spec.get("function") if isinstance(spec, dict) and spec.get("type", FUNCTION) == FUNCTION else None
        if not isinstance(inner, dict):
            raise ApiError(400, f"'tools[{i}]' must be a function tool", f"tools[{i}]")
        _add(box, function(inner, f"tools[{i}].function", FUNCTIONS, False), f"tools[{i}].function")
    return box


def _add(box: Toolbox, offered: Offered, param: str, echo: bool = True) -> None:
    if box.find(offered.name, offered.namespace) is not None:
        raise ApiError(400, f"'{param}.name': two tools are named {offered.recipient!r}", param)
    box.tools.append(offered)
    if echo:
        box.echo.append(_echo(offered))


def _echo(tool: Offered) -> dict:
    """A tool as the response shows it: what was asked, rebuilt from the fields read."""
    if tool.kind == CUSTOM:
        form = {"type": "text"}
        if tool.grammar is not None:
            form = {"type": "grammar", "syntax": tool.grammar.kind, "definition": tool.grammar.source}
        return {"type": CUSTOM, "name": tool.name, "description": tool.description, "format": form}
    return {
        "type": FUNCTION,
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": tool.grammar is not None and tool.grammar.strict,
    }


# -- tool choice ------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """What a `tool_choice` does: the tools still offered, the ones a call must go to, and the sentence that asks
    the model for it in the instructions (kept beside the grammar engine's `must_call`)."""

    tools: list[Tool]
    must_call: frozenset[str] = frozenset()
    ask: str | None = None


def choose(choice: Any, box: Toolbox) -> Choice:
    """`none` hides the tools; `required`, a named tool or `allowed_tools` in mode required asks for a call;
    `auto` (the default) leaves the choice to the model. A hosted tool's choice is auto: with a warning, or
    without one for a built-in tool the server runs (the model decides whether to call it; nothing can force it)."""
    tools = box.tools
    if choice is None or choice == "auto":
        return Choice(tools)
    if choice == "none":
        return Choice([])
    if choice == "required":
        if not tools:
            raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice")
        return Choice(tools, frozenset(t.recipient for t in tools), REQUIRED)
    if not isinstance(choice, dict):
        raise ApiError(
            400, f"'tool_choice' must be none, auto, required or a tool, not {f.json_type(choice)}", "tool_choice"
        )
    kind = choice.get("type", FUNCTION)
    if kind == "allowed_tools":
        return _allowed(choice, box)
    if kind in (FUNCTION, CUSTOM):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else choice.get("name")
        namespace = choice.get("namespace")
        if not isinstance(name, str):
            raise ApiError(400, "'tool_choice' must be none, auto, required or a tool with a name", "tool_choice")
        tool = box.find(name, namespace if isinstance(namespace, str) else None)
        if tool is None:
            raise ApiError(400, f"tool_choice names {f.shown(name)}, which is not among the tools", "tool_choice")
        return Choice(tools, frozenset({tool.recipient}), _call_asked(tool))
    if kind == LOCAL_SHELL and box.find("local_shell"):
        return Choice(
            tools, frozenset({f"{FUNCTIONS}.local_shell"}), "Call the function local_shell before you answer."
        )
    if isinstance(kind, str) and BUILTIN.get(kind) in box.builtin:
        return Choice(tools)  # the model decides whether to run it: a built-in call cannot be forced
    if isinstance(kind, str) and kind in HOSTED:
        box.warnings.append(f"tool_choice ({kind[:40]}) left out: a hosted tool this server does not run yet")
        return Choice(tools)
    raise ApiError(
        400, f"'tool_choice' names a tool of type {f.shown(kind)}, which is not among the tools", "tool_choice"
    )


def _call_asked(tool: Tool) -> str:
    """The instruction that asks for a call of `tool`: by its name for a function (as before namespaces), by its
    recipient for a tool in a namespace."""
    name = tool.name if tool.namespace == FUNCTIONS else tool.recipient
    return f"Call the function {name} before you answer."


def _allowed(choice: dict, box: Toolbox) -> Choice:
    """`{"type": "allowed_tools", "mode": "auto" | "required", "tools": [{"type", "name"}, ...]}`."""
    mode = choice.get("mode", "auto")
    if mode not in ("auto", "required"):
        raise ApiError(400, f"'tool_choice.mode' must be auto or required, not {f.shown(mode)}", "tool_choice.mode")
    kept: list[Offered] = []
    for j, entry in enumerate(f.items(choice, "tools", len(box.tools) + len(box.echo) + 1, "tool_choice.tools")):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue  # a hosted tool: not offered anyway
        namespace = entry.get("namespace")
        tool = box.find(name, namespace if isinstance(namespace, str) else None)
        if tool is None:
            raise ApiError(
                400, f"'tool_choice.tools[{j}]' names {f.shown(name)}, which is not among the tools", "tool_choice"
            )
        kept.append(tool)
    if mode == "auto":
        return Choice(kept)
    if not kept:
        raise ApiError(400, "tool_choice 'allowed_tools' in mode required needs tools", "tool_choice")
    return Choice(kept, frozenset(t.recipient for t in kept), REQUIRED)


def constraints(offered: list[Tool], must_call: frozenset[str]) -> TurnConstraints:
    """Every offered tool's recipient with the grammar its calls must match (None: a freeform tool's free text;
    the grammar engine lets a constrained turn call only the recipients listed), and the calls the turn must
    make."""
    return TurnConstraints(calls={t.recipient: getattr(t, "grammar", None) for t in offered}, must_call=must_call)

"""Reading the fields of an API request: each has the JSON type the API documents, or the request gets a 400
that names it (`stream: "yes"` is refused, not taken as true), and nothing a client sends can make the server
work without bound: lists, stop sequences and tool schemas have limits no conversation that fits the context
comes near.
"""

from __future__ import annotations

from typing import Any

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_LENGTH = 1000  # characters of one stop sequence
MESSAGE_TOKENS = 4  # the fewest tokens a rendered message takes: <|start|>user<|message|><|end|>
MAX_ITEMS = 131072 // MESSAGE_TOKENS  # list items (messages, tools, parts) in gpt-oss's largest context
MAX_SCHEMA_DEPTH = 64  # levels of a tool's parameters; harmony's renderer gives up near 120
MAX_SEED = 2**64 - 1


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


def context_exceeded(context_length: int, length: str, model_limit: int | None = None) -> ApiError:
    """The 400 for a conversation that does not fit the context; `length` says how long it is. Where the server
    was started with less context than the model has (`model_limit`), the message says how to get more: agents'
    first prompts alone are 5k (Codex) to 16k (Claude Code) tokens."""
    more = (
        f", or start the server with a larger --context (this model takes up to {model_limit})"
        if model_limit and model_limit > context_length
        else ""
    )
    return ApiError(
        400,
        f"This model's context holds {context_length} tokens, but the conversation is {length}; shorten it{more}",
        "messages",
        "context_length_exceeded",
    )


def items_limit(context_length: int) -> int:
    """The most messages (or tools) a request may hold: more could not fit in `context_length` tokens."""
    return max(1, min(context_length, 131072) // MESSAGE_TOKENS)


def json_type(value: Any) -> str:
    """A value's type in JSON's words, for error messages."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), (dict, "an object"), (list, "a list")):
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def request_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{param or name}' must be true or false, not {json_type(value)}", param or name)
    return value


def string(body: dict, name: str, param: str | None = None) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{param or name}' must be a string, not {json_type(value)}", param or name)
    return value


def obj(body: dict, name: str, param: str | None = None) -> dict:
    """An optional object field; missing or null is an empty object."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{param or name}' must be an object, not {json_type(value)}", param or name)
    return value


def items(body: dict, name: str, limit: int, param: str | None = None) -> list:
    """An optional list field of at most `limit` items; missing or null is an empty list."""
    value = body.get(name)
    param = param or name
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, f"'{param}' must be a list, not {json_type(value)}", param)
    if len(value) > limit:
        raise ApiError(400, f"'{param}' holds {len(value)} items; at most {limit} fit in this server's context", param)
    return value


def strings(body: dict, name: str, limit: int, param: str | None = None) -> list[str]:
    """An optional list of strings (at most `limit`); missing or null is an empty list."""
    found = items(body, name, limit, param)
    for i, value in enumerate(found):
        if not isinstance(value, str):
            raise ApiError(
                400, f"'{param or name}[{i}]' must be a string, not {json_type(value)}", f"{param or name}[{i}]"
            )
    return found


def number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low} to {high}, not {shown(value)}", name)
    return float(value)


def positive_int(body: dict, *names: str) -> int | None:
    """The first of `names` that is given: a positive integer."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"'{name}' must be a positive integer, not {shown(value)}", name)
        return value
    return None


def seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED):
        raise ApiError(400, f"'seed' must be an integer from 0 to 2**64 - 1, not {shown(value)}", "seed")
    return value


def identifier(value: Any, param: str) -> str:
    """A call id: a string (a number is taken as its digits)."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ApiError(400, f"'{param}' must be a string", param)
    return str(value)


# Parts a message may hold that this text-only model cannot read: each becomes a note in the text where it was,
# so an agent that attaches a screenshot or a file goes on (and the model knows something was there).
OMITTED = {
    "input_image": "image",
    "image_url": "image",
    "image": "image",
    "input_file": "file",
    "file": "file",
    "input_audio": "audio",
}


def text(content: Any, param: str, omitted: list[str] | None = None) -> str:
    """A message's content: a string, or a list of text parts. Images, files and audio become a short note
    ("[image omitted: this model reads text only]"), whose kind is added to `omitted` if given."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if len(content) > MAX_ITEMS:
            raise ApiError(400, f"'{param}' holds {len(content)} parts; at most {MAX_ITEMS} are read", param)
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text"):
                texts.append(string(part, "text", f"{param}[{i}].text") or "")
            elif kind == "refusal":
                texts.append(string(part, "refusal", f"{param}[{i}].refusal") or "")
            elif kind in OMITTED:
                name = part.get("filename")[:200] if isinstance(part.get("filename"), str) else None
                texts.append(f"[{OMITTED[kind]} {name + ' ' if name else ''}omitted: this model reads text only]")
                if omitted is not None:
                    omitted.append(OMITTED[kind])
            else:
                raise ApiError(
                    400, f"'{param}[{i}]' has type {shown(kind)}; only text, image and file parts are read", param
                )
        return "".join(texts)
    raise ApiError(400, f"'{param}' must be a string or a list of text parts, not {json_type(content)}", param)


def stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    found = [stop] if isinstance(stop, str) else stop
    if not isinstance(found, list) or not all(isinstance(s, str) and s for s in found):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} strings", "stop")
    if len(found) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' holds {len(found)} sequences; at most {MAX_STOP_SEQUENCES} are allowed", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in found):
        raise ApiError(400, f"each 'stop' sequence must be at most {MAX_STOP_LENGTH} characters long", "stop")
    return found


def nesting(value: Any, limit: int) -> int:
    """How many levels of objects and lists `value` has, counting no further than `limit` + 1 (no recursion:
    a client's value may be nested deeper than Python recurses)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def shown(value: Any) -> str:
    """A value for an error message (its repr), but not a huge one: a client may send megabytes."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return "a larger integer"
    text = repr(value)
    return text if len(text) <= 80 else json_type(value)

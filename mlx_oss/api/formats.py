"""Structured outputs: OpenAI's `response_format` (Chat Completions) and `text.format` (Responses) read into the
`Grammar` the final answer must match, and the instructions that tell the model about it.

Both APIs describe the same three formats, nested differently: chat wraps a schema's fields in `json_schema`,
Responses puts them beside `type`. A schema is enforced token by token only with `strict: true` (OpenAI's default
is false, which OpenAI does not enforce either); without it the answer is held to any JSON object, and the model
still reads the schema in its instructions.
"""

from __future__ import annotations

import json
from typing import Any

from ..grammar import Grammar
from . import fields as f
from .fields import MAX_SCHEMA_DEPTH, ApiError

FORMATS = ("text", "json_object", "json_schema")


def response_format(value: Any, param: str = "response_format") -> Grammar | None:
    """Chat's `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`."""
    kind = _kind(value, param)
    if kind != "json_schema":
        return _simple(kind, param)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, f"'{param}.json_schema' must be an object, not {f.json_type(spec)}", f"{param}.json_schema")
    return _schema(spec, f"{param}.json_schema")


def text_format(value: Any, param: str = "text.format") -> Grammar | None:
    """Responses' `text.format`: `{"type": "text"}`, `{"type": "json_object"}` or
    `{"type": "json_schema", "name", "schema", "strict", "description"}`."""
    kind = _kind(value, param)
    return _schema(value, param) if kind == "json_schema" else _simple(kind, param)


def format_instructions(value: Any) -> str | None:
    """What the model is told about a JSON schema format (harmony's "Response Formats" section of the developer
    message), from a `response_format` or `text.format` already read by the functions above; None otherwise."""
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        return None
    spec = value.get("json_schema", value)
    lines = ["# Response Formats", "", f"## {spec.get('name') or 'response'}", ""]
    if spec.get("description"):
        lines.append(f"// {spec['description']}")
    lines.append(json.dumps(spec["schema"], ensure_ascii=False))
    return "\n".join(lines)


def _kind(value: Any, param: str) -> str:
    if not isinstance(value, dict):
        raise ApiError(400, f"'{param}' must be an object, not {f.json_type(value)}", param)
    kind = value.get("type")
    if kind not in FORMATS:
        raise ApiError(400, f"'{param}.type' must be one of {', '.join(FORMATS)}, not {f.shown(kind)}", f"{param}.type")
    return kind


def _simple(kind: str, param: str) -> Grammar | None:
    return Grammar("json_object", param=param) if kind == "json_object" else None


def _schema(spec: dict, param: str) -> Grammar:
    """A `json_schema` format's fields: `schema` (an object), `strict`, and a `name` and `description` that are
    strings when given."""
    f.string(spec, "name", f"{param}.name")
    f.string(spec, "description", f"{param}.description")
    strict = f.boolean(spec, "strict", f"{param}.strict")
    schema = spec.get("schema")
    where = f"{param}.schema"
    if not isinstance(schema, dict):
        raise ApiError(400, f"'{where}' must be a JSON schema object, not {f.json_type(schema)}", where)
    if f.nesting(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ApiError(400, f"'{where}' is nested more than {MAX_SCHEMA_DEPTH} levels deep", where)
    return Grammar("json_schema", schema, strict, where)

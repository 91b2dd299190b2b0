"""Constrained decoding: what the model's final answer and its tool calls' arguments must match, token by token.

An API request says what its output must be (`response_format`, a tool's JSON schema, a freeform tool's grammar);
the `api` modules describe that as `TurnConstraints`, the server checks them before generating (`check`), and the
engine turns them into a logits processor (`constrainer`) that masks every token that could not continue a
well-formed harmony turn whose constrained pieces match their grammars. The reasoning stays free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MlxOssError
from .sampling import LogitsProcessor


class GrammarError(MlxOssError):
    """A grammar or schema that cannot be compiled; `param` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Grammar:
    """One constraint on a piece of output.

    `kind` is "json_schema" (`source`: the schema; `strict`: exactly the schema, else any JSON object, as OpenAI
    treats a tool that is not strict), "json_object" (any JSON object), "lark" or "regex" (`source`: the grammar's
    text). `param` names the request field it came from, for errors.
    """

    kind: str
    source: Any = None
    strict: bool = True
    param: str | None = None


@dataclass(frozen=True)
class TurnConstraints:
    """What one assistant turn must match: the final answer (`answer`), the content of a call to each recipient
    (`calls`: `functions.get_weather` -> its arguments' grammar), and whether the turn must call one of
    `must_call` before it ends (a `tool_choice` of "required" or a named function). Empty constrains nothing."""

    answer: Grammar | None = None
    calls: Mapping[str, Grammar] = field(default_factory=dict)
    must_call: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return self.answer is not None or bool(self.calls) or bool(self.must_call)


def check(constraints: TurnConstraints) -> None:
    """Raises `GrammarError` naming the request field of the first grammar that cannot be compiled."""


def constrainer(constraints: TurnConstraints) -> LogitsProcessor | None:
    """A logits processor for one completion that keeps the turn within `constraints` (None: nothing to do)."""
    return None

"""Constrained decoding: what the model's final answer and its tool calls' arguments must match, token by token.

An API request says what its output must be (`response_format`, a tool's JSON schema, a freeform tool's grammar);
the `api` modules describe that as `TurnConstraints`, the server checks them before generating (`check`), and the
engine turns them into a logits processor (`constrainer`) that masks every token that could not continue a
well-formed harmony turn whose constrained pieces match their grammars. The reasoning stays free.

The whole assistant turn is one llguidance grammar (`turn_grammar`): harmony's headers and special tokens are
spelled out, reasoning and preambles are free text, the final answer and each call's content are sub-grammars.
llguidance computes a mask over our 201,088-token vocabulary in tens of microseconds even in free text, so one
grammar costs less than a Python state machine beside it would, and no header the model writes can slip between
the two. llguidance was chosen over xgrammar and outlines-core because it compiles lazily (an agent's large tool
schemas cost milliseconds, not seconds, before the first token), its Lark grammars name special tokens (which
harmony needs) and OpenAI's own freeform tool grammars are written in its Lark dialect; it has resource limits
for hostile schemas (`LIMITS`).

llguidance is imported on first use: `import mlx_oss` stays light, and the tokenizer (about 2 s to build) is
built once per process.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import MlxOssError
from .sampling import LogitsProcessor

log = logging.getLogger("mlx_oss.grammar")

VOCAB_SIZE = 201088  # o200k_harmony: 199,998 ranks, then special tokens up to <|reserved_201087|>
KINDS = ("json_schema", "json_object", "lark", "regex")
# Whitespace allowed between two JSON tokens: enough for pretty-printed JSON nested 30 deep, but bounded, so that
# a model whose likely tokens are all masked cannot fill its answer with blank lines.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,64}"
CACHED_TURNS = 32  # compiled turn grammars kept (an agent sends the same tools with every request)
MAX_PATH_PROBES = 64  # compilations spent looking for the schema path of an error
# o200k_base's pre-tokenizer (from tiktoken): llguidance tokenizes grammar literals with it.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


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
    `must_call` before it ends (a `tool_choice` of "required" or a named function). Empty constrains nothing.

    Once anything is constrained, the turn may call only the recipients in `calls` (or in `must_call`, when it is
    given): an API module lists every tool it offers there, with None for a freeform tool whose content is free
    text. `must_call` rules out a final answer. A commentary preamble (text to the user before a call) is allowed
    only when `answer` is None: the APIs show it as part of the answer, which would then not match.

    `builtin` names the built-in tools' recipients (`python`, `browser.search`) the agent loop runs: gpt-oss calls
    them on the analysis channel with free content, and such a call ends only a step of the turn (the loop runs it
    and generates on), so it stays allowed whatever `must_call` says. It constrains nothing by itself."""

    answer: Grammar | None = None
    calls: Mapping[str, Grammar | None] = field(default_factory=dict)
    must_call: frozenset[str] = frozenset()
    builtin: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return self.answer is not None or bool(self.calls) or bool(self.must_call)


def check(constraints: TurnConstraints) -> None:
    """Raises `GrammarError` naming the request field (and the schema path, when found) of the first grammar
    that cannot be compiled. Compiles the turn's grammar, so `constrainer` finds it ready."""
    if constraints:
        _compiled(constraints)


def constrainer(constraints: TurnConstraints) -> LogitsProcessor | None:
    """A logits processor for one completion that keeps the turn within `constraints` (None: nothing to do)."""
    if not constraints:
        return None
    return TurnMask(_compiled(constraints).deep_copy())


# -- the turn as one grammar -----------------------------------------------------------------------------------


def turn_grammar(constraints: TurnConstraints) -> str:
    """The llguidance grammar (JSON with a Lark main grammar) of an assistant turn within `constraints`.

    Generation starts right after the prompt's `<|start|>assistant`, so the turn is: any number of reasoning
    messages (and preambles, when the answer is free), each ending `<|end|><|start|>assistant`, then either the
    final answer ending `<|return|>` or one call ending `<|call|>`. A call's header may name its recipient after
    the channel (`<|channel|>commentary to=functions.f <|constrain|>json`, as gpt-oss usually writes it) or
    before it (`to=functions.f<|channel|>commentary`); its content type is optional. A built-in tool's call is
    the same on the analysis channel (`<|channel|>analysis to=python code`), its content free.
    """
    subgrammars: list[dict] = []

    def content(grammar: Grammar | None) -> str:
        if grammar is None:
            return "TEXT"
        name = f"g{len(subgrammars)}"
        subgrammars.append({"name": name, **_piece(grammar)})
        return "@" + name

    recipients = sorted(constraints.must_call) if constraints.must_call else sorted(constraints.calls)
    endings, rules = [], []
    if not constraints.must_call:
        endings.append("final")
        rules.append(f'final: <|channel|> "final" <|message|> {content(constraints.answer)} <|return|>')
    for i, recipient in enumerate(recipients):
        grammar = constraints.calls.get(recipient)
        target = json.dumps(" to=" + recipient, ensure_ascii=False)
        kind = '"json"' if grammar is not None and grammar.kind in ("json_schema", "json_object") else "CONTENT_TYPE"
        endings.append(f"call{i}")
        rules.append(
            f'call{i}: (<|channel|> "commentary" {target} | {target} <|channel|> "commentary") '
            f'(" " <|constrain|>? {kind})? <|message|> {content(grammar)} <|call|>'
        )
    for i, recipient in enumerate(sorted(constraints.builtin)):
        target = json.dumps(" to=" + recipient, ensure_ascii=False)
        endings.append(f"builtin{i}")
        rules.append(
            f'builtin{i}: (<|channel|> "analysis" {target} | {target} <|channel|> "analysis") '
            '(" " <|constrain|>? CONTENT_TYPE)? <|message|> TEXT <|call|>'
        )
    messages = ['<|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"']
    if constraints.answer is None:
        messages.append('<|channel|> "commentary" <|message|> TEXT <|end|> <|start|> "assistant"')  # a preamble
    lark = "\n".join(
        [
            f"start: message* ({' | '.join(endings)})",
            f"message: {' | '.join(messages)}",
            *rules,
            "TEXT: /(?s:.*)/",
            "CONTENT_TYPE: /[A-Za-z0-9_.\\-]{1,32}/",
        ]
    )
    return json.dumps({"grammars": [{"lark_grammar": lark}, *subgrammars]}, ensure_ascii=False)


def _piece(grammar: Grammar) -> dict:
    """One constrained piece as an llguidance sub-grammar."""
    if grammar.kind not in KINDS:
        raise GrammarError(f"unknown grammar kind {grammar.kind!r}; expected one of {', '.join(KINDS)}", grammar.param)
    if grammar.kind in ("lark", "regex"):
        if not isinstance(grammar.source, str):
            raise GrammarError(f"a {grammar.kind} grammar must be text", grammar.param)
        if grammar.kind == "lark":
            return {"lark_grammar": grammar.source}
        import llguidance

        return {"lark_grammar": f"start: /{llguidance.regex_to_lark(grammar.source)}/"}
    schema = grammar.source if grammar.kind == "json_schema" and grammar.strict else {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object", grammar.param)
    return {"json_schema": _with_options(schema)}


def _with_options(schema: dict) -> dict:
    """`schema` with our JSON options for llguidance (bounded whitespace); a schema's own `x-guidance` loses."""
    return {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}


# -- compiling, cached -----------------------------------------------------------------------------------------

_lock = threading.Lock()
_tokenizer = None
_compiled_turns: OrderedDict[str, Any] = OrderedDict()


def tokenizer():
    """The llguidance tokenizer of harmony's o200k vocabulary with its special tokens, built once."""
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            _tokenizer = _build_tokenizer()
        return _tokenizer


def _build_tokenizer():
    import llguidance

    from .harmony import END_OF_TEXT, NON_TEXT_TOKENS, token_bytes

    table = token_bytes()
    texts = len(table) - NON_TEXT_TOKENS  # the vocabulary's ranks; harmony's special tokens follow
    ranks = {table[i]: i for i in range(texts)}
    specials = {table[i].decode(): i for i in range(texts, len(table))}
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=ranks, special_tokens=specials, pattern=O200K_PATTERN, eos_token=END_OF_TEXT, n_vocab=VOCAB_SIZE
    )


def limits():
    """llguidance's bounds on what one grammar may cost: compiling (lexer fuel, grammar size), memory (lexer
    states) and each token's mask (step fuel and items, about 15 ms at most). Errors name no grammar internals."""
    import llguidance

    return llguidance.LLParserLimits(
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_lexer_states=50_000,
        max_grammar_size=500_000,
        verbose_errors=False,
    )


def _compiled(constraints: TurnConstraints):
    """The turn's matcher before its first token (copy it to use it), compiled once per distinct constraints."""
    key = _key(constraints)
    with _lock:
        if key in _compiled_turns:
            _compiled_turns.move_to_end(key)
            return _compiled_turns[key]
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer(), turn_grammar(constraints), limits=limits(), log_level=0)
    if matcher.is_error():
        _raise_first_error(constraints, matcher.get_error())
    with _lock:
        _compiled_turns[key] = matcher
        while len(_compiled_turns) > CACHED_TURNS:
            _compiled_turns.popitem(last=False)
    return matcher


def _key(constraints: TurnConstraints) -> str:
    def described(grammar: Grammar | None):
        return grammar and [grammar.kind, grammar.source, grammar.strict]

    calls = sorted((name, described(g)) for name, g in constraints.calls.items())
    try:
        return json.dumps(
            [described(constraints.answer), calls, sorted(constraints.must_call), sorted(constraints.builtin)],
            sort_keys=True,
            default=repr,
        )
    except (TypeError, ValueError, RecursionError) as e:
        raise GrammarError(f"a grammar cannot be read: {e}") from None


def _raise_first_error(constraints: TurnConstraints, turn_error: str):
    """Raises the error of the first piece that does not compile on its own, naming its field and path."""
    pieces = [constraints.answer, *(constraints.calls[name] for name in sorted(constraints.calls))]
    for grammar in pieces:
        if grammar is None:
            continue
        error = _error_of(_piece(grammar))
        if error:
            where = _schema_path(grammar, error) if grammar.kind == "json_schema" and grammar.strict else ""
            field_name = f"'{grammar.param}'" if grammar.param else "a grammar"
            at = f" at {where}" if where else ""
            raise GrammarError(f"{field_name} cannot be used to constrain the output{at}: {error}", grammar.param)
    raise GrammarError(f"the output's grammars cannot be compiled together: {turn_error}")


def _error_of(piece: dict) -> str:
    """llguidance's error for one sub-grammar alone ("" when it compiles)."""
    import llguidance

    grammar = json.dumps({"grammars": [{"lark_grammar": "start: @g"}, {"name": "g", **piece}]}, ensure_ascii=False)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer(), limits=limits())
    return messages[0] if failed and messages else ""


SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def _schema_path(grammar: Grammar, error: str) -> str:
    """The JSON pointer (`#/properties/a`) of the deepest subschema that fails with the same error on its own.

    llguidance reports what is wrong but not where, so the subschemas are compiled one by one along the failing
    branch (each with the root's definitions, which references point at), at most `MAX_PATH_PROBES` times.
    """
    root = grammar.source
    definitions = {k: root[k] for k in ("$defs", "definitions") if k in root}
    path: list[str] = []
    node, probes = root, 0
    while probes < MAX_PATH_PROBES:
        for key, child in _children(node):
            if probes >= MAX_PATH_PROBES:
                break
            probes += 1
            if isinstance(child, dict) and _error_of({"json_schema": _with_options({**definitions, **child})}) == error:
                path, node = [*path, *key], child
                break
        else:
            break
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path) if path else "#"


def _children(schema: dict):
    for name in SUBSCHEMA_MAPS:
        value = schema.get(name)
        if isinstance(value, dict):
            yield from (((name, k), v) for k, v in value.items())
    for name in SUBSCHEMA_LISTS:
        value = schema.get(name)
        if isinstance(value, list):
            yield from (((name, str(i)), v) for i, v in enumerate(value))
    for name in SUBSCHEMA_ONE:
        if name in schema:
            yield (name,), schema[name]


# -- the mask, token by token ----------------------------------------------------------------------------------

ORDINARY_WORDS = 199968 // 32  # mask words whose 32 tokens are all ordinary text (ids below the special tokens)


class TurnMask:
    """The logits processor of one completion: feeds the matcher the tokens sampled since its last call, then
    masks (to -inf) every token the grammar does not allow next.

    Should the matcher fail (a limit of `limits` reached mid-turn), the rest of the turn goes unconstrained and a
    warning is logged: a turn cut off there would be no better.
    """

    def __init__(self, matcher):
        self.matcher = matcher
        self.fed = 0
        self.words = np.zeros((VOCAB_SIZE + 31) // 32, np.int32)
        self.failed = False

    def __call__(self, tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        if self.failed:
            return logits
        matcher = self.matcher
        for token in tokens[self.fed :]:
            matcher.consume_token(int(token))
        self.fed = len(tokens)
        if not matcher.is_error():
            matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if matcher.is_error():
            self.failed = True
            log.warning("constrained decoding stopped mid-turn: %s", matcher.get_error())
            return logits
        return apply_mask(logits, self.words)


def apply_mask(logits: np.ndarray, words: np.ndarray) -> np.ndarray:
    """`logits` with every token whose bit is clear in `words` set to -inf (in place when the row allows).

    In free text every ordinary token is allowed: only the last ~1,100 ids (the special tokens) need a look, so
    reasoning costs a few microseconds a token, not the whole row's.
    """
    row = logits if logits.flags.writeable else logits.copy()
    start = ORDINARY_WORDS * 32 if (words[:ORDINARY_WORDS] == -1).all() else 0
    end = min(row.shape[-1], words.size * 32)
    allowed = np.unpackbits(words[start // 32 :].view(np.uint8), bitorder="little")[: end - start].view(bool)
    np.copyto(row[start:end], -np.inf, where=~allowed)
    row[end:] = -np.inf
    return row

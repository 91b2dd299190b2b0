"""Constrained decoding: the turn grammar token by token, the engine on a model whose own output is junk, the
API's `response_format`, and the server answering the official `openai` client.

The junk model favours its script's tokens (harmony headers it gets wrong, prose where JSON is asked for) and,
where the mask rules them out or the script has run out, a few closing tokens in a fixed order. Every test that
checks a constrained reply first checks that the same script without constraints does not pass, so it is the
constraint that did the work.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import jsonschema
import numpy as np
import pytest
from harmony_helpers import ScriptedModel, harmony_tokens

from mlx_oss.api.chat_completions import parse_chat
from mlx_oss.api.fields import ApiError
from mlx_oss.api.formats import response_format, text_format
from mlx_oss.engine import AnswerDelta, Done, Engine, SamplingParams, ToolCall
from mlx_oss.grammar import (
    VOCAB_SIZE,
    Grammar,
    GrammarError,
    TurnConstraints,
    check,
    constrainer,
    tokenizer,
    turn_grammar,
)
from mlx_oss.harmony import Conversation, Message, render_prompt

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "celsius": {"type": "integer", "minimum": -90, "maximum": 60},
        "sunny": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["wind", "rain", "sun"]}},
    },
    "required": ["city", "celsius", "sunny", "tags"],
    "additionalProperties": False,
}
GET_WEATHER = "functions.get_weather"
PATCH = "*** Begin Patch\n*** Add File: a.txt\n+hello\n*** End Patch"
PATCH_LARK = r"""
start: "*** Begin Patch\n" hunk+ "*** End Patch"
hunk: "*** Add File: " /[^\n]+/ "\n" ("+" /[^\n]*/ "\n")*
"""

# -- the turn grammar, token by token --------------------------------------------------------------------------


def first_refused(constraints: TurnConstraints, text: str) -> int | None:
    """The index of the first token of `text` the constrainer masks, or None when it allows them all."""
    process = constrainer(constraints)
    tokens = harmony_tokens(text)
    for i, token in enumerate(tokens):
        row = process(tokens[:i], np.zeros(VOCAB_SIZE, np.float32))
        if row[token] == -np.inf:
            return i
    return None


ANSWER = TurnConstraints(answer=Grammar("json_schema", WEATHER))
TOOLS = TurnConstraints(
    calls={GET_WEATHER: Grammar("json_schema", WEATHER), "functions.patch": None, "functions.pick": None}
)
GOOD = '{"city": "Paris", "celsius": 21, "sunny": true, "tags": ["sun"]}'
THOUGHT = "<|channel|>analysis<|message|>The user wants JSON. Let me <think> about it.<|end|><|start|>assistant"


@pytest.mark.parametrize(
    "constraints, text",
    [
        (ANSWER, f"{THOUGHT}<|channel|>final<|message|>{GOOD}<|return|>"),
        (ANSWER, f"{THOUGHT}{THOUGHT}<|channel|>final<|message|>{GOOD}<|return|>"),
        (ANSWER, f"{THOUGHT.replace('JSON', '天気 🌤️🦜')}<|channel|>final<|message|>{GOOD.replace('Paris', '東京 🗼')}"),
        (
            ANSWER,
            '<|channel|>final<|message|>{\n  "city": "Paris",\n  "celsius": -3,\n  "sunny": false,\n  "tags": []\n}',
        ),
        (TOOLS, f"{THOUGHT}<|channel|>commentary to={GET_WEATHER} <|constrain|>json<|message|>{GOOD}<|call|>"),
        (TOOLS, f" to={GET_WEATHER}<|channel|>commentary json<|message|>{GOOD}<|call|>"),
        (TOOLS, f"<|channel|>commentary to={GET_WEATHER}<|message|>{GOOD}<|call|>"),
        (TOOLS, "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final<|message|>Hi!"),
        (TOOLS, f"<|channel|>commentary to=functions.patch<|message|>{PATCH}<|call|>"),
    ],
)
def test_a_well_formed_turn_passes_token_by_token(constraints, text):
    assert first_refused(constraints, text) is None


@pytest.mark.parametrize(
    "constraints, text, refused",
    [
        (ANSWER, "<|channel|>analysis<|message|>Thinking<|return|>", "<|return|>"),  # a turn without an answer
        (ANSWER, "<|channel|>analysis<|message|>Thinking<|call|>", "<|call|>"),
        (ANSWER, "<|channel|>final<|message|>Sure! Here it is", "Sure"),
        (ANSWER, '<|channel|>final<|message|>{"city": "Paris", "weather": "sunny"}', "weather"),
        (ANSWER, f"<|channel|>final<|message|>{GOOD} Done.", " Done"),
        (ANSWER, "<|channel|>commentary<|message|>Checking.<|end|>", "comment"),  # a preamble shows as answer
        (ANSWER, f"<|channel|>commentary to={GET_WEATHER}<|message|>{{}}<|call|>", "comment"),  # no calls listed
        (ANSWER, "Sure, here it is", "Sure"),  # text before any header
        (ANSWER, "<|channel|>analysis<|message|>Hm<|end|><|channel|>final", "<|channel|>"),  # no <|start|>
        (TOOLS, "<|channel|>commentary to=functions.get_wether", "_w"),  # a recipient not listed
        (TOOLS, f"<|channel|>commentary to={GET_WEATHER} <|constrain|>json<|message|>city=Paris", "city"),
        (TOOLS, f"<|channel|>commentary to={GET_WEATHER}<|message|>{GOOD}<|return|>", "<|return|>"),
        (TOOLS, "<|channel|>final<|message|>Hi!<|endoftext|>", "<|endoftext|>"),
    ],
)
def test_a_token_that_breaks_the_turn_is_masked(constraints, text, refused):
    at = first_refused(constraints, text)
    assert at is not None and tokenizer().decode_str([harmony_tokens(text)[at]]) == refused


def test_must_call_rules_out_the_final_answer_and_other_recipients():
    constraints = TurnConstraints(calls=TOOLS.calls, must_call=frozenset({GET_WEATHER}))
    assert first_refused(constraints, "<|channel|>final<|message|>No.<|return|>") == 1
    assert first_refused(constraints, "<|channel|>commentary to=functions.patch<|message|>x<|call|>") is not None
    call = f"{THOUGHT}<|channel|>commentary to={GET_WEATHER} <|constrain|>json<|message|>{GOOD}<|call|>"
    assert first_refused(constraints, call) is None


PYTHON_CALL = "<|channel|>analysis to=python code<|message|>import json\nprint(json.dumps({'a': 1}))<|call|>"
BUILTIN = frozenset({"python", "browser.search", "browser.open", "browser.find"})


@pytest.mark.parametrize(
    "text",
    [
        f"{THOUGHT}{PYTHON_CALL}",
        ' to=browser.search<|channel|>analysis code<|message|>{"query": "gpt-oss"}<|call|>',
        '<|channel|>analysis to=browser.open <|constrain|>json<|message|>{"id": 3}<|call|>',
        '<|channel|>analysis to=browser.find<|message|>{"pattern": "x"}<|call|>',
        f"{THOUGHT}<|channel|>final<|message|>{GOOD}<|return|>",  # answering stays allowed, held to its schema
    ],
)
def test_builtin_tools_are_callable_on_the_analysis_channel_beside_the_constraints(text):
    assert first_refused(dataclasses.replace(ANSWER, builtin=BUILTIN), text) is None


def test_builtin_calls_stay_allowed_when_a_function_must_be_called_and_only_the_listed_ones():
    must = TurnConstraints(calls=TOOLS.calls, must_call=frozenset({GET_WEATHER}), builtin=frozenset({"python"}))
    assert first_refused(must, PYTHON_CALL) is None  # the loop runs it and generates on: the turn goes on
    refused = first_refused(must, '<|channel|>analysis to=browser.search<|message|>{"query": "x"}<|call|>')
    assert refused is not None and first_refused(ANSWER, PYTHON_CALL) is not None  # not listed: masked
    assert not TurnConstraints(builtin=BUILTIN)  # built-in recipients alone constrain nothing


@pytest.mark.parametrize(
    "grammar, good, bad",
    [
        (Grammar("lark", PATCH_LARK), PATCH, "*** Begin Patch\nrm -rf /\n"),
        (Grammar("regex", r"(yes|no) \d{1,3}"), "no 42", "maybe"),
        (Grammar("json_object"), '{"anything": [1, 2]}', "[1, 2]"),
        (Grammar("json_schema", WEATHER, strict=False), '{"anything": [1, 2]}', '"text"'),
    ],
)
def test_lark_regex_and_any_json_object_hold_a_calls_content(grammar, good, bad):
    constraints = TurnConstraints(calls={"functions.tool": grammar})
    head = "<|channel|>commentary to=functions.tool <|constrain|>grammar<|message|>"
    if grammar.kind.startswith("json"):
        head = head.replace("grammar", "json")
    assert first_refused(constraints, f"{head}{good}<|call|>") is None
    assert first_refused(constraints, f"{head}{bad}<|call|>") is not None


def test_free_reasoning_is_nearly_free():
    """The mask in free text (consume, mask, apply at 201,088 tokens) costs well under a millisecond, next to a
    20b decode step of 150-200 ms; see the closing report for the measured figures."""
    process = constrainer(ANSWER)
    tokens = harmony_tokens("<|channel|>analysis<|message|>" + "Some reasoning about the question. " * 40)
    row = np.zeros(VOCAB_SIZE, np.float32)
    start = time.perf_counter()
    for i in range(len(tokens)):
        process(tokens[:i], row)
    assert (time.perf_counter() - start) / len(tokens) < 0.002


# -- check: what cannot be compiled is named -------------------------------------------------------------------


def test_a_schema_llguidance_cannot_compile_names_its_field_and_path():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "object", "properties": {"c": {"format": "bogus"}}}},
    }
    constraints = TurnConstraints(answer=Grammar("json_schema", schema, param="response_format.json_schema.schema"))
    with pytest.raises(GrammarError) as raised:
        check(constraints)
    assert raised.value.param == "response_format.json_schema.schema"
    assert "#/properties/b/properties/c" in str(raised.value) and "bogus" in str(raised.value)


def test_a_reference_that_points_nowhere_and_a_bad_lark_grammar_are_refused():
    with pytest.raises(GrammarError, match="#/properties/x") as raised:
        check(TurnConstraints(calls={"functions.f": Grammar("json_schema", {"properties": {"x": {"$ref": "#/no"}}})}))
    with pytest.raises(GrammarError) as raised:
        check(TurnConstraints(calls={"functions.f": Grammar("lark", "start: (", param="tools[2].format")}))
    assert raised.value.param == "tools[2].format"
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        check(TurnConstraints(answer=Grammar("yaml", "a: b")))


def test_a_non_strict_schema_is_never_compiled_so_never_refused():
    check(TurnConstraints(calls={"functions.f": Grammar("json_schema", {"format": "bogus"}, strict=False)}))


def test_the_grammar_names_every_listed_recipient_and_importing_mlx_oss_stays_light():
    assert "functions.patch" in turn_grammar(TOOLS) and GET_WEATHER in turn_grammar(TOOLS)
    code = "import sys, mlx_oss, mlx_oss.server, mlx_oss.engine; print('llguidance' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# -- the engine, on a model whose own output is junk -----------------------------------------------------------

RETURN, CALL, END = 200002, 200012, 200007
# Where the script's token is masked or the script is over: end what can end, close strings, objects and lists,
# prefer the final channel, then commentary (the rest fall to the lowest token id allowed).
FALLBACK = [RETURN, CALL, END, 1, 92, 60, 17196, 12606]  # ", }, ], final, comment


class JunkModel(ScriptedModel):
    """A `ScriptedModel` that, past its script, favours `FALLBACK` (first most) instead of token 0, and under
    its script's token as well, so a mask that rules the script out leads somewhere that ends."""

    def forward(self, token_ids, cache, last_only: bool = False) -> np.ndarray:
        logits = super().forward(token_ids, cache, last_only)
        if cache.length - self.prompt_length >= len(self.script):
            logits[0, 0] = 0.0
        logits[0, FALLBACK] += np.linspace(2.0, 1.0, len(FALLBACK), dtype=np.float32)
        return logits


def run(script: str, constraints: TurnConstraints | None, max_tokens: int = 400) -> list:
    model = JunkModel()
    prompt = render_prompt(Conversation([Message.user("Weather in Paris, as JSON?")]))
    model.expect(prompt, harmony_tokens(script))
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    return list(Engine(model).generate(prompt, sampling, None, constraints))


def answer_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, AnswerDelta))


def parses_as_weather(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), WEATHER)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


JUNK_ANSWER = (
    "<|channel|>analysis<|message|>They want JSON but I will chat.<|end|><|start|>assistant<|channel|>final<|message|>"
    "Sure! In Paris it is sunny and 21 degrees, with a little wind.<|return|>"
)
JUNK_HEADERS = "Sure thing! The weather in Paris: sunny <|message|> 21 degrees<|end|>, wind<|return|>"


@pytest.mark.parametrize("script", [JUNK_ANSWER, JUNK_HEADERS])
def test_a_junk_answer_is_held_to_the_schema(script):
    assert not parses_as_weather(answer_of(run(script, None)))
    events = run(script, ANSWER)
    assert parses_as_weather(answer_of(events)), answer_of(events)
    assert events[-1].stop_reason == "stop" and not events[-1].malformed


JUNK_CALL = (
    "<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant<|channel|>commentary to=functions.get_wether "
    "json<|message|>city=Paris, tomorrow, warm please<|call|>"
)


def test_junk_tool_arguments_are_held_to_the_tools_schema():
    junk = [e for e in run(JUNK_CALL, None) if isinstance(e, ToolCall)]
    assert junk and (junk[0].recipient != GET_WEATHER or not parses_as_weather(junk[0].arguments))
    events = run(JUNK_CALL, TurnConstraints(calls={GET_WEATHER: Grammar("json_schema", WEATHER)}))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [c.recipient for c in calls] == [GET_WEATHER] and parses_as_weather(calls[0].arguments)
    assert events[-1].stop_reason == "tool_call"


def test_must_call_turns_a_junk_answer_into_a_call_and_regex_holds_its_content():
    constraints = TurnConstraints(
        calls={"functions.pick": Grammar("regex", r"(yes|no)")}, must_call=frozenset({"functions.pick"})
    )
    assert not [e for e in run(JUNK_ANSWER, None) if isinstance(e, ToolCall)]
    events = run(JUNK_ANSWER, constraints)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.recipient, c.arguments) for c in calls] in ([("functions.pick", "yes")], [("functions.pick", "no")])
    assert answer_of(events) == "" and isinstance(events[-1], Done) and events[-1].stop_reason == "tool_call"


# -- the API's formats -----------------------------------------------------------------------------------------


def test_response_format_and_text_format_read_into_grammars():
    assert response_format({"type": "text"}) is None
    assert response_format({"type": "json_object"}) == Grammar("json_object", param="response_format")
    spec = {"name": "weather", "schema": WEATHER, "strict": True}
    assert response_format({"type": "json_schema", "json_schema": spec}) == Grammar(
        "json_schema", WEATHER, True, "response_format.json_schema.schema"
    )
    assert text_format({"type": "json_schema", **spec}) == Grammar("json_schema", WEATHER, True, "text.format.schema")
    assert text_format({"type": "json_schema", "schema": WEATHER}).strict is False


@pytest.mark.parametrize(
    "value, param",
    [
        ("json", "response_format"),
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "response_format.json_schema.strict"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "name": 3}}, "response_format.json_schema.name"),
    ],
)
def test_a_wrong_response_format_is_a_400_naming_the_field(value, param):
    with pytest.raises(ApiError) as raised:
        response_format(value)
    assert raised.value.status == 400 and raised.value.param == param


def test_a_chat_request_puts_the_schema_in_the_constraints_and_the_instructions():
    spec = {"name": "weather", "description": "The weather now.", "schema": WEATHER, "strict": True}
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Weather?"}],
        "response_format": {"type": "json_schema", "json_schema": spec},
    }
    request = parse_chat(body, "m")
    assert request.constraints.answer == Grammar("json_schema", WEATHER, True, "response_format.json_schema.schema")
    assert "# Response Formats\n\n## weather\n\n// The weather now.\n" in request.conversation.instructions
    assert not parse_chat({**body, "response_format": {"type": "text"}}, "m").constraints


# -- the server, with the official client ----------------------------------------------------------------------


@pytest.fixture
def junk_server():
    """(model, url): the real app under uvicorn on a `JunkModel`."""
    from serving import serving

    from mlx_oss.server import Server

    model = JunkModel()
    with serving(Server(Engine(model), "scripted", max_waiting=1)) as url:
        yield model, url


def test_the_openai_client_gets_json_that_matches_its_schema_whole_and_streamed(junk_server):
    openai = pytest.importorskip("openai")
    model, url = junk_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    prompt = render_prompt(
        parse_chat({"model": "scripted", "messages": messages, "response_format": fmt}, "scripted").conversation
    )
    model.expect(prompt, harmony_tokens(JUNK_ANSWER))
    reply = client.chat.completions.create(model="scripted", messages=messages, response_format=fmt, temperature=0)
    assert parses_as_weather(reply.choices[0].message.content), reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="scripted", messages=messages, response_format=fmt, temperature=0, stream=True
    )
    assert parses_as_weather("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    bad = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"properties": {"a": {"format": "x"}}}}}
    bad["json_schema"]["strict"] = True
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="scripted", messages=messages, response_format=bad)
    error = raised.value.body
    assert error["param"] == "response_format.json_schema.schema" and "#/properties/a" in error["message"]


def test_responses_text_format_and_strict_chat_tools_hold_through_the_server(junk_server):
    openai = pytest.importorskip("openai")
    model, url = junk_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    body = {"model": "scripted", "input": "Weather in Paris?", "text": {"format": fmt}}
    from mlx_oss.api.responses import parse_responses

    model.expect(render_prompt(parse_responses(body, "scripted").conversation), harmony_tokens(JUNK_ANSWER))
    reply = client.responses.create(model="scripted", input="Weather in Paris?", text={"format": fmt}, temperature=0)
    assert parses_as_weather(reply.output_text), reply.output_text
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "weather"

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    chat = {"model": "scripted", "messages": messages, "tools": [tool]}
    model.expect(render_prompt(parse_chat(chat, "scripted").conversation), harmony_tokens(JUNK_CALL))
    call = client.chat.completions.create(model="scripted", messages=messages, tools=[tool], temperature=0)
    (made,) = call.choices[0].message.tool_calls
    assert made.function.name == "get_weather" and parses_as_weather(made.function.arguments)

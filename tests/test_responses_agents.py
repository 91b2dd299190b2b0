"""The Responses API as agents use it: the openai-agents SDK's tool loop over both of OpenAI's APIs, the official
`openai` client sending what Codex sends (tests/data holds a trimmed copy of a request Codex 0.171.0 made), and
the parsing of every tool and input item kind they send, on a model whose turns follow the prompt."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
from harmony_helpers import PromptScriptedModel, harmony_tokens
from serving import serving

openai = pytest.importorskip("openai")

from mlx_oss.api.chat_completions import parse_chat  # noqa: E402
from mlx_oss.api.fields import ApiError  # noqa: E402
from mlx_oss.api.responses import ResponseEvents, parse_responses, response  # noqa: E402
from mlx_oss.api.wire import decrypt_reasoning, encrypt_reasoning  # noqa: E402
from mlx_oss.engine import Done, Engine, GenerationStats, ToolCall  # noqa: E402
from mlx_oss.generation_queue import Turn  # noqa: E402
from mlx_oss.grammar import Grammar  # noqa: E402
from mlx_oss.harmony import encoding, render_prompt  # noqa: E402
from mlx_oss.server import Server  # noqa: E402

CODEX_REQUEST = Path(__file__).parent / "data" / "codex_0.171.0_request.json"
WEATHER_RESULT = "<|start|>functions.get_weather to=assistant"


def weather_turn(prompt: str) -> str:
    """An agent's weather question, scripted: call get_weather, then answer from its result."""
    if WEATHER_RESULT in prompt:
        return "<|channel|>final<|message|>It is 21 degrees in Paris.<|return|>"
    return (
        "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )


def served(model, name: str = "gpt-oss-20b"):
    """The real server on `model`, under uvicorn in this process; a context that yields its URL."""
    return serving(Server(Engine(model), name))


# -- the openai-agents SDK -------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agents_sdk_agent_runs_a_tool_round_trip(api):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        called.append(city)
        return '{"celsius": 21}'

    model = PromptScriptedModel(weather_turn)
    with served(model) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        kind = agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel
        agent = agents.Agent(
            name="weather", instructions="Answer with the tool.", tools=[get_weather], model=kind("gpt-oss-20b", client)
        )
        result = agents.Runner.run_sync(agent, "Weather in Paris?")
    assert called == ["Paris"]
    assert result.final_output == "It is 21 degrees in Paris."
    assert WEATHER_RESULT in model.prompts[-1] and '{"celsius": 21}' in model.prompts[-1]


def test_an_agents_sdk_local_shell_runs_through_local_shell_calls():
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    ran = []

    def shell(request) -> str:
        ran.append(request.data.action.command)
        return "a.txt"

    def turn(prompt: str) -> str:
        if "<|start|>functions.local_shell to=assistant" in prompt:
            return "<|channel|>final<|message|>There is a.txt.<|return|>"
        return '<|channel|>commentary to=functions.local_shell <|constrain|>json<|message|>{"command": ["ls"]}<|call|>'

    model = PromptScriptedModel(turn)
    with served(model) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        tools = [agents.LocalShellTool(executor=shell)]
        agent = agents.Agent(name="shell", tools=tools, model=agents.OpenAIResponsesModel("gpt-oss-20b", client))
        result = agents.Runner.run_sync(agent, "List the files")
    assert ran == [["ls"]] and result.final_output == "There is a.txt."
    # the call sent back (with the action's empty fields as null) reads as the model wrote it
    assert (
        'to=functions.local_shell<|channel|>commentary <|constrain|>json<|message|>{"command": ["ls"]}<|call|>'
        in (model.prompts[-1])
    )


# -- what Codex sends, through the official client ---------------------------------------------------------------


def codex_body() -> dict:
    return json.loads(CODEX_REQUEST.read_text())


def test_codex_s_request_is_answered_with_a_namespace_call():
    body = codex_body()

    def turn(prompt: str) -> str:
        return (
            '<|channel|>commentary to=multi_agent_v1.close_agent <|constrain|>json<|message|>{"target": "a1"}<|call|>'
        )

    model = PromptScriptedModel(turn)
    with served(model) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        extra = {k: body[k] for k in ("prompt_cache_key", "client_metadata", "include", "store", "parallel_tool_calls")}
        raw = client.responses.with_raw_response.create(
            model=body["model"],
            input=body["input"],
            tools=body["tools"],
            tool_choice="auto",
            reasoning={"summary": "auto", "effort": "xhigh"},
            stream=True,
            extra_body={k: v for k, v in extra.items() if k != "include"},
            include=body["include"],
        )
        assert "tools[8] (web_search) left out" in raw.headers["x-mlx-oss-warning"]
        events = list(raw.parse())
    assert "## multi_agent_v1" in model.prompts[-1] and "namespace multi_agent_v1 {" in model.prompts[-1]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    (call,) = [e.item for e in events if e.type == "response.output_item.done"]
    assert (call.type, call.name, call.namespace, call.arguments) == (
        "function_call",
        "close_agent",
        "multi_agent_v1",
        '{"target": "a1"}',
    )
    done = events[-1].response
    assert done.store is False and done.parallel_tool_calls is True and done.reasoning.summary == "auto"
    assert done.prompt_cache_key == body["prompt_cache_key"]
    assert [t.type for t in done.tools] == [t["type"] for t in body["tools"]]  # as sent, namespace and hosted too
    assert [t.name for t in done.tools[4].tools] == [t["name"] for t in body["tools"][4]["tools"]]


def test_codex_s_tools_become_harmony_declarations_and_grammars():
    parsed = parse_responses(codex_body(), "gpt-oss-20b")
    prompt = encoding().decode(render_prompt(parsed.conversation))
    assert "namespace functions {" in prompt and "type exec_command = (_: {" in prompt
    assert "## multi_agent_v1\n\n// Tools for spawning and managing sub-agents.\nnamespace multi_agent_v1 {" in prompt
    assert "web_search" not in prompt
    calls = parsed.constraints.calls
    exec_command = calls["functions.exec_command"]
    assert exec_command.kind == "json_schema" and exec_command.strict is False  # Codex says strict: false
    assert exec_command.param == "tools[0].parameters"
    assert calls["multi_agent_v1.close_agent"].param == "tools[4].tools[0].parameters"
    assert parsed.warnings == ["tools[8] (web_search) left out: a hosted tool this server does not run yet"]


# -- tools -----------------------------------------------------------------------------------------------------

PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Applies a patch.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /(.|\\n)*/'},
}
CLOSED = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}


def parse(tools: list, **fields):
    return parse_responses({"model": "m", "input": "hi", "tools": tools, **fields}, "m")


def test_function_tools_are_strict_as_each_api_defaults():
    open_schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    parsed = parse(
        [
            {"type": "function", "name": "closed", "parameters": CLOSED},
            {"type": "function", "name": "open", "parameters": open_schema},
            {"type": "function", "name": "loose", "parameters": CLOSED, "strict": False},
            {"type": "function", "name": "bare"},
        ]
    )
    calls = parsed.constraints.calls
    assert calls["functions.closed"] == Grammar("json_schema", CLOSED, True, "tools[0].parameters")
    assert calls["functions.open"].strict is False  # not compatible with strict mode: OpenAI falls back
    assert calls["functions.loose"].strict is False
    assert calls["functions.bare"] == Grammar("json_object", param="tools[3]")
    assert [t["strict"] for t in parsed.echo["tools"]] == [True, False, False, True]  # nothing loose in no arguments
    chat = parse_chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "function", "function": {"name": "a", "parameters": CLOSED}},
                {"type": "function", "function": {"name": "b", "parameters": CLOSED, "strict": True}},
            ],
        },
        "m",
    )
    assert [t.grammar.strict for t in chat.conversation.tools] == [False, True]  # chat: strict only when asked


def test_custom_tools_are_freeform_functions_with_their_grammar():
    parsed = parse([PATCH, {"type": "custom", "name": "note"}], tool_choice={"type": "custom", "name": "apply_patch"})
    assert parsed.constraints.calls == {
        "functions.apply_patch": Grammar("lark", PATCH["format"]["definition"], param="tools[0].format"),
        "functions.note": None,  # free text
    }
    assert parsed.constraints.must_call == frozenset({"functions.apply_patch"})
    prompt = encoding().decode(render_prompt(parsed.conversation))
    assert "type apply_patch = () => any;" in prompt and "freeform text, not JSON" in prompt
    assert "Call the function apply_patch before you answer." in prompt
    assert parsed.echo["tools"][0]["format"] == PATCH["format"]


def test_calls_come_back_as_the_tool_was_offered():
    parsed = parse(
        [
            PATCH,
            {"type": "local_shell"},
            {
                "type": "namespace",
                "name": "crm",
                "description": "The CRM.",
                "tools": [{"type": "function", "name": "find"}],
            },
        ]
    )
    turn = Turn(
        calls=[
            ToolCall("functions.apply_patch", "*** Begin Patch\n"),
            ToolCall("functions.local_shell", '{"command": ["ls", "-l"], "working_directory": "/tmp"}'),
            ToolCall("crm.find", "{}"),
            ToolCall("functions.unknown", "{}"),
        ],
        done=Done("tool_call", GenerationStats(5, 0, 9, 0.1, 1.0, 1.0)),
    )
    out = response("resp_1", "m", turn, parsed)["output"]
    assert [item["type"] for item in out] == ["custom_tool_call", "local_shell_call", "function_call", "function_call"]
    assert out[0]["name"] == "apply_patch" and out[0]["input"] == "*** Begin Patch\n"
    assert out[1]["action"] == {
        "type": "exec",
        "command": ["ls", "-l"],
        "working_directory": "/tmp",
        "timeout_ms": None,
        "env": None,
        "user": None,
    }
    assert (out[2]["name"], out[2]["namespace"]) == ("find", "crm")
    assert out[3]["name"] == "unknown" and "namespace" not in out[3]
    assert parsed.constraints.calls["functions.local_shell"].kind == "json_schema"
    events = ResponseEvents("resp_1", "m", parsed)
    streamed = "".join(events.piece(turn.calls[0], turn))
    assert "response.custom_tool_call_input.delta" in streamed and "response.custom_tool_call_input.done" in streamed


@pytest.mark.parametrize("hosted", ["web_search", "image_generation", "mcp", "file_search", "code_interpreter"])
def test_hosted_tools_are_left_out_with_a_warning(hosted):
    parsed = parse([{"type": hosted, "server_label": "x"}, {"type": "function", "name": "f"}])
    assert [t.name for t in parsed.conversation.tools] == ["f"]
    assert parsed.warnings == [f"tools[0] ({hosted}) left out: a hosted tool this server does not run yet"]


@pytest.mark.parametrize(
    ("given", "effort"), [("none", "low"), ("minimal", "low"), ("xhigh", "high"), (None, "medium")]
)
def test_efforts_of_other_models_map_to_gpt_oss_s(given, effort):
    assert parse([], reasoning={"effort": given}).conversation.reasoning_effort == effort
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": given}
    assert parse_chat(chat, "m").conversation.reasoning_effort == effort


# -- input items -----------------------------------------------------------------------------------------------


def rendered(items: list, **fields) -> str:
    parsed = parse_responses({"model": "m", "input": items, **fields}, "m")
    return encoding().decode(render_prompt(parsed.conversation)), parsed.warnings


def test_every_call_kind_an_agent_sends_back_reaches_the_model():
    text, warnings = rendered(
        [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "Fix it"}, {"type": "input_image", "image_url": "x"}],
            },
            {
                "type": "reasoning",
                "summary": [],
                "content": None,
                "encrypted_content": encrypt_reasoning("Patch first."),
            },
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"},
            {
                "type": "local_shell_call",
                "call_id": "c2",
                "status": "completed",
                "action": {"type": "exec", "command": ["ls"]},
            },
            {"type": "local_shell_call_output", "id": "c2", "output": "a.txt"},
            {"type": "function_call", "call_id": "c3", "name": "close_agent", "namespace": "multi", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c3",
                "output": [{"type": "input_text", "text": "closed"}, {"type": "input_image", "image_url": "y"}],
            },
            {
                "type": "web_search_call",
                "id": "ws_1",
                "status": "completed",
                "action": {"type": "search", "query": "q"},
            },
        ]
    )
    assert "Fix it[image omitted: this model reads text only]" in text
    assert "<|channel|>analysis<|message|>Patch first.<|end|>" in text  # our encrypted_content restores it
    assert "to=functions.apply_patch<|channel|>commentary<|message|>*** Begin Patch<|call|>" in text  # no json type
    assert "<|start|>functions.apply_patch to=assistant<|channel|>commentary<|message|>Done!" in text
    assert 'to=functions.local_shell<|channel|>commentary <|constrain|>json<|message|>{"command": ["ls"]}' in text
    assert (
        "to=multi.close_agent<|channel|>commentary <|constrain|>json" in text
        and "<|start|>multi.close_agent to=assistant" in text
    )
    assert "closed[image omitted: this model reads text only]" in text
    assert "input images omitted: this model reads text only (a note stands in their place)" in warnings
    assert "input items left out: web_search_call x1" in warnings


def test_reasoning_sent_back_without_content_is_read_from_what_it_has():
    assert decrypt_reasoning(encrypt_reasoning("é?")) == "é?" and decrypt_reasoning("gAAAAB...") is None
    call = [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"},
    ]
    for reasoning, seen in [
        ({"summary": [{"type": "summary_text", "text": "From the summary."}], "encrypted_content": None}, True),
        ({"summary": [], "encrypted_content": "gAAAAB-openai-s"}, False),
    ]:
        text, warnings = rendered([{"role": "user", "content": "hi"}, {"type": "reasoning", **reasoning}, *call])
        assert ("From the summary." in text) is seen
        assert any("reasoning encrypted by another service" in w for w in warnings) is not seen


def test_compaction_is_a_note_and_item_references_are_refused():
    text, warnings = rendered(
        [{"type": "compaction", "encrypted_content": "gAAAA"}, {"role": "user", "content": "go on"}]
    )
    assert "were compacted by another service" in text and any("compaction" in w for w in warnings)
    with pytest.raises(ApiError) as refused:
        rendered([{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_1"}])
    assert refused.value.param == "input[1]" and "stores no items" in refused.value.message
    for name in ("previous_response_id", "conversation"):
        with pytest.raises(ApiError) as refused:
            rendered("hi", **{name: "x"})
        assert refused.value.param == name


# -- answers ---------------------------------------------------------------------------------------------------


def test_reasoning_streams_as_a_summary_and_a_cut_turn_is_incomplete():
    reasoning = "<|channel|>analysis<|message|>Thinking it over."
    with served(PromptScriptedModel(lambda prompt: reasoning)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        events = list(
            client.responses.create(
                model="gpt-oss-20b",
                input="hi",
                reasoning={"summary": "auto"},
                include=["reasoning.encrypted_content"],
                max_output_tokens=len(harmony_tokens(reasoning)),
                stream=True,
                metadata={"run": "1"},
            )
        )
    kinds = [e.type for e in events]
    for kind in (
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ):
        assert kind in kinds
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert summary == "Thinking it over."
    assert kinds[-1] == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.metadata == {"run": "1"}
    (item,) = final.output
    assert item.summary[0].text == "Thinking it over."
    assert base64.b64decode(item.encrypted_content.split(":")[-1]).decode() == "Thinking it over."


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"metadata": {"a": 1}}, "metadata"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"store": 1}, "store"),
        ({"truncation": "never"}, "truncation"),
        ({"prompt_cache_key": 5}, "prompt_cache_key"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"include": [5]}, "include[0]"),
        ({"reasoning": {"summary": "short"}}, "reasoning.summary"),
        (
            {"tools": [{"type": "custom", "name": "p", "format": {"type": "grammar", "syntax": "ebnf"}}]},
            "tools[0].format",
        ),
        ({"tools": [{"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}]}, "tools[0].tools[0]"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "custom", "name": "f"}]}, "tools[1]"),
        ({"tools": [{"type": "function", "name": "f", "strict": "no"}]}, "tools[0].strict"),
    ],
)
def test_fields_echoed_or_read_are_checked(fields, param):
    with pytest.raises(ApiError) as refused:
        parse_responses({"model": "m", "input": "hi"} | fields, "m")
    assert refused.value.status == 400 and refused.value.param == param


def test_the_full_round_trip_over_http_with_custom_tools():
    def turn(prompt: str) -> str:
        if "<|start|>functions.apply_patch to=assistant" in prompt:
            return "<|channel|>final<|message|>Patched.<|return|>"
        return "<|channel|>commentary to=functions.apply_patch<|message|>*** Begin Patch\n*** End Patch<|call|>"

    with served(PromptScriptedModel(turn)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        first = client.responses.create(model="gpt-oss-20b", input="Patch it", tools=[PATCH])
        (call,) = first.output
        assert call.type == "custom_tool_call" and call.input == "*** Begin Patch\n*** End Patch"
        follow = [
            {"role": "user", "content": "Patch it"},
            call.model_dump(exclude_none=True),
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "ok"},
        ]
        second = client.responses.create(model="gpt-oss-20b", input=follow, tools=[PATCH])
        assert second.output_text == "Patched."
        reply = httpx.post(
            f"{url}/v1/responses",
            json={"model": "gpt-oss-20b", "input": "hi", "tools": [{"type": "image_generation"}]},
            timeout=60,
        )
        assert reply.status_code == 200 and "image_generation" in reply.headers["x-mlx-oss-warning"]

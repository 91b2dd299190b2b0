"""Anthropic's Messages API, driven by the official `anthropic` client over real HTTP on 127.0.0.1: the real app
under uvicorn on a model that plays a script of harmony tokens (random weights never call a tool)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from harmony_helpers import ScriptedModel, harmony_tokens
from serving import serving
from test_server import exchange

anthropic = pytest.importorskip("anthropic")

from mlx_oss.api.fields import ApiError  # noqa: E402
from mlx_oss.api.messages import UNPARSED, parse_messages, tool_input  # noqa: E402
from mlx_oss.engine import Engine  # noqa: E402
from mlx_oss.harmony import CALL as CALL_TOKEN  # noqa: E402
from mlx_oss.harmony import RETURN, render_prompt  # noqa: E402
from mlx_oss.intake import MAX_BODY_BYTES  # noqa: E402
from mlx_oss.server import WARNING_HEADER, Server  # noqa: E402

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
THOUGHT = "<|channel|>analysis<|message|>The user greets me.<|end|><|start|>assistant"
ANSWER = THOUGHT + "<|channel|>final<|message|>Hello there, how can I help?"
CALL = (
    "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
)
HI = [{"role": "user", "content": "Hi"}]
THINKING = {"type": "enabled", "budget_tokens": 2048}


@pytest.fixture
def scripted():
    """(model, client, url): the real server app on a scripted model, and an `anthropic` client for it."""
    model = ScriptedModel()
    with serving(Server(Engine(model, context_length=4096), "scripted", max_waiting=1)) as url:
        yield model, anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60), url


def prompt_of(body: dict) -> list[int]:
    return render_prompt(parse_messages({"model": "scripted", "max_tokens": 100} | body, "scripted").conversation)


def expect(model: ScriptedModel, body: dict, text: str, stop: int | None) -> list[int]:
    """Makes the model play `text` (then `stop`) after the prompt `body` renders to; the script's tokens."""
    script = harmony_tokens(text) + ([stop] if stop is not None else [])
    model.expect(prompt_of(body), script)
    return script


def test_an_answer_with_its_thinking(scripted):
    model, client, _ = scripted
    script = expect(model, {"messages": HI, "system": "Be kind."}, ANSWER, RETURN)
    reply = client.messages.create(model="scripted", max_tokens=100, system="Be kind.", messages=HI, thinking=THINKING)
    assert [block.type for block in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking == "The user greets me." and reply.content[0].signature
    assert reply.content[1].text == "Hello there, how can I help?"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert reply.id.startswith("msg_") and reply.model == "scripted" and reply.role == "assistant"
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == len(prompt_of({"messages": HI, "system": "Be kind."}))
    assert usage.output_tokens == len(script)


def test_without_thinking_asked_the_reasoning_stays_out_of_the_content(scripted):
    model, client, _ = scripted
    expect(model, {"messages": HI}, ANSWER, RETURN)
    reply = client.messages.create(model="scripted", max_tokens=100, messages=HI)
    assert [block.type for block in reply.content] == ["text"]  # content[0].text is the answer, as clients read it
    assert reply.content[0].text == "Hello there, how can I help?"


def test_any_model_name_is_answered_by_the_served_model(scripted):
    model, client, url = scripted
    expect(model, {"messages": HI}, ANSWER, RETURN)
    raw = client.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=100, messages=HI)
    assert raw.parse().model == "scripted" and "claude-haiku-4-5" in raw.headers[WARNING_HEADER]


def events_of(url: str, body: dict) -> list[tuple[str, dict]]:
    """A streamed answer's (event name, data) pairs, read off the wire."""
    pairs, name = [], None
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name
                pairs.append((name, data))
    return pairs


def test_a_streamed_answer_comes_in_anthropics_order_and_equals_the_whole_one(scripted):
    model, client, url = scripted
    body = {"model": "scripted", "max_tokens": 100, "messages": HI, "thinking": THINKING}
    expect(model, body, ANSWER, RETURN)
    whole = client.messages.create(**body)
    expect(model, body, ANSWER, RETURN)
    pairs = events_of(url, body | {"stream": True})
    names = [name for name, _ in pairs]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    starts = [(i, data) for i, (name, data) in enumerate(pairs) if name == "content_block_start"]
    assert [data["content_block"]["type"] for _, data in starts] == ["thinking", "text"]
    for n, (i, start) in enumerate(starts):  # each block: start, its deltas, stop, before the next one starts
        end = next(j for j in range(i, len(pairs)) if pairs[j][0] == "content_block_stop")
        assert all(name == "content_block_delta" and data["index"] == n for name, data in pairs[i + 1 : end])
        assert start["index"] == pairs[end][1]["index"] == n
    kinds = [data["delta"]["type"] for name, data in pairs if name == "content_block_delta"]
    assert kinds[-1] == "text_delta" and kinds.index("signature_delta") == kinds.index("text_delta") - 1
    assert pairs[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}

    expect(model, body, ANSWER, RETURN)
    with client.messages.stream(**body) as stream:
        text = "".join(stream.text_stream)
        streamed = stream.get_final_message()
    assert text == whole.content[1].text
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert streamed.stop_reason == "end_turn" and streamed.usage.output_tokens == whole.usage.output_tokens
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == len(prompt_of(body))


def test_a_tool_use_round_trip(scripted):
    model, client, url = scripted
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
    expect(model, body, CALL, CALL_TOKEN)
    reply = client.messages.create(model="scripted", max_tokens=200, thinking=THINKING, **body)
    assert [b.type for b in reply.content] == ["thinking", "tool_use"] and reply.stop_reason == "tool_use"
    use = reply.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")

    body["messages"] += [
        {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": '{"c": 21}'}]}
            ],
        },
    ]
    expect(model, body, "<|channel|>final<|message|>It is 21 °C in Paris.", RETURN)
    with client.messages.stream(model="scripted", max_tokens=200, **body) as stream:
        answer = stream.get_final_message()
    assert answer.content[0].text == "It is 21 °C in Paris." and answer.stop_reason == "end_turn"
    assert answer.usage.cache_read_input_tokens > 0  # the first turn's prompt came from the KV cache

    expect(model, {"messages": body["messages"][:1], "tools": [WEATHER]}, CALL, CALL_TOKEN)
    pairs = events_of(
        url, {"model": "m", "max_tokens": 200, "stream": True} | body | {"messages": body["messages"][:1]}
    )
    start = next(data for name, data in pairs if name == "content_block_start")
    assert start["content_block"] | {"id": ""} == {"type": "tool_use", "id": "", "name": "get_weather", "input": {}}
    deltas = [data["delta"] for name, data in pairs if name == "content_block_delta"]
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}
    assert pairs[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_arguments_that_are_not_a_json_object_never_break_the_answer():
    """The grammar engine keeps a constrained call's arguments a JSON object; should one still come out otherwise,
    its text goes to the client whole under one key, and back to the model as it wrote it."""
    assert tool_input('{"city": "Paris"}') == {"city": "Paris"} and tool_input("  ") == {}
    for text in ('{"city": Paris', '["Paris"]', "Paris"):
        assert tool_input(text) == {UNPARSED: text}
    call = {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {UNPARSED: '{"city": Paris'}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "bad", "is_error": True}
    again = [*HI, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]
    conversation = parse_messages({"model": "m", "max_tokens": 9, "messages": again}, "m").conversation
    assert conversation.messages[-2].content == '{"city": Paris'  # the model's own text goes back as it wrote it
    assert conversation.messages[-1].content == "Error: bad"


def test_stop_sequences_end_the_text_and_are_named(scripted):
    model, client, _ = scripted
    text = "<|channel|>final<|message|>one two three four five"
    expect(model, {"messages": HI}, text, RETURN)
    reply = client.messages.create(model="scripted", max_tokens=100, messages=HI, stop_sequences=["four", "three"])
    assert reply.content[0].text == "one two " and reply.stop_reason == "stop_sequence"
    assert reply.stop_sequence == "three"
    expect(model, {"messages": HI}, text, RETURN)
    with client.messages.stream(model="scripted", max_tokens=100, messages=HI, stop_sequences=["thr"]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == "one two " and streamed.stop_sequence == "thr"


def test_max_tokens_ends_the_turn(scripted):
    model, client, _ = scripted
    expect(model, {"messages": HI}, "<|channel|>final<|message|>" + "word " * 50, RETURN)
    reply = client.messages.create(model="scripted", max_tokens=8, messages=HI)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 8


def test_count_tokens_is_the_prompt_the_engine_renders(scripted):
    model, client, _ = scripted
    body = {"messages": HI, "system": [{"type": "text", "text": "Be kind."}], "tools": [WEATHER]}
    counted = client.messages.count_tokens(model="anything", **body)
    assert counted.input_tokens == len(prompt_of(body)) > 20
    assert model.forward_calls == 0  # counting generates nothing


def test_the_api_key_may_come_as_x_api_key_or_bearer():
    model = ScriptedModel()
    with serving(Server(Engine(model, context_length=4096), "scripted", api_key="s3cret")) as url:
        for client in (
            anthropic.Anthropic(base_url=url, api_key="s3cret", max_retries=0),  # x-api-key
            anthropic.Anthropic(base_url=url, auth_token="s3cret", max_retries=0),  # Authorization: Bearer
        ):
            expect(model, {"messages": HI}, ANSWER, RETURN)
            assert client.messages.create(model="scripted", max_tokens=50, messages=HI).content[0].text
        wrong = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError, match="Incorrect or missing API key") as refused:
            wrong.messages.create(model="scripted", max_tokens=50, messages=HI)
        assert refused.value.body["error"]["type"] == "authentication_error"
        assert httpx.head(url).status_code == 200  # Claude Code's check that the server is up needs no key
        openai_shape = httpx.get(f"{url}/v1/models", headers={"x-api-key": "wrong"}).json()
        assert openai_shape["error"]["code"] == "invalid_api_key"  # other routes keep OpenAI's shape


def test_errors_come_in_anthropics_shape(scripted):
    _, client, url = scripted
    with pytest.raises(anthropic.BadRequestError, match="'max_tokens' is required") as refused:
        client.post("/v1/messages", body={"model": "m", "messages": HI}, cast_to=httpx.Response)
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required"},
    }
    with pytest.raises(anthropic.BadRequestError, match=r"'messages\[0\].content\[0\].text' must be a string"):
        client.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]
        )
    with pytest.raises(anthropic.BadRequestError, match="'temperature' must be a number from 0 to 1"):
        client.messages.create(model="m", max_tokens=5, messages=HI, extra_body={"temperature": 1.5})
    with pytest.raises(anthropic.NotFoundError):
        client.get("/v1/messages/nowhere", cast_to=httpx.Response)
    plain = httpx.post(f"{url}/v1/messages", content="{}", headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["type"] == "invalid_request_error"
    head = "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, body, _ = exchange(url, f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n")  # and no body
    assert status == 413 and body["error"]["type"] == "request_too_large" and "16 MB" in body["error"]["message"]
    broken = httpx.post(f"{url}/v1/messages", content="{", headers={"content-type": "application/json"})
    assert broken.json()["type"] == "error" and "not valid JSON" in broken.json()["error"]["message"]


def test_an_error_after_the_stream_began_is_an_error_event():
    class Failing(ScriptedModel):
        def forward(self, token_ids, cache, last_only: bool = False):
            raise RuntimeError("the accelerator fell over")

    body = {"model": "m", "max_tokens": 5, "messages": HI, "stream": True}
    with serving(Server(Engine(Failing()), "failing")) as url:
        pairs = events_of(url, body)
    assert [name for name, _ in pairs] == ["message_start", "ping", "error"]
    assert pairs[-1][1]["error"]["type"] == "api_error" and "fell over" in pairs[-1][1]["error"]["message"]


def test_hosted_tools_are_left_out_with_a_warning_and_the_clients_own_declared(scripted):
    model, client, _ = scripted
    tools = [WEATHER, {"type": "web_search_20250305", "name": "web_search"}, {"type": "bash_20250124", "name": "bash"}]
    tools += [{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}]
    parsed = parse_messages({"model": "m", "max_tokens": 5, "messages": HI, "tools": tools}, "m")
    assert [t.name for t in parsed.conversation.tools] == ["get_weather", "bash", "str_replace_based_edit_tool"]
    assert parsed.conversation.tools[1].parameters["properties"]["command"]["type"] == "string"
    assert parsed.constraints.calls["functions.bash"].param == "tools[2].input_schema"
    assert len(parsed.warnings) == 1
    assert "web_search" in parsed.warnings[0] and "left out" in parsed.warnings[0]
    assert parsed.constraints.calls["functions.get_weather"].param == "tools[0].input_schema"
    expect(model, {"messages": HI, "tools": tools}, ANSWER, RETURN)
    raw = client.messages.with_raw_response.create(model="scripted", max_tokens=100, messages=HI, tools=tools)
    assert "web_search" in raw.headers[WARNING_HEADER]


def test_tool_choice_becomes_constraints():
    def parsed(choice):
        return parse_messages(
            {"model": "m", "max_tokens": 5, "messages": HI, "tools": [WEATHER], "tool_choice": choice}, "m"
        )

    assert not parsed({"type": "auto"}).constraints.must_call
    assert parsed({"type": "any"}).constraints.must_call == {"functions.get_weather"}
    forced = parsed({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    assert forced.constraints.must_call == {"functions.get_weather"}
    assert forced.constraints.calls["functions.get_weather"].strict is False
    assert parsed({"type": "none"}).conversation.tools == [] and not parsed({"type": "none"}).constraints


@pytest.mark.parametrize(
    ("thinking", "effort", "expected"),
    [
        (None, None, ("hidden", "medium")),
        ({"type": "disabled"}, None, ("hidden", "low")),
        ({"type": "enabled", "budget_tokens": 1024}, None, ("shown", "low")),
        ({"type": "enabled", "budget_tokens": 8000}, None, ("shown", "medium")),
        ({"type": "enabled", "budget_tokens": 31999}, None, ("shown", "high")),
        ({"type": "adaptive"}, None, ("shown", "medium")),
        ({"type": "adaptive", "display": "omitted"}, "max", ("omitted", "high")),
        (None, "low", ("hidden", "low")),
    ],
)
def test_thinking_maps_to_the_reasoning_effort(thinking, effort, expected):
    body = {"model": "m", "max_tokens": 5, "messages": HI, "thinking": thinking, "output_config": {"effort": effort}}
    parsed = parse_messages(body, "m")
    assert (parsed.thinking, parsed.conversation.reasoning_effort) == expected


ASSISTANT_CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": "9"}, "max_tokens"),
        ({"model": 5}, "model"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*HI, {"role": "system", "content": 5}]}, "messages[1].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
        ({"system": 5}, "system"),
        ({"system": [{"type": "image"}]}, "system[0]"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 2}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"stop_sequences": "x"}, "stop_sequences"),
        ({"stop_sequences": ["a"] * 5}, "stop_sequences"),
        ({"metadata": 5}, "metadata"),
        ({"thinking": {"type": "enabled"}}, "thinking"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"thinking": 5}, "thinking"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": {"format": {"type": "regex"}}}, "output_config.format"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f g", "input_schema": {"type": "object"}}]}, "tools[0]"),
        ({"tools": [{"name": "f", "input_schema": {}, "strict": "yes"}]}, "tools[0].strict"),
        ({"tools": [5]}, "tools[0]"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": {"type": "maybe"}}, "tool_choice.type"),
        ({"messages": [*HI, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "input": {}}]}]}, None),
        ({"messages": [*HI, ASSISTANT_CALL | {"content": [{"type": "tool_use", "id": "t", "name": "f"}]}]}, None),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]}, None),
        ({"messages": [*HI, ASSISTANT_CALL, {"role": "user", "content": [{"type": "tool_result"}]}]}, None),
        (
            {
                "messages": [
                    *HI,
                    ASSISTANT_CALL,
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": 1}]},
                ]
            },
            "messages[2].content[0].is_error",
        ),
        ({"messages": [*HI, {"role": "assistant", "content": [{"type": "thinking", "thinking": 5}]}]}, None),
        (
            {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_fields_of_the_wrong_type_are_named(fields, param):
    body = {"model": "m", "max_tokens": 5, "messages": HI} | fields
    with pytest.raises(ApiError) as refused:
        parse_messages(body, "m")
    assert refused.value.status == 400
    if param is not None:
        assert refused.value.param == param
    else:  # the param is a message's block; the message names it
        assert refused.value.param and "messages[" in refused.value.message


def test_images_documents_and_thinking_sent_back_are_read():
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "An image I cannot see.", "signature": "anything"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "I read text only."},
                ],
            },
            {"role": "user", "content": [{"type": "document", "source": {}}, {"type": "text", "text": "And this?"}]},
        ],
    }
    messages = parse_messages(body, "m").conversation.messages
    assert [m.channel for m in messages] == [None, "analysis", "final", None]
    assert "image" in messages[0].content and messages[0].content.endswith("What is this?")
    assert messages[1].content == "An image I cannot see." and "document" in messages[3].content


def test_system_messages_amid_the_conversation_are_said_where_they_are():
    """Claude Code sends `{"role": "system"}` messages after the first user message (the SDK's MessageParam has
    them): the first one before any other is an instruction, later ones are read where they come."""
    body = {
        "model": "m",
        "max_tokens": 5,
        "system": "Be brief.",
        "messages": [*HI, {"role": "system", "content": [{"type": "text", "text": "Agents: Explore."}]}],
    }
    conversation = parse_messages(body, "m").conversation
    assert conversation.instructions == "Be brief."
    assert [m.content for m in conversation.messages] == ["Hi", "Agents: Explore."]
    first = parse_messages(body | {"system": None, "messages": body["messages"][::-1]}, "m").conversation
    assert first.instructions == "Agents: Explore." and [m.content for m in first.messages] == ["Hi"]


def test_a_full_queue_is_anthropics_overloaded_error():
    """Busy is Anthropic's 529 (overloaded_error), which its clients and Claude Code retry, not OpenAI's 429."""
    model = ScriptedModel(step_delay=0.05)
    model.expect([0] * 10_000, [])  # plays nothing: each answer runs until max_tokens
    body = {"model": "m", "max_tokens": 30, "messages": HI}
    with serving(Server(Engine(model), "scripted", max_waiting=0)) as url, ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/messages", json=body, timeout=60), range(3)))
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes and 529 in codes, codes
    busy = next(r for r in replies if r.status_code == 529).json()
    assert busy["type"] == "error" and busy["error"]["type"] == "overloaded_error"


def test_a_conversation_too_long_is_said_as_anthropic_says_it(scripted):
    """Claude Code reads "prompt is too long: N tokens > M maximum" to compact the conversation and go on."""
    _, client, _ = scripted
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="scripted", max_tokens=5, messages=long)
    message = refused.value.body["error"]["message"]
    assert re.match(r"prompt is too long: \d+ tokens > 4096 maximum \(This model's context holds 4096", message)


def test_the_model_list_reads_as_anthropics(scripted):
    _, client, url = scripted
    (card,) = client.models.list().data
    assert (card.id, card.type, card.display_name) == ("scripted", "model", "scripted")
    assert client.models.retrieve("scripted").id == "scripted"
    assert httpx.get(f"{url}/v1/models").json() == {  # without anthropic-version: OpenAI's list, as before
        "object": "list",
        "data": [{"id": "scripted", "object": "model", "created": 0, "owned_by": "mlx-oss"}],
    }


def test_blocks_of_kinds_this_server_cannot_use_are_left_out_with_a_warning():
    """A conversation begun with Claude holds hosted tools' blocks; a newer client may send kinds unknown here."""
    search = {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {"query": "x"}}
    found = {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            *HI,
            {"role": "assistant", "content": [search, found, {"type": "text", "text": "Found it."}]},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Thanks"}]},
        ],
    }
    parsed = parse_messages(body, "m")
    assert [m.content for m in parsed.conversation.messages] == ["Hi", "Found it.", "Thanks"]
    assert parsed.warnings == [
        "messages[1].content[0] (a 'server_tool_use' block) was left out",
        "messages[1].content[1] (a 'web_search_tool_result' block) was left out",
        "messages[2].content[0] (a 'video' block) was left out",
    ]

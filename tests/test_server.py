"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on 127.0.0.1.

Most tests run `python -m mlx_oss.serve` as a subprocess on the tiny synthetic model. Random weights never call a
tool, so the tool-call round trips run the same server (uvicorn, real sockets) in-process on a model that plays
a script of harmony tokens.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from harmony_helpers import ScriptedModel, harmony_tokens
from serving import free_port, serving, wait_until_up

openai = pytest.importorskip("openai")

import mlx_oss  # noqa: E402
from mlx_oss.api.chat_completions import parse_chat  # noqa: E402
from mlx_oss.api.conversation import same_model  # noqa: E402
from mlx_oss.api.fields import ApiError  # noqa: E402
from mlx_oss.api.responses import parse_responses  # noqa: E402
from mlx_oss.engine import AnswerDelta, Engine  # noqa: E402
from mlx_oss.harmony import Conversation, Message, render_prompt  # noqa: E402
from mlx_oss.intake import MAX_BODY_BYTES  # noqa: E402
from mlx_oss.render_limits import check_render_cost  # noqa: E402
from mlx_oss.serve import build_parser  # noqa: E402
from mlx_oss.server import MODEL_CHANGED, Server  # noqa: E402

CONTEXT = 1024

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def start_server(model_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_oss.serve", "--model", str(model_dir), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, proc)
    return proc, url


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint, "--context", str(CONTEXT), "--allow-host", "mybox.example")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(served) -> str:
    return httpx.get(f"{served}/v1/models").json()["data"][0]["id"]


def nested_tool(levels: int) -> dict:
    """A function tool whose parameters nest `levels` objects deep."""
    parameters: dict = {"type": "object"}
    for _ in range(levels - 1):
        parameters = {"type": "object", "properties": {"inner": parameters}}
    return {"type": "function", "function": {"name": "deep", "parameters": parameters}}


def exchange(url: str, head: str, chunks=()) -> tuple[int, dict, int]:
    """One request over a plain socket, for what an HTTP client will not send: (status, JSON body, body bytes
    sent). Sending stops as soon as the server answers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break  # answered before the whole body was sent
            s.sendall(chunk)
            sent += len(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head_part, _, body = data.partition(b"\r\n\r\n")
        lines = head_part.decode("latin-1").split("\r\n")
        length = int(next(line.split(":")[1] for line in lines if line.lower().startswith("content-length:")))
        while len(body) < length:
            body += s.recv(65536)
    return int(lines[0].split()[1]), json.loads(body), sent


def engine_answer(tiny_checkpoint, body: dict) -> tuple[str, list[int]]:
    """What the engine itself answers, greedily, to the conversation a request describes."""
    request = parse_chat(body, body["model"])
    prompt = render_prompt(request.conversation)
    engine = Engine(mlx_oss.load(tiny_checkpoint, backend="numpy"))
    events = list(engine.generate(prompt, request.sampling))
    return "".join(e.text for e in events if isinstance(e, AnswerDelta)), prompt


def test_a_plain_chat_is_the_engines_own_greedy_answer(client, model_id, tiny_checkpoint):
    assert [m.id for m in client.models.list()] == [model_id]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    reply = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=12)
    expected, prompt = engine_answer(
        tiny_checkpoint, {"model": model_id, "messages": messages, "temperature": 0, "max_tokens": 12}
    )
    choice = reply.choices[0]
    assert choice.message.content == expected != "" and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 12
    assert reply.model == model_id and reply.object == "chat.completion"


def test_a_streamed_chat_equals_the_plain_one(client, model_id):
    messages = [{"role": "user", "content": "Stream this"}]
    plain = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=messages,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices


def test_the_next_turn_reuses_the_cached_prefix(client, model_id):
    first = [{"role": "user", "content": "Remember the number 7."}]
    reply = client.chat.completions.create(model=model_id, messages=first, temperature=0, max_tokens=6)
    second = [
        *first,
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "Which number?"},
    ]
    again = client.chat.completions.create(model=model_id, messages=second, temperature=0, max_tokens=6)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert reply.usage.prompt_tokens - 3 <= cached < again.usage.prompt_tokens  # all but the assistant header


def test_stop_sequences_end_the_answer_before_them(client, model_id):
    messages = [{"role": "user", "content": "Say something long"}]
    full = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=20)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=model_id, messages=messages, temperature=0, max_tokens=20, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.find(stop)]


def test_the_responses_api(client, model_id):
    chat = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=8
    )
    response = client.responses.create(model=model_id, input="Hello", temperature=0, max_output_tokens=8)
    assert response.output_text == chat.choices[0].message.content
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 8 and response.usage.input_tokens == chat.usage.prompt_tokens
    stream = client.responses.create(model=model_id, input="Hello", temperature=0, max_output_tokens=8, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"  # cut by max_output_tokens
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == response.output_text


def test_a_client_that_leaves_cancels_its_generation(client, model_id):
    stream = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Go on forever"}], temperature=0, stream=True
    )  # no max_tokens: only the context (1024 tokens) would end it
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    started = time.monotonic()
    quick = client.with_options(timeout=30).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Next"}], max_tokens=2
    )
    assert quick.usage.completion_tokens == 2
    assert time.monotonic() - started < 30


def test_a_burst_of_concurrent_requests_is_answered(client, model_id):
    def ask(i: int):
        return client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": f"Request {i}"}], temperature=0, max_tokens=4
        )

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(ask, range(6)))
    assert all(r.usage.completion_tokens == 4 for r in replies)
    assert len({r.id for r in replies}) == 6


@pytest.mark.parametrize(
    ("body", "status", "fragment", "param"),
    [
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist", "model"),
        ("{not json", 400, "not valid JSON", None),
        ({"model": None, "messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required", "model"),
        (
            {"messages": [{"role": "tool", "tool_call_id": "x", "content": "{}"}]},
            400,
            "which no earlier",
            "messages[0]",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]},
            400,
            "must come before the conversation",
            "messages[1]",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            400,
            "must be a user or tool message",
            "messages",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            },
            400,
            "must be a JSON schema of type object",
            "tools[0].function",
        ),
        ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "larger --context (this model", "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "'temperature'", "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "'seed' must be an integer", "seed"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": 5}, 400, "'tools' must be a list", "tools"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": [1], "content": "x"}]},
            400,
            "must be a string",
            "messages[1].tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [], "tool_choice": {"function": "f"}},
            400,
            "'tool_choice' must be",
            "tool_choice",
        ),
        # JSON no parser should take whole, or that Python's parser refuses in its own ways
        ("[" * 200_000 + "]" * 200_000, 400, "the request body is not valid JSON: nested too deeply", None),
        (b'{"model": "\xff"}', 400, "the request body is not UTF-8 text (byte 11)", None),
        ('{"seed": ' + "9" * 5000 + "}", 400, "not valid JSON (Exceeds the limit (4300 digits)", None),
        ({"messages": [[]] * 600_000}, 400, "more than 1000000 JSON values", None),
        # more than any conversation that fits the context (1024 tokens: at most 256 messages of 4 tokens)
        ({"messages": [{"role": "user", "content": "hi"}] * 300}, 400, "holds 300 items; at most 256 fit", "messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER] * 300},
            400,
            "holds 300 items; at most 256 fit",
            "tools",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [nested_tool(70)]},
            400,
            "is nested more than 64 levels deep",
            "tools[0].function",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": "x" * 1001}, 400, "at most 1000 characters", "stop"),
        # the tokenizer takes time that grows with the square of a run without breaks (200,000 'a's: 15 s)
        ({"messages": [{"role": "user", "content": "a" * 20_001}]}, 400, "at most 20000 letters, symbols", None),
        ({"messages": [{"role": "user", "content": "hi" + " " * 20_001}]}, 400, "long runs of characters", None),
        ({"messages": [{"role": "user", "content": " " * 20_000}] * 6}, 400, "long runs of characters", None),
        # wrong types are refused, not taken for something else
        ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "'stream' must be true or", "stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "only n=1", "n"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}},
            400,
            "must be true or false, not a number",
            "stream_options.include_usage",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": 5}, 400, "an object", "stream_options"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            400,
            "must be a string, not a number",
            "messages[0].content[0].text",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello", "reasoning_content": ["thought"]},
                    {"role": "user", "content": "and?"},
                ]
            },
            400,
            "must be a string, not a list",
            "messages[1].reasoning_content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 5}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "{}"},
                ]
            },
            400,
            "must be a string of JSON",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"function": {"name": "f", "description": 5}}]},
            400,
            "must be a string",
            "tools[0].function.description",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400, "from 0 to 2**64 - 1", "seed"),
    ],
)
def test_bad_requests_get_openai_shaped_errors_and_the_server_goes_on(served, model_id, body, status, fragment, param):
    if isinstance(body, dict):
        body = json.dumps({"model": model_id} | body)
    reply = httpx.post(f"{served}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    ok = httpx.post(
        f"{served}/v1/chat/completions",
        json={"model": model_id, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


def test_the_model_answers_to_the_names_other_local_servers_give_it(client, model_id):
    assert same_model("gpt-oss-20b", "openai/gpt-oss-20b") and same_model("gpt-oss:20b", "openai/gpt-oss-20b")
    assert same_model("OpenAI/GPT-OSS-20B", "openai/gpt-oss-20b")
    assert not same_model("gpt-oss-120b", "openai/gpt-oss-20b") and not same_model("gpt-4o", "openai/gpt-oss-20b")
    reply = client.chat.completions.create(
        model=model_id.upper(), messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert reply.usage.completion_tokens == 1
    assert client.models.retrieve(model_id.upper()).id == model_id


def test_requests_a_web_page_could_forge_are_refused(served, model_id):
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    plain = httpx.post(f"{served}/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
    rebound = httpx.get(f"{served}/v1/models", headers={"host": "attacker.example:8080"})
    assert rebound.status_code == 403 and "attacker.example" in rebound.json()["error"]["message"]
    responses = httpx.post(
        f"{served}/v1/responses", json={"model": model_id, "input": "hi", "previous_response_id": "resp_1"}
    )
    assert responses.status_code == 400 and responses.json()["error"]["param"] == "previous_response_id"


def test_the_api_key_is_checked_on_every_request(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint, "--api-key", "s3cret")
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Incorrect or missing API key"):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert len(right.models.list().data) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--host", "0.0.0.0"],
            "--host 0.0.0.0 lets other computers reach the model: add --allow-remote and --api-key",
        ),
        (
            ["--host", "0.0.0.0", "--allow-remote"],
            "--host 0.0.0.0 with --allow-remote needs --api-key (or MLX_OSS_API_KEY)",
        ),
    ],
)
def test_listening_beyond_this_computer_needs_a_flag_and_a_key(tiny_checkpoint, flags, message):
    env = {k: v for k, v in os.environ.items() if k != "MLX_OSS_API_KEY"}
    cmd = [sys.executable, "-m", "mlx_oss.serve", "--model", str(tiny_checkpoint), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and out.stderr == f"python -m mlx_oss.serve: error: {message}\n"


# -- tool calls, on a scripted model ---------------------------------------------------------------------------


@pytest.fixture
def scripted():
    """(model, url): the real server app under uvicorn on 127.0.0.1, in this process, on a scripted model."""
    model = ScriptedModel(step_delay=0.0)
    with serving(Server(Engine(model), "scripted", max_waiting=1)) as url:
        yield model, url


CALL = (
    "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
)


def expect(model: ScriptedModel, body: dict, text: str, stop: int) -> None:
    model.expect(render_prompt(parse_chat(body, "scripted").conversation), [*harmony_tokens(text), stop])


def test_a_tool_call_round_trip(scripted):
    model, url = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expect(model, {"model": "scripted", "messages": messages, "tools": [WEATHER]}, CALL, 200012)
    reply = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "I need the weather."  # apart, never in the answer
    assert reply.usage.completion_tokens_details.reasoning_tokens == len(harmony_tokens("I need the weather."))
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump()],
            "reasoning_content": "I need the weather.",
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]
    expect(
        model,
        {"model": "scripted", "messages": messages, "tools": [WEATHER]},
        "<|channel|>final<|message|>It is 21 °C in Paris.",
        200002,
    )
    stream = client.chat.completions.create(
        model="scripted", messages=messages, tools=[WEATHER], temperature=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is 21 °C in Paris."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_streamed_tool_call(scripted):
    model, url = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expect(model, {"model": "scripted", "messages": messages, "tools": [WEATHER]}, CALL, 200012)
    chunks = [
        c
        for c in client.chat.completions.create(
            model="scripted", messages=messages, tools=[WEATHER], temperature=0, stream=True
        )
        if c.choices
    ]
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert reasoning == "I need the weather." and not any(c.choices[0].delta.content for c in chunks)
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == [
        (0, "get_weather", '{"city": "Paris"}')
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_function_call_round_trip_in_the_responses_api(scripted):
    model, url = scripted
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    tool = {"type": "function", **WEATHER["function"]}
    chat_view = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
    }
    expect(model, chat_view, CALL, 200012)  # the same conversation, so the same prompt
    response = client.responses.create(model="scripted", input="Weather in Paris?", tools=[tool], temperature=0)
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "function_call"]
    call = response.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    follow_up = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'},
    ]
    chat_view["messages"] += [
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": '{"celsius": 21}'},
    ]
    expect(model, chat_view, "<|channel|>final<|message|>21 °C.", 200002)
    answer = client.responses.create(model="scripted", input=follow_up, tools=[tool], temperature=0)
    assert answer.output_text == "21 °C." and answer.status == "completed"


def test_a_full_queue_is_told_to_come_back(scripted):
    model, url = scripted
    model.step_delay = 0.05
    model.expect([0] * 10_000, [])  # plays nothing: each answer runs until max_tokens
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60), range(4)))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 2 and 429 in codes  # one running, one waiting, the rest refused
    busy = next(r for r in replies if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "busy" in busy["message"]
    assert np.all([r.json()["usage"]["completion_tokens"] == 40 for r in replies if r.status_code == 200])


# -- what a hostile or broken client can do -------------------------------------------------------------------


def test_only_names_of_this_computer_or_allowed_ones_are_answered_without_a_key(served):
    answered = ["127.0.0.1", "127.0.0.1:8080", "LocalHost", "localhost:1", "127.8.9.10", "[::1]", "[::1]:8080"]
    answered += ["mybox.example", "MyBox.Example:8080"]  # --allow-host mybox.example
    refused = ["127.0.0.1.evil.example", "127.0.0.1.evil.example:8080", "localhost.evil.example", "127.1"]
    refused += ["::1", "[::1]evil", "[127.0.0.1]", "127.0.0.1:x", "mybox.example.evil.example", "attacker.example"]
    for host in answered + refused:
        reply = httpx.get(f"{served}/v1/models", headers={"host": host})
        assert reply.status_code == (200 if host in answered else 403), host
        if host in refused:
            assert "--allow-host NAME" in reply.json()["error"]["message"]
    assert "--allow-host NAME" in build_parser().format_help()


def test_a_body_over_the_limit_is_refused_before_it_is_read(served, model_id):
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, body, _ = exchange(served, f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n")  # and no body
    assert status == 413 and body["error"]["code"] == "request_too_large" and "16 MB" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    chunk = b'"' + b"x" * (2**20 - 2) + b'"'
    offered = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 64 + [b"0\r\n\r\n"]  # 64 MB, its length not told
    status, body, sent = exchange(served, f"{head}Transfer-Encoding: chunked\r\n\r\n", offered)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Refused while it streamed in: what the client got through is the limit plus what loopback's socket buffers
    # took meanwhile (they grow to several MB each side, and more went in on a loaded machine), far from all 64 MB.
    assert sent < MAX_BODY_BYTES + 16 * 2**20


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}] * 300_000,  # 9 MB
        [{"role": "user", "content": "word " * 3_000_000}],  # 15 MB: it was tokenized whole, holding the lock 3 s
    ],
)
def test_while_a_huge_request_is_refused_the_server_answers_others(served, model_id, messages):
    body = json.dumps({"model": model_id, "messages": messages})
    replies = []
    sender = threading.Thread(
        target=lambda: replies.append(
            httpx.post(
                f"{served}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=300
            )
        )
    )
    sender.start()
    waits = []
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{served}/health", timeout=300).status_code == 200
        waits.append(time.monotonic() - started)
        time.sleep(0.01)
    sender.join()
    (reply,) = replies
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert max(waits) < 1.0, waits  # the server took 30 s and 5 GB over such a request, deaf meanwhile


REPO = Path(__file__).resolve().parents[1]
READ_FILE = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "The text of a file in the project.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
}


def long_agent_session(tokens: int) -> list[dict]:
    """Messages of at least `tokens` tokens (their texts' own), as a coding agent's long session sends them: the
    user's questions and the assistant's replies in prose (paragraphs of README.md), and between them read_file
    calls whose outputs are this project's Python sources."""
    from mlx_oss.harmony import encode_text

    paragraphs = [p for p in (REPO / "README.md").read_text().split("\n\n") if len(p) > 200]
    sources = sorted((REPO / "mlx_oss").rglob("*.py"))
    messages: list[dict] = [{"role": "system", "content": "You are a coding agent working in this repository."}]
    counted = turn = 0
    while counted < tokens:
        question, reply = paragraphs[turn % len(paragraphs)], paragraphs[(turn + 7) % len(paragraphs)]
        path = sources[turn % len(sources)].relative_to(REPO).as_posix()
        call = {"id": f"call_{turn}", "type": "function", "function": {"name": "read_file", "arguments": ""}}
        call["function"]["arguments"] = json.dumps({"path": path})
        output = (REPO / path).read_text()[:12_000]  # agents cut long files
        messages += [
            {"role": "user", "content": f"About this part of the README:\n\n{question}\n\nWhere is it done?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": output},
            {"role": "assistant", "content": reply},
        ]
        counted += sum(len(encode_text(text)) for text in (question, call["function"]["arguments"], output, reply))
        turn += 1
    return [*messages, {"role": "user", "content": "Thanks. Now sum up what we found."}]


def test_a_conversation_the_size_of_the_context_passes_every_limit_but_the_context():
    """The body, value, item, nesting and tokenizer-time limits leave room for any conversation that fits 131072
    tokens: one a little longer is refused for its length alone, before the model runs."""
    model = ScriptedModel()  # gpt-oss's 131072 positions; it never runs here
    messages = long_agent_session(133_000)
    body = json.dumps({"model": "scripted", "messages": messages, "tools": [READ_FILE]}).encode()
    with serving(Server(Engine(model), "scripted")) as url:
        reply = httpx.post(
            f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=120
        )
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["code"] == "context_length_exceeded", reply.text
    assert error["message"].startswith("This model's context holds 131072 tokens, but the conversation is ")
    assert model.forward_calls == 0
    assert len(messages) > 200 and len(body) < MAX_BODY_BYTES / 8  # a long session, far from the body limit


def test_refusals_and_clients_that_leave_write_no_traceback(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint, "--context", str(CONTEXT))
    try:
        model_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        json_header = {"content-type": "application/json"}
        hi = [{"role": "user", "content": "hi"}]
        for body in [
            "{not json",
            "[" * 200_000 + "]" * 200_000,
            json.dumps({"model": "gpt-4o", "messages": hi}),
            json.dumps({"model": model_id, "messages": hi, "tools": [nested_tool(100)]}),
            json.dumps({"model": model_id, "messages": [{"role": "user", "content": "\ud800"}]}),
        ]:
            reply = httpx.post(f"{url}/v1/chat/completions", content=body, headers=json_header)
            assert 400 <= reply.status_code < 500, reply.text
        assert httpx.get(f"{url}/v1/models", headers={"host": "evil.example"}).status_code == 403
        assert httpx.get(f"{url}/nowhere").status_code == 404
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        assert exchange(url, f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n")[0] == 413
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:  # leaves mid-body
            s.sendall(f'{head}Content-Length: 1000\r\n\r\n{{"model": '.encode())
            time.sleep(0.3)
        stream = {"model": model_id, "messages": hi, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=stream) as reply:  # leaves mid-answer
            for i, _ in enumerate(reply.iter_lines()):
                if i == 4:
                    break
        with pytest.raises(httpx.TimeoutException):  # leaves before the answer
            httpx.post(f"{url}/v1/chat/completions", json={"model": model_id, "messages": hi}, timeout=0.5)
        ok = httpx.post(f"{url}/v1/chat/completions", json={"model": model_id, "messages": hi, "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        proc.terminate()
        _, log = proc.communicate(timeout=30)
    assert "Traceback" not in log and "ERROR" not in log, log


class FailingModel(ScriptedModel):
    def forward(self, token_ids, cache, last_only: bool = False):
        raise RuntimeError("the accelerator fell over")


def test_a_server_error_is_one_line_in_the_log(caplog, capfd):
    body = {"model": "failing", "messages": [{"role": "user", "content": "hi"}]}
    with serving(Server(Engine(FailingModel()), "failing")) as url, caplog.at_level(logging.ERROR):
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        streamed = httpx.post(f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=60)
    error = reply.json()["error"]
    assert reply.status_code == 500 and error["code"] == "server_error" and "fell over" in error["message"]
    assert '"code": "server_error"' in streamed.text  # the stream had begun: the error is its last event
    records = [r for r in caplog.records if r.name == "mlx_oss.server"]
    assert [r.getMessage() for r in records] == [
        "POST /v1/chat/completions failed: RuntimeError: the accelerator fell over",
        "POST /v1/chat/completions (streaming) failed: RuntimeError: the accelerator fell over",
    ]
    assert all(r.levelno == logging.ERROR and r.exc_info is None for r in records)
    assert "Traceback" not in capfd.readouterr().err


def test_a_model_file_changed_while_serving_is_the_servers_error_said_once(tiny_checkpoint, tmp_path):
    """A shard cut short under a running server: every request was a 400 invalid_request_error (the client blamed),
    nothing was logged, /health said ok, and the SIGTERM that ended the server was reported as a bus error."""
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    proc, url = start_server(model_dir, "--backend", "numpy", "--context", str(CONTEXT))
    try:
        body = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 200
        shard = sorted(model_dir.glob("*.safetensors"))[0]
        size = shard.stat().st_size
        with open(shard, "r+b") as f:
            f.truncate(4096)
        message = f"{shard}: changed on disk since it was loaded (was {size} bytes, now 4096); load the model again"
        for extra in ({}, {}, {"stream": True}):  # the request that meets the change, then those refused at once
            reply = httpx.post(f"{url}/v1/chat/completions", json=body | extra, timeout=120)
            assert reply.status_code == 503, reply.text
            assert reply.json() == {
                "error": {"message": message, "type": "server_error", "param": None, "code": "model_unavailable"}
            }
        anthropic = httpx.post(f"{url}/v1/messages", json=body, timeout=120)
        assert anthropic.status_code == 503 and anthropic.json()["error"] == {"type": "api_error", "message": message}
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json() == {"status": "unavailable", "reason": MODEL_CHANGED}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Traceback" not in log, log
    said = [line for line in log.splitlines() if "changed on disk" in line]  # once, and no "bus error" at the end
    assert said == [f"ERROR:    the model cannot answer until the server is restarted: {message}"], log


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--port", "70000"], "argument --port: 70000 is not a port (1 to 65535)"),
        (["--port", "0"], "argument --port: 0 is not a port (1 to 65535)"),
        (["--context", "-5"], "argument --context: -5 is not a context length (1 or more tokens, or auto)"),
        # 0 once meant the model's 131072
        (["--context", "0"], "argument --context: 0 is not a context length (1 or more tokens, or auto)"),
        (["--max-waiting", "-1"], "argument --max-waiting: -1 is below 0"),  # it refused every request
        (
            ["--allow-host", "box:80"],
            "argument --allow-host: 'box:80' is not a host name (give it without port or scheme)",
        ),
    ],
)
def test_serve_options_out_of_range_are_one_line(flags, complaint, capsys):
    with pytest.raises(SystemExit) as leaving:
        build_parser().parse_args(["--model", "some/model", *flags])
    assert leaving.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m mlx_oss.serve: error: {complaint}"


RESPONSE_CALL = [
    {"role": "user", "content": "hi"},
    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"reasoning": 5}, "reasoning"),  # was taken as medium
        ({"reasoning": {"effort": 5}}, "reasoning.effort"),
        ({"stream": "yes"}, "stream"),  # was taken as true
        ({"stream": 1}, "stream"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format.schema"),  # a schema format without its schema
        ({"text": 5}, "text"),
        ({"instructions": 5}, "instructions"),
        ({"input": [{"type": "reasoning", "content": ["x"]}, {"role": "user", "content": "hi"}]}, "input[0].content"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]}, "input[0].arguments"),
        ({"input": [*RESPONSE_CALL, {"type": "function_call_output", "call_id": "c", "output": 5}]}, "input[2].output"),
        ({"tools": [{"type": "function", "name": "f", "description": 5}]}, "tools[0].description"),
        ({"max_output_tokens": True}, "max_output_tokens"),
        ({"temperature": "1"}, "temperature"),
        ({"tool_choice": 5}, "tool_choice"),
        ({"input": [{"role": "user", "content": "hi"}] * 257}, "input"),
    ],
)
def test_responses_fields_of_the_wrong_type_are_refused(fields, param):
    with pytest.raises(ApiError) as refused:
        parse_responses({"model": "m", "input": "hi"} | fields, "m", max_items=256)
    assert refused.value.status == 400 and refused.value.param == param


def test_runs_the_tokenizer_would_take_whole_are_refused_and_others_not():
    """One run over 20,000 characters, or long runs whose squared lengths sum past the budget (about a second of
    tokenizing), are refused; runs agents really send (separator lines, indentation, base64) are not."""

    def cost(*texts: str) -> None:
        check_render_cost(Conversation([Message.user(text) for text in texts]), 131072)

    separators = ("=" * 300 + "\n" + "x = 1\n") * 500  # a wide terminal's test log
    fine = ["a" * 20_000, "-" * 20_000, " " * 20_000, "\n" * 20_000, ("\u4e00" * 100 + "\uff0c") * 30, separators]
    fine += ["caf\u00e9 " * 20_000, "\u00e9" + "_" * 20_000, ("-" * 5000 + "x ") * 79]
    for text in fine:
        cost(text)
    cost(*[" " * 20_000] * 4)  # 1.6e9 of the 2e9 budget
    refused = ["a" * 20_001, "-" * 20_001, "\n" * 20_001, "\u4e00" * 20_001, "a\u0301" * 10_001, "!\x1c" * 10_001]
    refused += ["x" * 16_000 + "a" * 20_001, "\u00e9" + "_" * 20_001, "!" + "/\n" * 10_001]  # across pieces
    refused += [("-" * 5000 + "x ") * 81]  # many long runs: 81 * 5000**2 > 2e9
    for text in refused:
        with pytest.raises(ApiError, match="long runs of characters"):
            cost(text)
    with pytest.raises(ApiError, match="long runs of characters"):
        cost(*[" " * 20_000] * 6)  # across messages too


def test_at_most_two_requests_are_parsed_at_once(monkeypatch):
    """Each parse may hold a few hundred MB of objects: the rest wait their turn."""
    import mlx_oss.server

    running, most, lock = 0, 0, threading.Lock()
    parse_body = mlx_oss.server.parse_body

    def slow_parse(body: bytes):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return parse_body(body)

    monkeypatch.setattr(mlx_oss.server, "parse_body", slow_parse)
    body = {"model": "other", "messages": [{"role": "user", "content": "hi"}]}
    with serving(Server(Engine(ScriptedModel()), "scripted")) as url, ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60), range(6)))
    assert [r.status_code for r in replies] == [404] * 6
    assert most == 2

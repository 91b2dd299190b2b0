"""The server's hosted tools (issue 18): with --tools, a Responses request's code_interpreter and web_search run as
gpt-oss's built-in python and browser, server-side, through the agent loop, and come back as OpenAI's
code_interpreter_call / web_search_call items and streaming events, which the openai SDK parses. The model is
prompt-scripted; python is a fake (its real kernel is tested in its own file), the browser fake and real (against
pages served on 127.0.0.1)."""

from __future__ import annotations

import argparse
import http.server
import json
import threading

import httpx
import pytest
from harmony_helpers import PromptScriptedModel
from serving import serving

openai = pytest.importorskip("openai")

from mlx_oss import serve  # noqa: E402
from mlx_oss.agent import ToolStarted  # noqa: E402
from mlx_oss.api.fields import ApiError  # noqa: E402
from mlx_oss.api.responses import ResponseEvents, parse_responses  # noqa: E402
from mlx_oss.engine import Engine  # noqa: E402
from mlx_oss.errors import MlxOssError  # noqa: E402
from mlx_oss.generation_queue import Turn  # noqa: E402
from mlx_oss.harmony import encoding, render_prompt  # noqa: E402
from mlx_oss.server import WARNING_HEADER, Server  # noqa: E402
from mlx_oss.tools import Citation, ToolOutput, ToolSettings  # noqa: E402
from mlx_oss.tools.browser import BrowserTool  # noqa: E402
from mlx_oss.tools.python import PythonTool  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
PYTHON_RESULT = "<|start|>python to=assistant"
SEARCH_RESULT = "<|start|>browser.search to=assistant"
OPEN_RESULT = "<|start|>browser.open to=assistant"
ANSWER = "Paris is the capital of France【1†L2-L3】."


class FakePython:
    """python that prints 42 and draws a picture, whatever the code."""

    name = "python"

    def __init__(self, picture):
        self.picture, self.ran = picture, []

    def unavailable(self):
        return None

    def run(self, recipient, content, cancel):
        self.ran.append(content)
        return ToolOutput("42\n", display="42\n", files=(self.picture,))

    def close(self):
        pass


class FakeBrowser:
    """browser whose search finds one page and whose open opens it as cursor 1."""

    name = "browser"

    def __init__(self, settings=None):
        self.ran = []

    def unavailable(self):
        return None

    def run(self, recipient, content, cancel):
        self.ran.append((recipient, json.loads(content)))
        if recipient == "browser.search":
            return ToolOutput(
                "[0] Paris (example.org)",
                citations=(Citation(0, "https://example.org/search?q=capital", "Search results"),),
            )
        return ToolOutput(
            "L2: Paris is the capital of France.",
            citations=(Citation(1, "https://example.org/paris", "Paris"),),
        )

    def close(self):
        pass


def served(model, tools=None):
    return serving(Server(Engine(model), "gpt-oss-20b", tools=tools))


def python_turn(prompt: str) -> str:
    if PYTHON_RESULT in prompt:
        return (
            "<|channel|>analysis<|message|>It printed 42.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>6 times 7 is 42.<|return|>"
        )
    return (
        "<|channel|>analysis<|message|>Let me compute.<|end|><|start|>assistant<|channel|>analysis to=python code"
        "<|message|>print(6*7)<|call|>"
    )


def browser_turn(prompt: str) -> str:
    if OPEN_RESULT in prompt:
        return f"<|channel|>final<|message|>{ANSWER}<|return|>"
    if SEARCH_RESULT in prompt:
        return '<|channel|>analysis to=browser.open code<|message|>{"id": 0, "cursor": 0}<|call|>'
    return '<|channel|>analysis to=browser.search code<|message|>{"query": "capital of France"}<|call|>'


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(PNG)
    return path


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


CODE_INTERPRETER = [{"type": "code_interpreter", "container": {"type": "auto"}}]


# -- code_interpreter -------------------------------------------------------------------------------------------


def test_code_interpreter_runs_python_and_answers_in_openai_s_items(picture):
    model, python = PromptScriptedModel(python_turn), FakePython(picture)
    with served(model, {"python": python}) as url:
        reply = client(url).responses.create(model="gpt-oss-20b", input="What is 6*7?", tools=CODE_INTERPRETER)
    assert python.ran == ["print(6*7)"]
    assert [item.type for item in reply.output] == ["reasoning", "code_interpreter_call", "reasoning", "message"]
    call = reply.output[1]
    assert isinstance(call, openai.types.responses.ResponseCodeInterpreterToolCall)
    assert (call.status, call.code, call.container_id) == ("completed", "print(6*7)", "cntr_mlx_oss")
    assert call.outputs[0].type == "logs" and call.outputs[0].logs == "42\n"
    assert call.outputs[1].type == "image" and call.outputs[1].url.startswith("data:image/png;base64,")
    assert reply.output_text == "6 times 7 is 42."
    assert reply.status == "completed" and reply.tools[0].type == "code_interpreter"
    # the model was told about python, and read its result
    assert "## python" in model.prompts[0] and PYTHON_RESULT in model.prompts[-1]
    # usage is the whole turn's: both steps' tokens
    assert reply.usage.input_tokens > len(encoding().encode(model.prompts[-1], allowed_special="all"))


def test_code_interpreter_streams_openai_s_events(picture):
    model = PromptScriptedModel(python_turn)
    with served(model, {"python": FakePython(picture)}) as url:
        events = list(
            client(url).responses.create(model="gpt-oss-20b", input="6*7?", tools=CODE_INTERPRETER, stream=True)
        )
    kinds = [e.type for e in events]
    start = kinds.index("response.code_interpreter_call.in_progress")
    assert kinds[start - 1 : start + 6] == [
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    # every event is one of the SDK's types, numbered in order
    assert all(type(e).__module__.startswith("openai.types.responses") for e in events)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, done = events[start - 1].item, events[start + 5].item
    assert (added.status, added.code, done.status, done.code) == ("in_progress", "", "completed", "print(6*7)")
    assert events[start + 1].delta == "print(6*7)" and events[start + 2].code == "print(6*7)"
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "6 times 7 is 42."
    assert [item.type for item in final.output] == ["reasoning", "code_interpreter_call", "reasoning", "message"]
    assert len({item.id for item in final.output}) == 4


def test_the_real_python_keeps_its_variables_from_one_request_to_the_next(tmp_path):
    """One kernel for the server: a later request (a later turn of the conversation) finds what an earlier one left."""
    python = PythonTool(ToolSettings(enabled=("python",), work_dir=tmp_path), tmp_path)
    if python.unavailable():
        pytest.skip(f"the python tool cannot run here: {python.unavailable()}")

    def turn(prompt: str) -> str:
        if PYTHON_RESULT in prompt:
            return "<|channel|>final<|message|>Done.<|return|>"
        code = "print(x + 1)" if "again" in prompt else "x = 6 * 7\nprint(x)"
        return f"<|channel|>analysis to=python code<|message|>{code}<|call|>"

    try:
        with served(PromptScriptedModel(turn), {"python": python}) as url:
            first = client(url).responses.create(model="gpt-oss-20b", input="compute", tools=CODE_INTERPRETER)
            second = client(url).responses.create(model="gpt-oss-20b", input="again", tools=CODE_INTERPRETER)
    finally:
        python.close()
    assert first.output[0].outputs[0].logs.strip() == "42"
    assert second.output[0].outputs[0].logs.strip() == "43"


def test_python_runs_beside_function_tools_held_to_their_grammar(picture):
    """With function tools the turn is held to a grammar; the built-in call stays allowed, then the function's."""

    def turn(prompt: str) -> str:
        if PYTHON_RESULT in prompt:
            return '<|channel|>commentary to=functions.save <|constrain|>json<|message|>{"value": 42}<|call|>'
        return "<|channel|>analysis to=python code<|message|>print(6*7)<|call|>"

    save = {
        "type": "function",
        "name": "save",
        "parameters": {
            "type": "object",
            "properties": {"value": {"type": "integer"}},
            "required": ["value"],
            "additionalProperties": False,
        },
    }
    model = PromptScriptedModel(turn)
    with served(model, {"python": FakePython(picture)}) as url:
        reply = client(url).responses.create(model="gpt-oss-20b", input="Save 6*7", tools=[*CODE_INTERPRETER, save])
    assert [item.type for item in reply.output] == ["code_interpreter_call", "function_call"]
    assert (reply.output[1].name, reply.output[1].arguments) == ("save", '{"value": 42}')
    parsed = parse_responses(
        {"model": "m", "input": "x", "tools": [*CODE_INTERPRETER, save]}, "m", runs=frozenset({"python", "browser"})
    )
    assert parsed.constraints.builtin == {"python"} and set(parsed.constraints.calls) == {"functions.save"}


def test_a_failed_call_a_cancelled_one_and_the_step_limit(picture):
    class Failing(FakePython):
        def run(self, recipient, content, cancel):
            return ToolOutput("Traceback: ZeroDivisionError", error=True)

    def again(prompt: str) -> str:  # calls python whatever it read
        return "<|channel|>analysis to=python code<|message|>1/0<|call|>"

    model = PromptScriptedModel(again)
    with served(model, {"python": Failing(picture)}) as url:
        reply = client(url).responses.create(model="gpt-oss-20b", input="x", tools=CODE_INTERPRETER, max_tool_calls=2)
    assert [item.status for item in reply.output] == ["failed"] * 4  # two run, one told the limit, one ends it
    assert reply.output[0].outputs[0].logs == "Traceback: ZeroDivisionError"
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_tool_calls"
    # a call under way when the turn stops (a client that left) closes as incomplete
    parsed = parse_responses({"model": "m", "input": "x", "tools": CODE_INTERPRETER}, "m", runs=frozenset({"python"}))
    events = ResponseEvents("resp_1", "m", parsed)
    events.piece(ToolStarted("python", "while True: pass"), Turn())
    closed = events.close_tool()
    assert json.loads(closed[-1].split("data: ", 1)[1])["item"]["status"] == "incomplete"
    assert events.items[0]["code"] == "while True: pass"


# -- web_search -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["web_search", "web_search_preview"])
def test_web_search_runs_the_browser_with_citations(kind):
    model, browser = PromptScriptedModel(browser_turn), FakeBrowser()
    with served(model, {"browser": browser}) as url:
        reply = client(url).responses.create(
            model="gpt-oss-20b",
            input="Capital of France?",
            tools=[{"type": kind}],
            include=["web_search_call.action.sources"],
        )
    assert [r for r, _ in browser.ran] == ["browser.search", "browser.open"]
    assert [item.type for item in reply.output] == ["web_search_call", "web_search_call", "message"]
    search, opened = reply.output[0].action, reply.output[1].action
    assert (search.type, search.query) == ("search", "capital of France")
    assert [s.url for s in search.sources] == ["https://example.org/search?q=capital"]
    assert (opened.type, opened.url) == ("open_page", "https://example.org/paris")
    assert reply.output_text == ANSWER
    (note,) = reply.output[2].content[0].annotations
    assert (note.type, note.url, note.title) == ("url_citation", "https://example.org/paris", "Paris")
    assert ANSWER[note.start_index : note.end_index] == "【1†L2-L3】"
    assert "## browser" in model.prompts[0]


def test_web_search_streams_openai_s_events():
    model = PromptScriptedModel(browser_turn)
    with served(model, {"browser": FakeBrowser()}) as url:
        events = list(
            client(url).responses.create(
                model="gpt-oss-20b", input="Capital?", tools=[{"type": "web_search"}], stream=True
            )
        )
    kinds = [e.type for e in events]
    assert kinds.count("response.web_search_call.in_progress") == 2
    first = kinds.index("response.web_search_call.in_progress")
    assert kinds[first - 1 : first + 4] == [
        "response.output_item.added",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ]
    annotation = next(e for e in events if e.type == "response.output_text.annotation.added")
    assert annotation.annotation.url == "https://example.org/paris"
    assert kinds.index("response.output_text.annotation.added") < kinds.index("response.output_text.done")
    assert events[-1].response.output[1].action.url == "https://example.org/paris"
    assert events[-1].response.output[0].action.sources is None  # not asked for


class Pages(http.server.BaseHTTPRequestHandler):
    """A SearXNG that finds one page, and the page, on 127.0.0.1."""

    def do_GET(self):  # noqa: N802 - http.server's name
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path.startswith("/search?"):
            body = json.dumps({"results": [{"title": "Paris", "url": f"{host}/paris", "content": "The capital."}]})
            kind = "application/json"
        elif self.path == "/paris":
            body = "<html><head><title>Paris</title></head><body><p>Paris is the capital of France.</p></body></html>"
            kind = "text/html; charset=utf-8"
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def pages():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_web_search_on_the_real_browser_against_local_pages(pages):
    def turn(prompt: str) -> str:
        if "<|start|>browser.find to=assistant" in prompt:
            return f"<|channel|>final<|message|>{ANSWER}<|return|>"
        if OPEN_RESULT in prompt:
            return '<|channel|>analysis to=browser.find code<|message|>{"pattern": "capital"}<|call|>'
        if SEARCH_RESULT in prompt:
            return '<|channel|>analysis to=browser.open code<|message|>{"id": 0, "cursor": 0}<|call|>'
        return '<|channel|>analysis to=browser.search code<|message|>{"query": "capital of France"}<|call|>'

    settings = ToolSettings(
        enabled=("browser",), search_backend="searxng", search_url=f"{pages}/search", allowed_hosts=("127.0.0.1",)
    )
    made = []

    def browser():  # one for each request, as serve makes it
        made.append(BrowserTool(settings))
        return made[-1]

    model = PromptScriptedModel(turn)
    with served(model, {"browser": browser}) as url:
        reply = client(url).responses.create(model="gpt-oss-20b", input="Capital?", tools=[{"type": "web_search"}])
        client(url).responses.create(model="gpt-oss-20b", input="Capital?", tools=[{"type": "web_search"}])
    assert len(made) == 2 and made[0].pages == []  # the first request's pages were dropped when it ended
    actions = [item.action for item in reply.output if item.type == "web_search_call"]
    assert [a.type for a in actions] == ["search", "open_page", "find_in_page"], model.prompts[-1]
    assert all(item.status == "completed" for item in reply.output[:3])
    assert actions[0].query == "capital of France"
    assert actions[1].url == f"{pages}/paris"
    assert (actions[2].url, actions[2].pattern) == (f"{pages}/paris", "capital")
    assert "Paris is the capital of France." in model.prompts[-1]
    (note,) = reply.output[-1].content[0].annotations
    assert (note.url, note.title) == (f"{pages}/paris", "Paris")


def test_codex_searches_the_web_through_the_server(tmp_path, pages):
    """The real Codex CLI, which offers web_search to every model: the server runs the search and the page's opening,
    Codex reads the web_search_call items it streams and prints the answer."""
    from serving import run_agent
    from test_codex import MODEL, codex_binary, sandbox_flags

    codex = codex_binary()

    def turn(prompt: str) -> str:
        if OPEN_RESULT in prompt:
            return f"<|channel|>final<|message|>{ANSWER}<|return|>"
        if SEARCH_RESULT in prompt:
            return '<|channel|>analysis to=browser.open code<|message|>{"id": 0, "cursor": 0}<|call|>'
        return '<|channel|>analysis to=browser.search code<|message|>{"query": "capital of France"}<|call|>'

    settings = ToolSettings(
        enabled=("browser",), search_backend="searxng", search_url=f"{pages}/search", allowed_hosts=("127.0.0.1",)
    )
    model, seen = PromptScriptedModel(turn), []
    home, codex_home, work = tmp_path / "home", tmp_path / "codex-home", tmp_path / "work"
    for folder in (home, codex_home, work):
        folder.mkdir()
    server = Server(Engine(model), MODEL, tools={"browser": lambda: BrowserTool(settings)})
    with serving(server, seen) as url:
        (codex_home / "config.toml").write_text(
            f'model = "{MODEL}"\nmodel_provider = "local"\n\n'
            f'[model_providers.local]\nname = "mlx-oss"\nbase_url = "{url}/v1"\nwire_api = "responses"\n'
        )
        command = [str(codex), "exec", "--skip-git-repo-check", *sandbox_flags(codex), "What is the capital of France?"]
        done = run_agent(command, work, home, {"CODEX_HOME": str(codex_home)})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith(ANSWER), done.stdout[-2000:]
    assert "Paris is the capital of France." in model.prompts[-1]  # the page the server opened
    # Codex shows the server's web_search_call items as it shows OpenAI's
    assert "web search: capital of France" in done.stderr and f"web search: {pages}/paris" in done.stderr
    bodies = [r["body"] for r in seen if r["path"] == "/v1/responses"]
    assert bodies and all(body["input"][-1]["role"] == "user" for body in bodies)  # no tool round trip via Codex


# -- without --tools, and what comes back ------------------------------------------------------------------------


def test_a_server_without_tools_keeps_the_warning(picture):
    model = PromptScriptedModel(lambda prompt: "<|channel|>final<|message|>No tools.<|return|>")
    with served(model) as url:
        reply = httpx.post(
            f"{url}/v1/responses",
            json={"model": "gpt-oss-20b", "input": "6*7?", "tools": CODE_INTERPRETER + [{"type": "web_search"}]},
        )
    assert reply.status_code == 200
    assert reply.headers[WARNING_HEADER] == (
        "tools[0] (code_interpreter) left out: a hosted tool this server does not run yet; "
        "tools[1] (web_search) left out: a hosted tool this server does not run yet"
    )
    assert "## python" not in model.prompts[0] and "## browser" not in model.prompts[0]


def test_a_server_with_python_only_warns_about_web_search(picture):
    parsed = parse_responses(
        {"model": "m", "input": "hi", "tools": [{"type": "web_search"}, *CODE_INTERPRETER]},
        "m",
        runs=frozenset({"python"}),
    )
    assert parsed.builtin == ("python",) and parsed.conversation.builtin_tools == ("python",)
    assert parsed.warnings == ["tools[0] (web_search) left out: a hosted tool this server does not run yet"]
    none = parse_responses(
        {"model": "m", "input": "hi", "tools": CODE_INTERPRETER, "tool_choice": "none"}, "m", runs=frozenset({"python"})
    )
    assert none.builtin == () and none.conversation.builtin_tools == ()
    chosen = parse_responses(
        {"model": "m", "input": "hi", "tools": CODE_INTERPRETER, "tool_choice": {"type": "code_interpreter"}},
        "m",
        runs=frozenset({"python"}),
    )
    assert chosen.builtin == ("python",) and chosen.warnings == []


def test_tool_items_sent_back_are_rendered_as_gpt_oss_wrote_them():
    body = {
        "model": "m",
        "tools": CODE_INTERPRETER + [{"type": "web_search"}, {"type": "function", "name": "save"}],
        "input": [
            {"role": "user", "content": "6*7, then save it"},
            {
                "type": "code_interpreter_call",
                "id": "ci_1",
                "status": "completed",
                "code": "print(6*7)",
                "container_id": "cntr_mlx_oss",
                "outputs": [{"type": "logs", "logs": "42\n"}, {"type": "image", "url": "data:image/png;base64,AA=="}],
            },
            {
                "type": "web_search_call",
                "id": "ws_1",
                "status": "completed",
                "action": {"type": "search", "query": "q"},
            },
            {"type": "function_call", "call_id": "c1", "name": "save", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "saved"},
        ],
    }
    parsed = parse_responses(body, "m", runs=frozenset({"python", "browser"}))
    assert parsed.warnings == []
    text = encoding().decode(render_prompt(parsed.conversation))
    assert "<|start|>assistant to=python<|channel|>analysis code<|message|>print(6*7)<|call|>" in text
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>42\n\n[an image the code made]<|end|>" in text
    assert 'assistant to=browser.search<|channel|>analysis code<|message|>{"query": "q"}<|call|>' in text
    assert "<|start|>browser.search to=assistant<|channel|>analysis<|message|>[What the browser showed" in text
    # the turn goes on after the function call: its python run stays in the prompt
    assert text.index("to=python") < text.index("to=functions.save")
    # a server that runs only python leaves the search out, as a server without tools leaves both
    only_python = parse_responses(body, "m", runs=frozenset({"python"}))
    assert "input items left out: web_search_call x1" in only_python.warnings
    assert "to=browser" not in encoding().decode(render_prompt(only_python.conversation))


def test_a_web_search_item_with_an_unknown_action_is_refused():
    body = {
        "model": "m",
        "tools": [{"type": "web_search"}],
        "input": [{"role": "user", "content": "x"}, {"type": "web_search_call", "action": {"type": "click"}}],
    }
    with pytest.raises(ApiError, match="search, open_page or find_in_page"):
        parse_responses(body, "m", runs=frozenset({"browser"}))


# -- serve --tools ---------------------------------------------------------------------------------------------


def test_serve_parses_tools():
    args = serve.build_parser().parse_args(["--model", "m", "--tools", "python, Browser"])
    assert args.tools == ("python", "browser") and args.search_backend == "duckduckgo"
    assert serve.build_parser().parse_args(["--model", "m"]).tools == ()


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("python,shell", "'shell' is not a built-in tool (they are python, browser)"),
        ("python,", "an empty name is not a built-in tool"),
        ("browser,browser", "names a tool twice"),
    ],
)
def test_serve_refuses_unknown_tools_in_one_line(given, said, capsys):
    with pytest.raises(SystemExit):
        serve.build_parser().parse_args(["--model", "m", "--tools", given])
    assert said in capsys.readouterr().err


def test_serve_says_why_a_tool_cannot_run(monkeypatch, tmp_path):
    closed = []

    class Unavailable(FakeBrowser):
        name = "python"

        def unavailable(self):
            return "bubblewrap is not installed"

        def close(self):
            closed.append(self.name)

    monkeypatch.setattr(
        serve, "make_tool", lambda name, settings: FakeBrowser() if name == "browser" else Unavailable()
    )
    args = serve.build_parser().parse_args(["--model", "m", "--tools", "browser,python", "--work-dir", str(tmp_path)])
    with pytest.raises(MlxOssError, match="--tools python: the tool cannot run here: bubblewrap is not installed"):
        serve.builtin_tools(args)
    assert closed == ["python"]
    monkeypatch.setattr(
        serve, "make_tool", lambda name, settings: FakeBrowser() if name == "browser" else FakePython(0)
    )
    args = serve.build_parser().parse_args(["--model", "m", "--tools", "python,browser", "--work-dir", str(tmp_path)])
    tools = serve.builtin_tools(args)
    assert isinstance(tools["python"], FakePython)  # one kernel for the server
    assert isinstance(tools["browser"](), FakeBrowser) and tools["browser"]() is not tools["browser"]()
    searx = serve.build_parser().parse_args(["--model", "m", "--tools", "browser", "--search-backend", "searxng"])
    with pytest.raises(MlxOssError, match="needs --search-url"):
        serve.builtin_tools(searx)
    with pytest.raises(SystemExit):
        serve.build_parser().parse_args(["--model", "m", "--search-url", "ftp://x"])
    assert isinstance(serve.build_parser(), argparse.ArgumentParser)

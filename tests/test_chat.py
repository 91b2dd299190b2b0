"""The terminal chat as users run it: a real subprocess with stdin piped, and a real pseudo-terminal (pexpect)
for the interactive loop, its slash commands and Ctrl-C."""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys

import pexpect
import pytest
from harmony_helpers import PromptScriptedModel, ScriptedModel, harmony_tokens

from mlx_oss import chat
from mlx_oss.chat import ChatSession, ChatSettings, ChatTools, Display, run_command
from mlx_oss.cli import format_count, run
from mlx_oss.config import ModelConfig
from mlx_oss.engine import CancelToken, Done, Engine, GenerationStats, SamplingParams
from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import AnswerDelta, Conversation, Message, ReasoningDelta, encoding, render_prompt
from mlx_oss.layouts import parameter_count
from mlx_oss.store import resolve_model
from mlx_oss.tools import ToolSettings

CHAT = [sys.executable, "-m", "mlx_oss.chat"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint


def chat_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm"}


def test_piped_question_is_answered_and_the_chat_exits(tiny):
    args = [*CHAT, "--model", str(tiny), "--max-tokens", "12", "--seed", "5", "--reasoning", "low"]
    out = subprocess.run(args, input="What is 2 + 2?\n", capture_output=True, text=True, timeout=120, env=chat_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # random weights: gibberish, shown as text
    assert "tokens/s" in out.stderr and "12 tokens" in out.stderr
    assert "<|" not in out.stdout
    again = subprocess.run(args, input="What is 2 + 2?\n", capture_output=True, text=True, timeout=120, env=chat_env())
    assert again.stdout == out.stdout  # the seed makes the answer reproducible


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "openai/gpt-oss-20b",
            "openai/gpt-oss-20b is not on this computer; get it with: "
            "python -m mlx_oss.models download openai/gpt-oss-20b",
        ),
        ("/no/such/dir", "'/no/such/dir': no such model directory"),
    ],
)
def test_a_missing_model_is_one_clear_line(model, message, tmp_path):
    env = {**os.environ, "MLX_OSS_MODELS": str(tmp_path)}  # an empty store
    out = subprocess.run([*CHAT, "--model", model], input="", capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert out.stderr == f"python -m mlx_oss.chat: error: {message}\n"


def test_an_unreadable_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    out = subprocess.run([*CHAT, "--model", str(tmp_path)], input="hi", capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "config.json" in out.stderr and "Traceback" not in out.stderr


def test_empty_stdin_is_an_error(tiny):
    out = subprocess.run([*CHAT, "--model", str(tiny)], input=" \n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == "python -m mlx_oss.chat: error: nothing to answer: stdin was empty\n"


def test_interactive_chat_with_commands_and_ctrl_c(tiny):
    child = pexpect.spawn(
        CHAT[0],
        [*CHAT[1:], "--model", str(tiny), "--seed", "1"],
        env=chat_env(),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    try:
        child.expect(r"mlx-oss chat: \S+ \((\d+\.\d)M parameters, numpy backend \(auto: [^)]+\), reasoning medium\)")
        child.expect_exact(">>> ")
        child.sendline("/help")
        child.expect_exact("/effort low|medium|high")
        child.expect_exact(">>> ")
        child.sendline("/effort high")
        child.expect_exact("(reasoning effort: high)")
        child.expect_exact(">>> ")
        child.sendline("Tell me everything.")  # no --max-tokens: only Ctrl-C ends this answer
        child.expect(r"\S{20}")  # the answer streams
        child.sendintr()
        child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s;.*; stopped[;\]]")
        assert int(child.match.group(1)) > 0
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.expect_exact(">>> ")
        child.sendintr()  # at the prompt Ctrl-C does not leave either
        child.expect_exact("(/quit or Ctrl-D leaves the chat)")
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_interactive_chat_leaves_on_ctrl_d(tiny):
    child = pexpect.spawn(CHAT[0], [*CHAT[1:], "--model", str(tiny)], env=chat_env(), encoding="utf-8", timeout=60)
    try:
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_OSS_MODELS", str(tmp_path / "store"))
    assert resolve_model(str(tmp_path)) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(MlxOssError, match="^'models/typo': no such model directory$"):
        resolve_model("models/typo")
    with pytest.raises(
        MlxOssError,
        match=r"^openai/gpt-oss-120b is not on this computer; get it with: python -m mlx_oss.models download ",
    ):
        resolve_model("openai/gpt-oss-120b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MlxOssError, match="not a directory"):
        resolve_model(str(tmp_path / "file"))


def test_parameter_count_of_gpt_oss_20b():
    from mlx_oss.converters.synthetic import preset_config

    count = parameter_count(preset_config("20b"))
    assert 20.8e9 < count < 21.0e9  # the model card's 20.91B
    assert format_count(count) == "20.9B"
    assert isinstance(preset_config("tiny"), ModelConfig)


def stats() -> GenerationStats:
    return GenerationStats(10, 0, 3, 0.5, 100.0, 20.0)


def test_display_sets_reasoning_apart_and_can_hide_it():
    events = [ReasoningDelta("Let me think."), AnswerDelta("Four."), Done("stop", stats())]
    out = io.StringIO()
    display = Display(out, out, color=False, show_reasoning=True)
    for e in events:
        display.event(e)
    assert out.getvalue().startswith("reasoning:\nLet me think.\n\nFour.\n[3 tokens, 20.0 tokens/s;")
    hidden, side = io.StringIO(), io.StringIO()
    display = Display(hidden, side, color=False, show_reasoning=False)
    for e in events:
        display.event(e)
    assert hidden.getvalue() == "Four.\n" and "Let me think." not in side.getvalue()


def test_session_commands_and_history(capsys):
    """The chat loop's pieces on a scripted model: the answer streams, history grows, commands change the prompt."""
    model = ScriptedModel()
    session = ChatSession(
        Engine(model),
        Conversation(reasoning_effort="low", instructions="Answer in French."),
        ChatSettings(SamplingParams(temperature=0), show_reasoning=True),
    )
    script = "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>Quatre.<|return|>"
    session.conversation.current_date = datetime.date.today().isoformat()
    session.conversation.messages.append(Message.user("2 + 2?"))
    model.expect(render_prompt(session.conversation), harmony_tokens(script))
    session.conversation.messages.pop()
    out = io.StringIO()
    done = session.send("2 + 2?", Display(out, out, color=False, show_reasoning=True), CancelToken())
    assert out.getvalue().startswith("reasoning:\nEasy.\n\nQuatre.\n[")
    assert done.stop_reason == "stop"
    assert session.conversation.messages == [
        Message.user("2 + 2?"),
        Message.reasoning("Easy."),
        Message.answer("Quatre."),
    ]
    rendered = encoding().decode(render_prompt(session.conversation))
    assert "# Instructions\n\nAnswer in French." in rendered and "Reasoning: low" in rendered

    assert run_command(session, "/effort high") is None
    assert "Reasoning: high" in encoding().decode(render_prompt(session.conversation))
    run_command(session, "/reasoning hide")
    assert not session.settings.show_reasoning
    run_command(session, "/reset")
    assert session.conversation.messages == []
    assert run_command(session, "/quit") == "quit"
    printed = capsys.readouterr().out
    assert "(reasoning effort: high)" in printed and "(new conversation)" in printed


@pytest.mark.parametrize("locale", [None, "C"])  # C: Python's stdin would turn the bytes into lone surrogates
def test_piped_bytes_that_are_not_text_are_one_clear_line(tiny, locale):
    env = chat_env() | ({"LC_ALL": locale} if locale else {})
    out = subprocess.run([*CHAT, "--model", str(tiny)], input=b"\xff\xfe\n", capture_output=True, timeout=60, env=env)
    assert out.returncode == 1
    assert out.stderr.decode() == (
        "python -m mlx_oss.chat: error: stdin is not utf-8 text (byte 0: invalid start byte); "
        "convert it first, e.g. with iconv -t utf-8\n"
    )


def test_an_interactive_line_that_is_not_text_is_not_sent(tiny):
    """Without readline (as on Windows) undecodable bytes reach the chat as lone surrogates; readline itself
    drops them."""
    no_readline = (
        "import runpy, sys; sys.modules['readline'] = None; runpy.run_module('mlx_oss.chat', run_name='__main__')"
    )
    args = ["-c", no_readline, "--model", str(tiny), "--max-tokens", "2"]
    child = pexpect.spawn(sys.executable, args, env=chat_env(), timeout=60)
    try:
        child.expect_exact(b">>> ")
        child.send(b"caf\xe9\r")  # Latin-1, not UTF-8
        child.expect_exact(b"(that line is not utf-8 text; nothing was sent)")
        child.expect_exact(b">>> ")
        child.sendline(b"hello")
        child.expect(rb"\[2 tokens")  # the chat goes on
        child.expect_exact(b">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--max-tokens", "0"], "argument --max-tokens: 0 is not a positive number"),
        (["--max-tokens", "-5"], "argument --max-tokens: -5 is not a positive number"),
        (["--temperature", "-1"], "argument --temperature: -1 is out of range: it must be at least 0"),
        (["--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
        (["--top-p", "0"], "argument --top-p: 0 is out of range: it must be above 0 and at most 1"),
        (["--top-p", "1.5"], "argument --top-p: 1.5 is out of range: it must be above 0 and at most 1"),
        (["--seed", "-1"], "argument --seed: -1 is below 0"),  # numpy refused it mid-answer, with a traceback
        (["--seed", "x"], "argument --seed: 'x' is not a whole number"),
    ],
)
def test_options_out_of_range_are_refused_before_anything_loads(flags, complaint):
    out = subprocess.run([*CHAT, "--model", "/no/such/dir", *flags], input="hi", capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == f"python -m mlx_oss.chat: error: {complaint}"


def test_a_run_the_tokenizer_cannot_take_is_one_clear_line(tiny):
    """A million 'a's overflowed the tokenizer's stack (a Rust panic and a traceback); 600,000 took 2 minutes."""
    out = subprocess.run(
        [*CHAT, "--model", str(tiny)], input="a" * 1_000_000, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert out.stderr == (
        "python -m mlx_oss.chat: error: the message has more than 20000 letters, symbols or spaces in a row, "
        "which the tokenizer cannot take; break the run up\n"
    )


PYTHON_TURN = (
    "<|channel|>analysis<|message|>Use python.<|end|><|start|>assistant<|channel|>analysis to=python code<|message|>"
    "print(2 + 2)<|call|>"
)
ANSWER_TURN = "<|channel|>analysis<|message|>It is 4.<|end|><|start|>assistant<|channel|>final<|message|>4.<|return|>"


def test_tool_calls_show_dimmed_with_their_output_then_the_answer(tmp_path, monkeypatch):
    """`--tools python` as the chat runs it: the tool is built from its module (here a fake in its place) with a
    working folder, the model's call and the tool's full output are shown dimmed, then the answer."""
    monkeypatch.setitem(chat.TOOL_CLASSES, "python", ("harmony_helpers", "FakeTool"))
    said: list[str] = []
    tools = ChatTools(ToolSettings(work_dir=tmp_path / "work"), say=said.append)
    assert tools.turn_on("python") and said == [f"(python's working folder: {tmp_path / 'work'})"]
    assert (tmp_path / "work").is_dir() and tools.built["python"].work_dir == tmp_path / "work"

    model = PromptScriptedModel(lambda prompt: ANSWER_TURN if "<|start|>python to=assistant" in prompt else PYTHON_TURN)
    session = ChatSession(Engine(model), Conversation(), ChatSettings(SamplingParams(temperature=0), True), tools)
    out = io.StringIO()
    done = session.send("2 + 2?", Display(out, out, color=True, show_reasoning=False), CancelToken())
    assert done.stop_reason == "stop"
    assert out.getvalue().startswith(
        f"{chat.BOLD}python call:{chat.RESET}\n{chat.DIM}print(2 + 2){chat.RESET}\n{chat.BOLD}python output ("
    )
    assert f" s):{chat.RESET}\n{chat.DIM}full: 4{chat.RESET}\n\n4.\n" in out.getvalue()  # then the answer
    assert "## python" in model.prompts[0]  # declared to the model
    assert session.conversation.messages[-3] == Message.builtin_result("python", "4\n")

    first = tools.built["python"]
    run_command(session, "/reset")  # a new conversation: a fresh python, in the same folder, not announced again
    assert first.closed and tools.built["python"] is not first and len(said) == 1 and tools.enabled == ["python"]
    run_command(session, "/tools python off")
    session.send("Again?", Display(out, out, color=False, show_reasoning=False), CancelToken())
    assert "## python" not in model.prompts[-1]  # off: no longer declared, so the model is not offered it
    tools.close()
    assert tools.built["python"].closed


def test_tools_that_cannot_be_had_are_one_line_and_the_chat_goes_on(monkeypatch, capsys):
    monkeypatch.setitem(chat.TOOL_CLASSES, "python", ("mlx_oss.tools.no_such_module", "PythonTool"))
    monkeypatch.setitem(chat.TOOL_CLASSES, "browser", ("harmony_helpers", "UnavailableBrowser"))
    session = ChatSession(Engine(ScriptedModel()), Conversation(), ChatSettings(SamplingParams(), True))
    session.tools.say = print
    run_command(session, "/tools python on")
    run_command(session, "/tools browser on")
    run_command(session, "/tools")
    run_command(session, "/tools browser sideways")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("(python is not available: its module cannot be loaded (No module named ")
    assert printed[1:] == [
        "(browser is not available: offline (no network))",
        f"(python: not available: {session.tools.problems['python']})",
        "(browser: not available: offline (no network))",
        "(/tools NAME on|off, NAME one of python, browser)",
    ]
    assert session.tools.enabled == []


def test_the_tools_flag_and_command_in_the_terminal(tiny, tmp_path):
    """The real CLI with fakes in the tools' place (random weights never call a tool): the flag turns them on,
    one line says what could not be, /tools lists and toggles."""
    runner = (
        "import sys; from mlx_oss import chat; from mlx_oss.cli import run; "
        "chat.TOOL_CLASSES.update(python=('harmony_helpers', 'FakeTool'), browser=('harmony_helpers', "
        "'UnavailableBrowser')); run(lambda: chat.main(sys.argv[1:]), chat.PROG)"
    )
    env = {**chat_env(), "PYTHONPATH": os.path.dirname(__file__), "XDG_DATA_HOME": str(tmp_path)}
    args = ["-c", runner, "--model", str(tiny), "--max-tokens", "2", "--tools", "python,browser"]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect(r"\(python's working folder: (\S+)\)")
        assert child.match.group(1).startswith(str(tmp_path / "mlx-oss" / "python" / "chat_"))
        child.expect_exact("(browser is not available: offline (no network))")
        child.expect_exact("reasoning medium, tools python)")
        child.expect_exact(">>> ")
        child.sendline("/tools")
        child.expect_exact("(python: on)")
        child.expect_exact("(browser: not available: offline (no network))")
        child.expect_exact(">>> ")
        child.sendline("/tools python off")
        child.expect_exact("(python off)")
        child.sendline("/tools python on")
        child.expect_exact("(python on)")
        child.expect_exact(">>> ")
        child.sendline("hello")
        child.expect(r"\[2 tokens")
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_an_unknown_tool_is_refused_before_anything_loads():
    out = subprocess.run([*CHAT, "--model", "/no/such/dir", "--tools", "python,shell"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == (
        "python -m mlx_oss.chat: error: argument --tools: unknown tool 'shell': the tools are python, browser"
    )


ANSWER_BEYOND_LATIN_1 = "Ça coûte 5 € — «voilà» ✓"
SCRIPTED_ANSWER = (
    "<|channel|>analysis<|message|>Le prix ≈ 5 €.<|end|>"
    f"<|start|>assistant<|channel|>final<|message|>{ANSWER_BEYOND_LATIN_1}<|return|>"
)


@pytest.mark.parametrize("io_encoding", ["latin-1", "latin-1:strict", "cp1252"])  # a locale; strict stderr; Windows
def test_an_answer_stdout_cannot_encode_is_written_with_replacements(tiny, io_encoding):
    """The model writes any character; stdout in an 8-bit encoding (a redirect on Windows is cp1252) holds few.
    What it lacks becomes '?', and the chat finishes its answer instead of dying with a traceback."""
    runner = (
        "import sys; from harmony_helpers import PromptScriptedModel; from mlx_oss import chat, loading; "
        "from mlx_oss.cli import run; "
        f"loading.load = lambda path, backend: PromptScriptedModel(lambda prompt: {SCRIPTED_ANSWER!r}); "
        "run(lambda: chat.main(sys.argv[1:]), chat.PROG)"
    )
    env = {**chat_env(), "PYTHONPATH": os.path.dirname(__file__), "PYTHONIOENCODING": io_encoding}
    out = subprocess.run(
        [sys.executable, "-c", runner, "--model", str(tiny), "--temperature", "0"],
        input=b"Price?\n",
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert b"Traceback" not in out.stderr
    codec = io_encoding.partition(":")[0]
    answer = out.stdout.decode(codec)
    assert answer == ANSWER_BEYOND_LATIN_1.encode(codec, errors="replace").decode(codec) + "\n"
    assert "?" in answer and "coûte" in answer
    assert "Le prix \\u2248 5" in out.stderr.decode(codec)  # the reasoning, on stderr, as Python escapes it


def test_text_that_cannot_be_encoded_anywhere_else_is_one_line(capsys):
    def main():
        "✓".encode("ascii")

    with pytest.raises(SystemExit) as exit_:
        run(main, "prog")
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "prog: error: 'ascii' codec can't encode character '\\u2713' in position 0: ordinal not in range(128)\n"
    )

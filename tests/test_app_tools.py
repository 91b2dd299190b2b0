"""The desktop app's built-in tools: real widgets offscreen, a real SQLite file, a model whose output is scripted
(it calls python or the browser, then answers) and fake tools, so what is checked is the app: the blocks, the
pictures, the links, the toggles, what is stored and what the next turn sends."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("PySide6", reason="the desktop app needs the app extra")

from harmony_helpers import PromptScriptedModel  # noqa: E402
from pictures import png  # noqa: E402
from PySide6.QtGui import QDesktopServices  # noqa: E402

from mlx_oss.app.main_window import MainWindow, conversation_for  # noqa: E402
from mlx_oss.app.settings import AppSettings, work_dir  # noqa: E402
from mlx_oss.app.storage import ConversationStore  # noqa: E402
from mlx_oss.engine import Engine  # noqa: E402
from mlx_oss.harmony import Message, render_prompt  # noqa: E402
from mlx_oss.tools import BROWSER, PYTHON, Citation, ToolOutput  # noqa: E402

TIMEOUT_MS = 30_000
CODE = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.savefig('plot.png')\nprint(6 * 7)"
PYTHON_CALL = (
    "<|channel|>analysis<|message|>Let me compute it.<|end|>"
    f"<|start|>assistant<|channel|>analysis to=python code<|message|>{CODE}<|call|>"
)
ANSWER = "<|channel|>final<|message|>It is **42**, and the plot is in the folder.<|return|>"


class FakeTool:
    """A built-in tool that answers what it is told to, or is unavailable; it records its calls."""

    def __init__(self, name: str, settings, answer=None, reason: str | None = None):
        self.name, self.settings, self.answer, self.reason = name, settings, answer, reason
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    def unavailable(self) -> str | None:
        return self.reason

    def run(self, recipient: str, content: str, cancel) -> ToolOutput:
        self.calls.append((recipient, content))
        return self.answer(self.settings)

    def close(self) -> None:
        self.closed = True


def python_output(settings) -> ToolOutput:
    """What the python tool returns for CODE: its output, and the plot it saved in the working folder."""
    folder = Path(settings.work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plot.png").write_bytes(png())
    return ToolOutput("42\n", display="42\n[saved plot.png]", files=(folder / "plot.png",))


class Tools:
    """The window's tool factory: fake tools, with a reason to be unavailable when asked."""

    def __init__(self, reasons: dict | None = None, answers: dict | None = None):
        self.reasons = reasons or {}
        self.answers = {PYTHON: python_output, **(answers or {})}
        self.made: list[FakeTool] = []

    def __call__(self, name: str, settings) -> FakeTool:
        tool = FakeTool(name, settings, self.answers.get(name), self.reasons.get(name))
        self.made.append(tool)
        return tool


@pytest.fixture
def app_dir(tmp_path, monkeypatch, tiny_checkpoint) -> Path:
    monkeypatch.setenv("MLX_OSS_APP_DIR", str(tmp_path / "app"))
    monkeypatch.setenv("MLX_OSS_MODELS", str(tmp_path / "store"))
    AppSettings(model=str(tiny_checkpoint), temperature=0.0).save()
    return tmp_path / "app"


def open_window(qtbot, respond, tools: Tools) -> tuple[MainWindow, PromptScriptedModel]:
    """The window with a scripted model already loaded (the model answers `respond(prompt text)`)."""
    window = MainWindow(tool_factory=tools)
    qtbot.addWidget(window)
    window.show()
    model = PromptScriptedModel(respond)
    window.host.engine = Engine(model, context_length=8192)
    window.loaded_key = window._wanted_key()
    qtbot.waitUntil(lambda: bool(window.chat.tool_bar.reasons), timeout=TIMEOUT_MS)
    return window, model


def turn_of(prompt: str) -> str:
    """The prompt after its last user message: what the model did in this turn so far."""
    return prompt.rsplit("<|start|>user", 1)[-1]


def python_then_answer(prompt: str) -> str:
    """Calls python once per question, then answers from its output."""
    return ANSWER if "<|start|>python" in turn_of(prompt) else PYTHON_CALL


def send(window: MainWindow, text: str) -> None:
    window.chat.input.setPlainText(text)
    window.chat.send_button.click()


def answered(qtbot, window: MainWindow) -> None:
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)


def test_a_python_call_shows_its_code_output_and_plot_and_is_sent_again_after_reopening(qtbot, app_dir):
    tools = Tools()
    window, model = open_window(qtbot, python_then_answer, tools)
    assert window.chat.tool_bar.toggles[PYTHON].isEnabled()
    window.chat.tool_bar.toggles[PYTHON].setChecked(True)
    send(window, "What is 6 times 7? Plot the squares.")
    answered(qtbot, window)
    view = window.chat.messages[-1]
    assert view.state == "done" and view.content == "It is **42**, and the plot is in the folder."
    (block,) = view.tool_calls
    assert block.recipient == "python" and block.code.text() == CODE
    assert block.output_label.text() == "42\n[saved plot.png]" and not block.error
    (picture,) = block.pictures
    assert (picture.pixmap().width(), picture.pixmap().height()) == (40, 30)
    block.toggle.setChecked(True)
    # A widget a layout adopts is shown by a queued event, not at once: wait for the event loop to get to it.
    qtbot.waitUntil(lambda: block.body.isVisible() and picture.isVisible(), timeout=TIMEOUT_MS)
    block.toggle.setChecked(False)
    assert not block.body.isVisible()
    (python,) = [t for t in tools.made if t.calls]
    assert python.calls == [("python", CODE)]
    assert Path(python.settings.work_dir) == work_dir(window.current)
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>42\n<|end|>" in model.prompts[1]
    conversation = window.current
    first_turn = window.conversations.messages(conversation)
    window.close()

    (work_dir(conversation) / "plot.png").write_bytes(png(10, 10))  # a later call overwrote the plot
    tools = Tools()
    again, model = open_window(qtbot, python_then_answer, tools)
    (block,) = again.chat.messages[-1].tool_calls
    assert block.code.text() == CODE and block.output_label.text() == "42\n[saved plot.png]"
    assert block.pictures[0].pixmap().width() == 40  # the picture kept with the conversation, not today's file
    assert again.chat.tool_bar.toggles[PYTHON].isChecked()
    send(again, "And 7 times 8?")
    answered(qtbot, again)
    # The next turn sends the first one as the model saw it: stored whole, it renders the same prompt as the
    # conversation kept in memory would have.
    stored = again.conversations.messages(conversation)[1].harmony
    assert [m.channel for m in stored] == ["analysis", "analysis", "analysis", "final"]
    assert stored[1] == Message.builtin_call("python", CODE) and stored[2] == Message.builtin_result("python", "42\n")
    remembered = conversation_for(first_turn, again.settings).messages + [Message.user("And 7 times 8?")]
    assert model.prompts[0].startswith("<|start|>system")
    expected = conversation_for(first_turn, again.settings)
    expected.messages = remembered
    expected.builtin_tools = (PYTHON,)
    from mlx_oss.harmony import encoding

    assert model.prompts[0] == encoding().decode(render_prompt(expected))
    assert "It is **42**" in model.prompts[0]
    again.close()


def test_the_stored_turn_survives_a_database_from_before_tools(tmp_path):
    """A version 1 file (no tool columns) opens, is brought to version 2 in place, and keeps its chats."""
    path = tmp_path / "conversations.db"
    db = sqlite3.connect(path)
    from mlx_oss.app.storage import SCHEMA

    db.executescript(SCHEMA)
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('Old', 0, 0)")
    db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (1, 'user', 'hi', 0)")
    db.execute(
        "INSERT INTO messages (conversation_id, role, content, reasoning, created) "
        "VALUES (1, 'assistant', 'Hello', 'r', 0)"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = ConversationStore(path)
    user, answer = store.messages(1)
    assert (answer.content, answer.harmony, answer.tool_calls) == ("Hello", None, [])
    assert store.tools(1) == ()
    store.set_tools(1, (BROWSER, PYTHON))
    assert store.tools(1) == (PYTHON, BROWSER)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_version_1_file_shown_read_only_still_shows_its_chats(tmp_path):
    path = tmp_path / "conversations.db"
    db = sqlite3.connect(path)
    from mlx_oss.app.storage import SCHEMA

    db.executescript(SCHEMA)
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('Old', 0, 0)")
    db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (1, 'user', 'hi', 0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = ConversationStore.__new__(ConversationStore)
    store.path, store.busy_timeout, store.read_only, store.has_tools, store.notice = path, 1.0, None, True, None
    store._open_read_only("a test")
    assert [m.content for m in store.messages(1)] == ["hi"] and store.tools(1) == ()
    store.close()


BROWSE = '<|channel|>analysis to=browser.open code<|message|>{"id": "https://example.org/boiling"}<|call|>'
CITED = (
    "<|channel|>final<|message|>Water boils at about 84 °C on Mont Blanc【3†L10-L15】, "
    "though an unknown page【9†L1】 stays text.<|return|>"
)


def browse_then_cite(prompt: str) -> str:
    return CITED if "<|start|>browser" in turn_of(prompt) else BROWSE


def page(settings) -> ToolOutput:
    return ToolOutput(
        "[3] Boiling point (example.org)\nL10: At 4808 m water boils at 84 °C.",
        citations=(Citation(3, "https://example.org/boiling", "Boiling point"),),
    )


def test_a_citation_renders_as_a_link_that_opens_the_page(qtbot, app_dir, monkeypatch):
    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toString()) or True)
    window, _ = open_window(qtbot, browse_then_cite, Tools(answers={BROWSER: page}))
    window.chat.tool_bar.toggles[BROWSER].setChecked(True)
    send(window, "Boiling point on Mont Blanc?")
    answered(qtbot, window)
    view = window.chat.messages[-1]
    (block,) = view.tool_calls
    assert block.recipient == "browser.open" and "example.org/boiling" in block.code.text()
    shown = view.answer_label.text()
    assert "Mont Blanc ([example.org](https://example.org/boiling)), though" in shown
    assert "【9†L1】" in shown  # no call opened page 9: the citation stays as written
    view.answer_label.linkActivated.emit("https://example.org/boiling")
    view.answer_label.linkActivated.emit("file:///etc/passwd")  # never opened from an answer
    assert opened == ["https://example.org/boiling"]
    conversation = window.current
    window.close()
    again, _ = open_window(qtbot, browse_then_cite, Tools(answers={BROWSER: page}))
    assert again.current == conversation
    assert "(https://example.org/boiling)" in again.chat.messages[-1].answer_label.text()
    again.close()


def test_toggles_persist_per_conversation_and_the_folder_is_one_click_away(qtbot, app_dir, monkeypatch):
    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()) or True)
    window, _ = open_window(qtbot, lambda _: ANSWER, Tools())
    bar = window.chat.tool_bar
    assert not bar.folder_button.isEnabled()  # no conversation yet
    bar.toggles[BROWSER].setChecked(True)
    send(window, "First")
    answered(qtbot, window)
    first = window.current
    assert window.conversations.tools(first) == (BROWSER,)
    bar.toggles[PYTHON].setChecked(True)
    assert window.conversations.tools(first) == (PYTHON, BROWSER)
    bar.folder_button.click()
    assert opened == [str(work_dir(first))] and work_dir(first).is_dir()
    second = window.conversations.new()
    window.open_conversation(second)
    assert bar.chosen() == ()
    window.open_conversation(first)
    assert bar.chosen() == (PYTHON, BROWSER)
    window.close()
    again, _ = open_window(qtbot, lambda _: ANSWER, Tools())
    again.open_conversation(first)
    assert again.chat.tool_bar.chosen() == (PYTHON, BROWSER)
    again.close()


def test_an_unavailable_tool_is_disabled_with_its_reason(qtbot, app_dir):
    reason = "bubblewrap (bwrap) is not installed; install it to run Python in a sandbox"
    tools = Tools(reasons={PYTHON: reason})
    window, model = open_window(qtbot, python_then_answer, tools)
    toggle = window.chat.tool_bar.toggles[PYTHON]
    assert not toggle.isEnabled() and toggle.toolTip() == f"Unavailable: {reason}"
    assert window.chat.tool_bar.toggles[BROWSER].isEnabled()
    toggle.setChecked(True)  # a conversation that had it on keeps the choice, but it is not offered
    send(window, "Compute something")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert "# Tools" not in model.prompts[0]  # python is not declared to the model
    assert all(not t.calls for t in tools.made)
    window.close()


def test_tool_settings_are_saved_and_rebuild_the_tools(qtbot, app_dir):
    tools = Tools()
    window, _ = open_window(qtbot, python_then_answer, tools)
    view = window.settings_view
    view.search_backend.setCurrentText("searxng")
    view.search_url.setText("")
    view.save_button.click()
    assert "SearXNG needs its address" in view.message.text()
    view.search_url.setText("http://127.0.0.1:8888")
    view.python_timeout.setValue(30)
    view.python_memory.setValue(1024)
    view.save_button.click()
    assert "Saved" in view.message.text()
    saved = AppSettings.load()
    assert (saved.search_backend, saved.search_url, saved.python_timeout_s, saved.python_memory_mb) == (
        "searxng",
        "http://127.0.0.1:8888",
        30.0,
        1024,
    )
    qtbot.waitUntil(lambda: not window.tool_checks, timeout=TIMEOUT_MS)  # asked again, with the new backend
    assert {t.settings.search_backend for t in tools.made[-2:]} == {"searxng"}
    window.chat.tool_bar.toggles[PYTHON].setChecked(True)
    send(window, "Go")
    answered(qtbot, window)
    python = [t for t in tools.made if t.calls][0]
    assert (python.settings.python_timeout_s, python.settings.python_memory_mb) == (30.0, 1024)
    assert python.settings.search_url == "http://127.0.0.1:8888"
    window.close()


def test_the_screenshots_of_the_tools_render_through_the_real_window(tmp_path):
    """`app_runner.py --screenshots DIR` (what made docs/app-python-call.png and docs/app-cited-page.png): a second
    chat shows only its own messages, the blocks and the links."""
    import subprocess
    import sys

    runner = Path(__file__).with_name("app_runner.py")
    out = subprocess.run(
        [sys.executable, str(runner), "--screenshots", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    from PySide6.QtGui import QImage

    for name in ("app-python-call.png", "app-cited-page.png"):
        image = QImage(str(tmp_path / name))
        assert (image.width(), image.height()) == (1180, 1040), name


REAL_CODE = """import struct, zlib
from IPython.display import Image, display

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

rows = b"".join(b"\\x00" + b"\\x00\\x80\\xff" * 24 for _ in range(16))
header = struct.pack(">IIBBBBB", 24, 16, 8, 2, 0, 0, 0)
png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
display(Image(data=png))
answer = 6 * 7
print(answer)"""


def test_the_real_python_tool_runs_in_the_conversation_folder_and_its_picture_is_shown(qtbot, app_dir):
    """The real sandboxed kernel, where this machine can run it: the block shows what it printed and the picture
    it displayed, and the kernel keeps its variables for the next turn."""
    from mlx_oss.tools.python import PythonTool

    reason = PythonTool(AppSettings().tool_settings(), app_dir / "probe").unavailable()
    if reason:
        pytest.skip(f"the python tool cannot run here: {reason}")

    def respond(prompt: str) -> str:
        turn = turn_of(prompt)
        if "<|start|>python" in turn:
            return ANSWER
        code = REAL_CODE if "First" in turn else "print(answer + 1)"
        return f"<|channel|>analysis to=python code<|message|>{code}<|call|>"

    window = MainWindow()  # the real tools
    qtbot.addWidget(window)
    window.show()
    window.host.engine = Engine(PromptScriptedModel(respond), context_length=8192)
    window.loaded_key = window._wanted_key()
    qtbot.waitUntil(lambda: bool(window.chat.tool_bar.reasons), timeout=TIMEOUT_MS)
    assert window.chat.tool_bar.toggles[PYTHON].isEnabled(), window.chat.tool_bar.reasons
    window.chat.tool_bar.toggles[PYTHON].setChecked(True)
    send(window, "First: compute and draw")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=120_000)
    (block,) = window.chat.messages[-1].tool_calls
    assert not block.error and block.output_label.text() == "[image saved to output_1.png]\n42\n"
    (picture,) = block.pictures
    assert (picture.pixmap().width(), picture.pixmap().height()) == (24, 16)
    assert Path(picture.toolTip()).parent == work_dir(window.current)
    send(window, "Then: one more")  # the same kernel: `answer` is still there
    qtbot.waitUntil(lambda: window.streaming is None, timeout=120_000)
    (block,) = window.chat.messages[-1].tool_calls
    assert block.output_label.text() == "43\n"
    window.close()


class SlowPython(FakeTool):
    """A python call that runs until it is cancelled (an endless loop the user stops)."""

    def run(self, recipient: str, content: str, cancel) -> ToolOutput:
        self.calls.append((recipient, content))
        for _ in range(1000):
            if cancel.cancelled:
                return ToolOutput("KeyboardInterrupt: the user stopped the call", error=True)
            time.sleep(0.01)
        return ToolOutput("never stopped")


def test_stop_while_a_tool_runs_ends_the_call_and_keeps_the_turn(qtbot, app_dir):
    made = []

    def factory(name, settings):
        made.append(SlowPython(name, settings))
        return made[-1]

    window = MainWindow(tool_factory=factory)
    qtbot.addWidget(window)
    window.show()
    window.host.engine = Engine(PromptScriptedModel(python_then_answer), context_length=8192)
    window.loaded_key = window._wanted_key()
    qtbot.waitUntil(lambda: bool(window.chat.tool_bar.reasons), timeout=TIMEOUT_MS)
    window.chat.tool_bar.toggles[PYTHON].setChecked(True)
    send(window, "Loop forever")
    qtbot.waitUntil(lambda: window.tool_call is not None, timeout=TIMEOUT_MS)
    block = window.tool_call[1]
    assert block.toggle.text() == "python · running…"
    qtbot.waitUntil(block.body.isVisible, timeout=TIMEOUT_MS)  # shown once the window has laid it out
    window.chat.stop_button.click()
    answered(qtbot, window)
    view = window.chat.messages[-1]
    (block,) = view.tool_calls
    assert view.state == "stopped" and block.error and "error" in block.toggle.text()
    assert block.output_label.text() == "KeyboardInterrupt: the user stopped the call"
    (_, answer) = window.conversations.messages(window.current)
    assert answer.state == "stopped" and answer.tool_calls[0].error
    assert answer.harmony[-1] == Message.builtin_result("python", "KeyboardInterrupt: the user stopped the call")
    conversation = window.current
    window.delete_conversation(conversation)  # its python process ends
    qtbot.waitUntil(lambda: all(t.closed for t in made[2:]), timeout=TIMEOUT_MS)
    window.close()


def test_a_call_cut_off_by_a_crash_shows_as_such_and_the_export_has_the_calls(qtbot, app_dir, tmp_path):
    store = ConversationStore(app_dir / "conversations.db")
    conversation = store.new("Crashed")
    store.add(conversation, "user", "Run it")
    answer = store.add(conversation, "assistant", state="streaming")
    store.add_tool_call(answer, "python", "while True: pass")  # the app died while it ran
    done = store.add(conversation, "assistant", "Done.")
    call = store.add_tool_call(done, "python", "print(1)")
    store.finish_tool_call(call, ToolOutput("1\n", display="1\n"), 0.25, [("/x/plot.png", png())])
    store.close()
    window, _ = open_window(qtbot, lambda _: ANSWER, Tools())
    cut, finished = (m.tool_calls[0] for m in window.chat.messages[1:])
    assert cut.toggle.text() == "python · cut off" and window.chat.messages[1].note.text().startswith("cut off")
    assert finished.toggle.text() == "python · 0.2 s" and len(finished.pictures) == 1
    window.export_conversation(conversation, tmp_path / "crashed.md")
    window.export_conversation(conversation, tmp_path / "crashed.json")
    markdown = (tmp_path / "crashed.md").read_text()
    assert "<details><summary>python</summary>" in markdown and "while True: pass" in markdown
    exported = json.loads((tmp_path / "crashed.json").read_text())
    assert exported["messages"][2]["tool_calls"] == [
        {"recipient": "python", "content": "print(1)", "output": "1\n", "error": False, "files": ["/x/plot.png"]}
    ]
    window.close()


def test_the_context_figure_of_a_turn_with_tools_is_what_the_conversation_takes(qtbot, app_dir):
    window, model = open_window(qtbot, python_then_answer, Tools())
    window.chat.tool_bar.toggles[PYTHON].setChecked(True)
    send(window, "What is 6 times 7?")
    answered(qtbot, window)
    stored = window.conversations.messages(window.current)
    conversation = conversation_for(stored, window.settings)
    conversation.builtin_tools = (PYTHON,)
    used = len(render_prompt(conversation))
    assert window.context_label.text() == f"context {used} of 8192 tokens"
    assert used < window.conversations.messages(window.current)[1].stats["prompt_tokens"]  # two prompts, summed
    window.close()

"""The desktop app: real Qt widgets (offscreen), the tiny synthetic model, a real SQLite file, a local hub."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("PySide6", reason="the desktop app needs the app extra")

from PySide6.QtCore import QElapsedTimer, QTimer  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from mlx_oss.app.file_errors import os_error_words  # noqa: E402
from mlx_oss.app.main_window import MainWindow  # noqa: E402
from mlx_oss.app.settings import AppSettings  # noqa: E402
from mlx_oss.app.storage import SCHEMA_VERSION, ConversationStore, StorageError  # noqa: E402
from mlx_oss.errors import MlxOssError  # noqa: E402
from mlx_oss.store import ModelStore  # noqa: E402

TIMEOUT_MS = 60_000


@pytest.fixture
def app_dir(tmp_path, monkeypatch, tiny_checkpoint) -> Path:
    """A fresh app folder whose settings point at the tiny model; the model store is empty."""
    monkeypatch.setenv("MLX_OSS_APP_DIR", str(tmp_path / "app"))
    monkeypatch.setenv("MLX_OSS_MODELS", str(tmp_path / "store"))
    AppSettings(model=str(tiny_checkpoint), temperature=0.0, max_tokens=12).save()
    return tmp_path / "app"


def open_window(qtbot) -> MainWindow:
    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    return window


def close(window: MainWindow) -> None:
    window.close()


def db_rows(app_dir: Path) -> list[tuple]:
    """The messages as another reader of the file sees them (what survives if the app dies now)."""
    with sqlite3.connect(app_dir / "conversations.db") as db:
        return db.execute("SELECT role, content, state FROM messages ORDER BY id").fetchall()


def send(window: MainWindow, text: str) -> None:
    window.chat.input.setPlainText(text)
    window.chat.send_button.click()


def test_a_message_streams_into_the_view_and_the_file_and_the_window_stays_responsive(qtbot, app_dir):
    window = open_window(qtbot)
    gaps, clock = [], QElapsedTimer()
    ticker = QTimer(interval=5)
    ticker.timeout.connect(lambda: gaps.append(clock.restart()))
    send(window, "Hello there")  # loads the model first (on its thread), then answers
    clock.start()
    ticker.start()
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    ticker.stop()
    rows = db_rows(app_dir)
    assert [r[0] for r in rows] == ["user", "assistant"] and rows[0][1] == "Hello there"
    assert rows[1][2] == "done" and rows[1][1] == window.chat.messages[-1].content != ""
    assert "tokens/s" in window.speed_label.text() and "of 8192 tokens" in window.context_label.text()
    assert window.list.count() == 1 and window.list.item(0).text() == "Hello there"
    assert len(gaps) > 20 and max(gaps) < 100, f"the event loop stalled for {max(gaps)} ms"
    close(window)


def test_stop_mid_answer_keeps_what_streamed(qtbot, app_dir):
    AppSettings(model=AppSettings.load().model, temperature=0.0, max_tokens=0).save()  # only Stop ends it
    window = open_window(qtbot)
    send(window, "Tell me everything")
    qtbot.waitUntil(lambda: len(db_rows(app_dir)) == 2 and len(db_rows(app_dir)[1][1]) > 40, timeout=TIMEOUT_MS)
    assert db_rows(app_dir)[1][2] == "streaming"  # on disk while it streams
    window.chat.stop_button.click()
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    (_, content, state) = db_rows(app_dir)[1]
    assert state == "stopped" and content == window.chat.messages[-1].content
    assert window.chat.messages[-1].note.text() == "stopped"
    window.chat.regenerate_button.click()  # the stopped answer is replaced by a new one
    qtbot.waitUntil(lambda: window.streaming is not None, timeout=TIMEOUT_MS)
    window.chat.stop_button.click()
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert [r[0] for r in db_rows(app_dir)] == ["user", "assistant"]
    close(window)


def test_reopening_the_app_finds_the_conversation(qtbot, app_dir):
    window = open_window(qtbot)
    send(window, "Remember me")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    answer = window.chat.messages[-1].content
    close(window)
    again = open_window(qtbot)
    assert again.list.item(0).text() == "Remember me"
    assert [m.content for m in again.chat.messages] == ["Remember me", answer]
    send(again, "And again")  # the conversation goes on, the model sees the history
    qtbot.waitUntil(lambda: again.streaming is None, timeout=TIMEOUT_MS)
    assert [r[0] for r in db_rows(app_dir)] == ["user", "assistant", "user", "assistant"]
    close(again)


def test_a_killed_app_loses_only_the_unwritten_tokens(app_dir):
    AppSettings(model=AppSettings.load().model, temperature=0.0, max_tokens=0).save()
    runner = Path(__file__).with_name("app_runner.py")
    proc = subprocess.Popen([sys.executable, str(runner), "Keep talking"], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                rows = db_rows(app_dir) if (app_dir / "conversations.db").exists() else []
            except sqlite3.OperationalError:  # the app has created the file but not yet its tables
                rows = []
            if len(rows) == 2 and len(rows[1][1]) > 100:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the app streamed nothing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    seen = rows[1][1]
    store = ConversationStore(app_dir / "conversations.db")
    (conversation,) = store.list()
    user, assistant = store.messages(conversation.id)
    assert user.content == "Keep talking"
    assert assistant.state == "interrupted" and assistant.content.startswith(seen)
    store.close()


def test_a_damaged_database_is_set_aside_with_a_message(qtbot, app_dir):
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "conversations.db").write_bytes(b"this is not a database" * 100)
    window = open_window(qtbot)
    assert window.chat.notice.isVisible() and "set aside as conversations.db.damaged-" in window.chat.notice.text()
    (aside,) = app_dir.glob("conversations.db.damaged-*")
    assert aside.read_bytes() == b"this is not a database" * 100
    send(window, "Still works")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert len(db_rows(app_dir)) == 2
    close(window)


def test_a_paste_the_tokenizer_cannot_take_goes_back_in_the_box(qtbot, app_dir):
    """A million letters in a row overflowed the tokenizer (600,000 held the interpreter lock, and so the window,
    two minutes): the message is refused at once, kept, and nothing is saved."""
    window = open_window(qtbot)
    paste = "a" * 20_001
    send(window, paste)
    assert "more than 20000 letters, symbols or spaces in a row" in window.chat.banner.text()
    assert window.chat.input.toPlainText() == paste and window.streaming is None
    assert not (app_dir / "conversations.db").exists() or db_rows(app_dir) == []
    send(window, "Shorter: " + "a" * 300)
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert [row[0] for row in db_rows(app_dir)] == ["user", "assistant"]
    close(window)


def test_first_run_without_a_model_leads_to_the_model_manager(qtbot, app_dir):
    AppSettings().save()  # the default: openai/gpt-oss-20b, not in the (empty) store
    window = open_window(qtbot)
    assert "openai/gpt-oss-20b is not on this computer" in window.chat.banner.text()
    assert window.tabs.currentWidget() is window.models and not window.chat.send_button.isEnabled()
    close(window)


def test_a_broken_model_is_a_message_not_a_crash(qtbot, app_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    AppSettings(model=str(broken)).save()
    window = open_window(qtbot)
    send(window, "Hello?")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert "could not be loaded" in window.chat.banner.text() and "config.json" in window.chat.banner.text()
    assert db_rows(app_dir)[-1][2] == "failed"
    assert window.chat.send_button.isEnabled()  # fix the settings and go on
    close(window)


def test_settings_are_saved_and_used_for_the_next_message(qtbot, app_dir):
    window = open_window(qtbot)
    view = window.settings_view
    view.temperature.setValue(0.7)
    view.max_tokens.setValue(5)
    view.effort.setCurrentText("high")
    view.system_prompt.setPlainText("Answer in French.")
    view.save_button.click()
    assert "Saved" in view.message.text()
    saved = AppSettings.load()
    assert (saved.temperature, saved.max_tokens, saved.reasoning_effort) == (0.7, 5, "high")
    assert saved.system_prompt == "Answer in French."
    send(window, "Bonjour")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    (assistant,) = [m for m in window.conversations.messages(window.current) if m.role == "assistant"]
    assert assistant.stats["generated_tokens"] == 5
    close(window)
    again = open_window(qtbot)
    assert again.settings_view.temperature.value() == 0.7
    close(again)


def test_search_rename_export_and_delete(qtbot, app_dir, tmp_path):
    window = open_window(qtbot)
    store = window.conversations
    first, second = store.new("Trip to Lyon"), store.new("Soup recipes")
    store.add(first, "user", "Which train goes to Lyon?")
    store.add(second, "user", "A soup with leeks")
    window.refresh_list()
    window.search.setText("train")
    assert [window.list.item(i).text() for i in range(window.list.count())] == ["Trip to Lyon"]
    window.search.setText("")
    window.rename_conversation(first, "Lyon by train")
    assert "Lyon by train" in [window.list.item(i).text() for i in range(window.list.count())]
    window.export_conversation(first, tmp_path / "trip.md")
    window.export_conversation(first, tmp_path / "trip.json")
    assert (tmp_path / "trip.md").read_text().startswith("# Lyon by train\n")
    assert "Which train goes to Lyon?" in (tmp_path / "trip.md").read_text()
    assert json.loads((tmp_path / "trip.json").read_text())["messages"][0]["content"] == "Which train goes to Lyon?"
    window.delete_conversation(second)
    assert [s.title for s in store.list()] == ["Lyon by train"]
    close(window)


def test_the_model_manager_downloads_converts_and_deletes(qtbot, app_dir, tiny_checkpoint, monkeypatch):
    from fakehub import FakeHub

    name = "openai/gpt-oss-tiny"
    with FakeHub() as hub:
        hub.add_repo(name, tiny_checkpoint)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        window = open_window(qtbot)
        models = window.models
        models.name_edit.setText(name)
        models.download_button.click()
        assert models.cancel_button.isEnabled()
        qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
    assert f"{name} downloaded" in models.status.text()
    models.select(name)
    assert models.table.item(0, 1).text() == "hf" and models.convert_numpy_button.isEnabled()
    models.convert_numpy_button.click()
    qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
    assert "converted to the numpy layout" in models.status.text()
    assert models.table.item(0, 1).text() == "hf, numpy"
    assert models.pack_button.isEnabled()
    models.pack_button.click()
    qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
    assert "converted to the packed layout" in models.status.text() and not models.pack_button.isEnabled()
    assert models.table.item(0, 1).text() == "hf, numpy, packed"
    models.use_button.click()
    assert window.settings.model == name and AppSettings.load().model == name
    assert window.tabs.currentWidget() is window.chat
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    models.select(name)
    models.delete_button.click()
    assert models.table.rowCount() == 0 and not ModelStore().folder(name).exists()
    close(window)


def test_a_download_can_be_cancelled_and_resumed_from_the_manager(qtbot, app_dir, tiny_checkpoint, monkeypatch):
    from fakehub import FakeHub

    name = "openai/gpt-oss-tiny"
    with FakeHub() as hub:
        hub.add_repo(name, tiny_checkpoint)
        hub.throttle(0.003)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        window = open_window(qtbot)
        models = window.models
        models.name_edit.setText(name)
        models.download_button.click()
        qtbot.waitUntil(lambda: models.progress.value() > 50, timeout=TIMEOUT_MS)
        models.cancel_button.click()
        qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
        assert "cancelled; run it again to resume" in models.status.text()
        assert "partial download" in models.table.item(0, 3).text()
        hub.throttle(0)
        hub.reset_stats()
        models.download_button.click()
        qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
        total = sum(f.size for f in hub.repo(name).files.values())
        assert f"{name} downloaded" in models.status.text()
        assert sum(hub.bytes_sent(name, f) for f in hub.repo(name).files) < total
    close(window)


def test_the_screenshot_script_renders_three_windows(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "screenshots.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from PySide6.QtGui import QImage

    for name in ("chat.png", "models.png", "settings.png"):
        image = QImage(str(tmp_path / name))
        assert image.width() >= 1000 and image.height() >= 700, name


def test_the_server_starts_and_stops_from_the_app(qtbot, app_dir, tiny_checkpoint):
    import httpx
    import openai
    from serving import free_port

    window = open_window(qtbot)
    server = window.settings_view.server
    server.port.setValue(free_port())
    server.toggle.setChecked(True)
    qtbot.waitUntil(lambda: server.running, timeout=TIMEOUT_MS)
    assert server.status.text() == f"serving {tiny_checkpoint} at {server.url}"
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    (model,) = client.models.list().data
    reply = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3
    server.toggle.setChecked(False)
    qtbot.waitUntil(lambda: server.process is None, timeout=TIMEOUT_MS)
    assert server.status.text() == "off"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/models", timeout=2)
    close(window)


def test_self_check_reports_one_line_and_touches_nothing_of_the_users(app_dir):
    before = sorted(app_dir.rglob("*")) if app_dir.exists() else []
    out = subprocess.run(
        [sys.executable, "-m", "mlx_oss.app", "--self-check"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mlx-oss self-check: ok: Qt ") and out.stdout.count("\n") == 1
    assert "5 tokens generated on numpy" in out.stdout
    assert (sorted(app_dir.rglob("*")) if app_dir.exists() else []) == before


def test_a_busy_database_is_left_alone_not_set_aside(app_dir):
    store = ConversationStore(app_dir / "conversations.db")
    store.add(store.new("Keep me"), "user", "important")
    store.close()
    holder = sqlite3.connect(app_dir / "conversations.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the file
    try:
        with pytest.raises(
            MlxOssError,
            match=r"in .*: another program is using it \(database is locked\); is mlx-oss already running\?$",
        ):
            ConversationStore(app_dir / "conversations.db", busy_timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(app_dir.glob("*.damaged-*"))
    assert [s.title for s in ConversationStore(app_dir / "conversations.db").list()] == ["Keep me"]


def test_a_bad_setting_falls_back_alone(app_dir):
    (app_dir / "settings.json").write_text(
        json.dumps({"backend": "quantum", "system_prompt": "Keep me", "max_tokens": True, "temperature": 0})
    )
    settings = AppSettings.load()
    assert settings.backend == "auto" and settings.max_tokens == 0  # the bad values: defaults
    assert settings.system_prompt == "Keep me" and settings.temperature == 0.0  # the good ones: kept


def test_the_model_manager_quantizes_a_fine_tune_with_unquantized_experts(
    qtbot, app_dir, synthetic_checkpoint, monkeypatch
):
    from fakehub import FakeHub

    name = "someone/gpt-oss-tiny-finetune"
    with FakeHub() as hub:
        hub.add_repo(name, synthetic_checkpoint(num_hidden_layers=2, vocab_size=1000, unquantized=True))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        window = open_window(qtbot)
        models = window.models
        models.name_edit.setText(name)
        models.download_button.click()
        qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
    models.select(name)
    assert "Quantize to MXFP4" in models.table.item(0, 3).text()
    assert models.quantize_button.isEnabled() and not models.use_button.isEnabled()
    assert not models.convert_numpy_button.isEnabled()
    models.quantize_button.click()
    qtbot.waitUntil(lambda: models.task is None, timeout=TIMEOUT_MS)
    assert "converted to the mxfp4 layout" in models.status.text()
    models.select(name)
    assert models.table.item(0, 1).text() == "hf, mxfp4" and models.table.item(0, 3).text() == "ready"
    assert models.use_button.isEnabled() and models.convert_numpy_button.isEnabled()
    assert not models.quantize_button.isEnabled()
    close(window)


# -- the app's data kept: files it cannot use as they are -----------------------------------------------------------


def disk_full_error() -> sqlite3.OperationalError:
    """A real SQLITE_FULL, from SQLite itself: a database capped at its size and asked to grow."""
    scratch = sqlite3.connect(":memory:")
    scratch.execute("CREATE TABLE t (x)")
    scratch.execute(f"PRAGMA max_page_count = {scratch.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        scratch.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    except sqlite3.OperationalError as e:
        return e
    finally:
        scratch.close()
    raise AssertionError("SQLite did not refuse to grow")


class FullDisk:
    """The store's connection, its writes failing as on a full disk after `after` streamed pieces (reads pass)."""

    def __init__(self, db: sqlite3.Connection, after: int):
        self.db, self.after, self.pieces, self.full = db, after, 0, False
        self.failing = ("INSERT", "UPDATE", "DELETE")  # what a full disk refuses; a DELETE can free pages

    def execute(self, sql: str, parameters=()):
        if sql.startswith("UPDATE messages SET content"):
            self.pieces += 1
            self.full = self.full or self.pieces > self.after
        if self.full and sql.split()[0] in self.failing:
            raise disk_full_error()
        return self.db.execute(sql, parameters)

    def close(self) -> None:
        self.db.close()


def saved_answers(app_dir: Path) -> list[tuple]:
    with sqlite3.connect(app_dir / "conversations.db") as db:
        return db.execute(
            "SELECT content, reasoning, state FROM messages WHERE role = 'assistant' ORDER BY id"
        ).fetchall()


def test_a_full_disk_mid_answer_says_so_keeps_what_was_saved_and_the_window_stays_usable(qtbot, app_dir):
    AppSettings(model=AppSettings.load().model, temperature=0.0, max_tokens=0).save()  # it ends on the full disk
    window = open_window(qtbot)
    disk = window.conversations.db = FullDisk(window.conversations.db, after=3)
    send(window, "Fill the disk")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert disk.full and "Could not save: the disk is full (database or disk is full)" in window.chat.banner.text()
    ((content, reasoning, state),) = saved_answers(app_dir)
    view = window.chat.messages[-1]
    assert (view.content, view.reasoning_text) == (content, reasoning) != ("", "")  # the view: what was saved
    assert state == "streaming" and view.note.text() == "failed"  # the file reads it as cut off when reopened
    assert window.new_button.isEnabled() and window.list.isEnabled() and window.chat.send_button.isEnabled()

    send(window, "Still full?")  # still full: the message is not lost but back in the box, nothing half-sent
    assert "Your message was not sent" in window.chat.banner.text()
    assert window.chat.input.toPlainText() == "Still full?" and window.streaming is None
    assert len(db_rows(app_dir)) == 2 and [m.content for m in window.chat.messages][-2] == "Fill the disk"
    disk.full, disk.after = False, 10**9  # space is back
    window.settings.max_tokens = 12
    window.chat.send_button.click()
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert [a[2] for a in saved_answers(app_dir)] == ["streaming", "done"]
    answers, shown = saved_answers(app_dir), window.chat.messages[-1].content
    disk.full, disk.failing = True, ("INSERT",)  # the old answer could be deleted, the new one not written
    window.chat.regenerate_button.click()
    assert "The answer is kept as it was." in window.chat.banner.text() and window.streaming is None
    assert saved_answers(app_dir) == answers and window.chat.messages[-1].content == shown
    disk.full = False
    window.new_conversation()
    assert window.list.count() == 2
    close(window)
    again = ConversationStore(app_dir / "conversations.db")
    (conversation,) = [c for c in again.list() if c.title == "Fill the disk"]
    assert [(m.role, m.state) for m in again.messages(conversation.id)] == [
        ("user", "done"),
        ("assistant", "interrupted"),
        ("user", "done"),
        ("assistant", "done"),
    ]
    again.close()


def test_another_program_holding_the_file_mid_answer_stops_it_with_words_and_the_window_goes_on(qtbot, app_dir):
    AppSettings(model=AppSettings.load().model, temperature=0.0, max_tokens=0).save()
    window = open_window(qtbot)
    send(window, "Go on")
    qtbot.waitUntil(lambda: len(db_rows(app_dir)) == 2 and len(db_rows(app_dir)[1][1]) > 20, timeout=TIMEOUT_MS)
    holder = sqlite3.connect(app_dir / "conversations.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # e.g. a database browser with unsaved changes: writing is blocked
    try:
        qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
        assert "Could not save: another program is using it (database is locked); is mlx-oss already running?" in (
            window.chat.banner.text()
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    ((content, _, state),) = saved_answers(app_dir)
    assert content == window.chat.messages[-1].content and state == "streaming"
    window.settings.max_tokens = 5
    send(window, "Once more")  # the other program let go
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert [a[2] for a in saved_answers(app_dir)] == ["streaming", "done"]
    close(window)


def newer_database(app_dir: Path) -> Path:
    """A conversation file as a newer mlx-oss might leave it: a higher schema version and a column more."""
    path = app_dir / "conversations.db"
    store = ConversationStore(path)
    conversation = store.new("From the future")
    store.add(conversation, "user", "Will you keep this?")
    store.finish(store.add(conversation, "assistant", "Yes."), "done")
    store.db.execute("ALTER TABLE messages ADD COLUMN attachments TEXT")
    store.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store.close()  # the last connection: SQLite folds the journal into the file and removes it
    return path


def test_a_database_from_a_newer_mlx_oss_is_shown_read_only_and_left_byte_for_byte(qtbot, app_dir):
    path = newer_database(app_dir)
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    window = open_window(qtbot)
    assert window.list.count() == 1 and window.list.item(0).text() == "From the future"
    assert [m.content for m in window.chat.messages] == ["Will you keep this?", "Yes."]
    assert "made by a newer mlx-oss; update mlx-oss to add to it" in window.chat.notice.text()
    assert window.chat.notice.isVisible()
    assert not window.new_button.isEnabled() and not window.chat.send_button.isEnabled()
    assert not window.chat.regenerate_button.isEnabled()
    window.new_conversation()  # nothing reaches the file, whatever is clicked
    send(window, "Add this")
    window.regenerate()
    window.settings_view.save_button.click()  # a settings change re-checks the model: still no sending
    assert not window.chat.send_button.isEnabled() and window.list.count() == 1
    close(window)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert not list(app_dir.glob("*.damaged-*"))  # nothing set aside


def test_an_uncreatable_data_folder_is_one_message_and_the_window_still_chats(qtbot, app_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = blocker / "mlx-oss"  # mkdir fails here even for root (NotADirectoryError), as a read-only disk would
    window = MainWindow(database=folder / "conversations.db")
    qtbot.addWidget(window)
    window.show()
    assert window.chat.notice.text() == (
        f"Conversations are not being saved: cannot create the folder {folder}: a part of the path is a file, not "
        "a folder (Not a directory). The chats of this session are lost when the window closes; fix this and "
        "restart mlx-oss to keep them."
    )
    send(window, "Hello anyway")  # the model, the chat and the list work; only keeping them does not
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert window.list.count() == 1 and window.chat.messages[-1].state == "done"
    close(window)
    assert blocker.read_text() == "not a folder"


def test_the_app_opens_on_a_data_folder_that_cannot_exist_and_says_so(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    runner = Path(__file__).with_name("app_runner.py")
    env = dict(os.environ, MLX_OSS_APP_DIR=str(blocker / "mlx-oss"))
    command = [sys.executable, str(runner), "--report"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    (notice,) = [line for line in out.stdout.splitlines() if line.startswith("notice: ")]
    assert f"Conversations are not being saved: cannot create the folder {blocker / 'mlx-oss'}: a part" in notice
    assert f"The settings in {blocker / 'mlx-oss' / 'settings.json'} could not all be used" in notice
    assert blocker.read_text() == "not a folder"


def test_storage_errors_say_what_happened(tmp_path):
    (tmp_path / "a-folder.db").mkdir()
    with pytest.raises(StorageError, match=r"a-folder.db: it is a folder$"):
        ConversationStore(tmp_path / "a-folder.db")
    os.mkfifo(tmp_path / "a-pipe.db")  # SQLite reads a pipe as "disk I/O error"
    with pytest.raises(StorageError, match=r"a-pipe.db: it is not a regular file$"):
        ConversationStore(tmp_path / "a-pipe.db")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match=r"cannot create the folder .*a-file/sub: a part of the path is a file"):
        ConversationStore(tmp_path / "a-file" / "sub" / "conversations.db")
    store = ConversationStore(tmp_path / "conversations.db")
    conversation = store.new()
    store.db = FullDisk(store.db, after=0)
    store.db.full = True
    with pytest.raises(StorageError, match=r"^could not save: the disk is full \(database or disk is full\)$"):
        store.add(conversation, "user", "hello")
    assert (
        os_error_words(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "the disk is full (No space left on device)"
    )
    assert os_error_words(OSError(errno.EROFS, os.strerror(errno.EROFS))).startswith("the file system is read-only")
    assert os_error_words(PermissionError(errno.EACCES, os.strerror(errno.EACCES))) == "permission denied"
    store.close()


def test_without_root_powers_files_say_permission_denied_or_open_read_only():
    """Without root's power to ignore file permissions: a file it may only read is shown read-only, one it may not
    read is 'permission denied', each in its own words. The child stays root but gives up every capability, so it
    still reaches the checkout and its venv wherever they lie (another user could not enter a private /tmp)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to give up root's capabilities")
    folder = Path(tempfile.mkdtemp(prefix="mlx-oss-permissions-"))
    try:
        for name in ("readable.db", "unreadable.db"):
            store = ConversationStore(folder / name)
            store.add(store.new("Mine"), "user", "hello")
            store.close()
        (folder / "readable.db").chmod(0o444)
        (folder / "unreadable.db").chmod(0o000)
        folder.chmod(0o777)
        script = (
            "import sys; from mlx_oss.app.storage import open_conversations\n"
            "for name in sys.argv[1:]:\n"
            "    store = open_conversations(name)\n"
            "    print(bool(store.read_only), [c.title for c in store.list()], store.notice)\n"
        )
        powerless = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
        files = [str(folder / "readable.db"), str(folder / "unreadable.db")]
        out = subprocess.run([*powerless, sys.executable, "-c", script, *files], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        readable, unreadable = out.stdout.splitlines()
        assert readable.startswith("True ['Mine'] The conversations in") and "are shown read-only" in readable
        assert unreadable.startswith("False [] Conversations are not being saved: cannot open the conversations")
        assert "unreadable.db: permission denied (unable to open database file)" in unreadable
    finally:
        shutil.rmtree(folder)


def test_a_file_that_cannot_be_written_is_shown_read_only(tmp_path):
    path = tmp_path / "conversations.db"
    store = ConversationStore(path)
    store.add(store.new("Kept"), "user", "hello")
    store.close()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:  # even root cannot write it
        pytest.skip("chattr +i is not available here")
    try:
        before = path.read_bytes()
        store = ConversationStore(path)
        assert "are shown read-only: the file or its folder is read-only" in store.notice
        assert [c.title for c in store.list()] == ["Kept"]
        with pytest.raises(StorageError, match=r"^could not save: the file or its folder is read-only"):
            store.new()
        store.close()
        assert path.read_bytes() == before
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_empty_or_truncated_conversation_file(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # what a crash right after creating it leaves: SQLite's empty database
    store = ConversationStore(empty)
    assert store.notice is None and store.list() == []
    store.close()
    whole = tmp_path / "whole.db"
    store = ConversationStore(whole)
    for i in range(50):
        store.add(store.new(f"chat {i}"), "user", "x" * 2000)
    store.close()
    truncated = tmp_path / "truncated.db"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])  # cut mid-page
    store = ConversationStore(truncated)
    assert "set aside as truncated.db.damaged-" in store.notice and store.list() == []
    store.close()
    (aside,) = tmp_path.glob("truncated.db.damaged-*")
    assert aside.read_bytes() == data[: len(data) // 2 + 100]


BAD_SETTINGS = {
    "malformed": b'{"model": "x", ',
    "not UTF-8": '{"system_prompt": "caf\xe9"}'.encode("latin-1"),
    "nested 200,000 deep": b"[" * 200_000 + b"]" * 200_000,
    "not an object": b'["model"]',
    "a 5000-digit number": b'{"max_tokens": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("content", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_an_unreadable_settings_file_gives_the_defaults_says_so_once_and_is_kept(qtbot, app_dir, content):
    (app_dir / "settings.json").write_bytes(content)
    window = open_window(qtbot)
    assert window.settings == AppSettings()
    assert f"The settings in {app_dir / 'settings.json'} could not all be used (it is not" in window.chat.notice.text()
    (kept,) = app_dir.glob("settings.json.unreadable-*")
    assert kept.read_bytes() == content and kept.name in window.chat.notice.text()
    close(window)
    again = open_window(qtbot)  # said once: the file in place now holds what could be used
    assert "settings" not in again.chat.notice.text() and again.settings == AppSettings()
    close(again)


def test_settings_of_the_wrong_type_fall_back_one_by_one_and_the_file_is_kept(qtbot, app_dir, tiny_checkpoint):
    written = json.dumps(
        {
            "model": str(tiny_checkpoint),
            "temperature": "hot",
            "top_p": None,
            "context_length": 10**9,
            "max_tokens": [5],
            "system_prompt": "Keep me",
            "backend": "numpy",
        }
    ).encode()
    (app_dir / "settings.json").write_bytes(written)
    window = open_window(qtbot)
    settings = window.settings
    assert (settings.model, settings.system_prompt, settings.backend) == (str(tiny_checkpoint), "Keep me", "numpy")
    assert (settings.temperature, settings.top_p, settings.context_length, settings.max_tokens) == (1.0, 1.0, 8192, 0)
    notice = window.chat.notice.text()
    assert "temperature must be a number, not 'hot'" in notice and "context_length 1000000000" in notice
    (kept,) = app_dir.glob("settings.json.unreadable-*")
    assert kept.read_bytes() == written  # the later Save writes over settings.json, never over the user's own
    assert AppSettings.load() == settings
    close(window)


def test_settings_that_cannot_be_saved_say_why_and_keep_the_file(qtbot, app_dir, monkeypatch):
    before = (app_dir / "settings.json").read_bytes()
    window = open_window(qtbot)

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    window.settings_view.temperature.setValue(0.5)
    window.settings_view.save_button.click()
    assert window.settings_view.message.text() == (
        f"Not saved: could not save the settings in {app_dir / 'settings.json'}: the disk is full "
        "(No space left on device)"
    )
    assert (app_dir / "settings.json").read_bytes() == before and not list(app_dir.glob(".settings.json.tmp"))
    assert not list(app_dir.glob(".settings.json.*"))  # the writer's temporary files have unique names
    close(window)


def test_an_export_that_cannot_be_written_says_why(qtbot, app_dir, tmp_path):
    window = open_window(qtbot)
    conversation = window.conversations.new("Trip")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(MlxOssError, match=r"could not export to .*a-file/trip.md: a part of the path is a file"):
        window.export_conversation(conversation, tmp_path / "a-file" / "trip.md")
    close(window)

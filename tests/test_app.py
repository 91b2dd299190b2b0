"""The desktop app: real Qt widgets (offscreen), the tiny synthetic model, a real SQLite file, a local hub."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("PySide6", reason="the desktop app needs the app extra")

from PySide6.QtCore import QElapsedTimer, QTimer  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from mlx_oss.app.main_window import MainWindow  # noqa: E402
from mlx_oss.app.settings import AppSettings  # noqa: E402
from mlx_oss.app.storage import ConversationStore  # noqa: E402
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
    assert window.chat.banner.isVisible() and "set aside as conversations.db.damaged-" in window.chat.banner.text()
    (aside,) = app_dir.glob("conversations.db.damaged-*")
    assert aside.read_bytes() == b"this is not a database" * 100
    send(window, "Still works")
    qtbot.waitUntil(lambda: window.streaming is None, timeout=TIMEOUT_MS)
    assert len(db_rows(app_dir)) == 2
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
    from test_server import free_port

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
            match=r"cannot open the conversations in .*: database is locked \(is mlx-oss already running\?\)",
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

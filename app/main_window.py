"""The main window: conversations on the left; chat, models and settings on the right; figures in the status bar.

The window owns the conversation file and is the only writer to it. The model lives on `ModelHost`'s thread and
speaks through signals; every streamed piece is written to the file as it arrives, then shown (at most every
50 ms). Settings apply from the next message: a changed model, backend or context reloads the model first.

The file can fail under it (a full disk, another program holding it): each such failure is a `StorageError`
shown in the window, what was saved stays, and the window stays usable. An answer whose piece could not be saved
is stopped there, so the view never shows more than the file keeps.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMenu,
    QMessageBox,
    QPushButton,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from mlx_oss.cancel import CancelToken
from mlx_oss.engine import Done
from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import Conversation, Message, encoding
from mlx_oss.render_limits import MAX_RUN, longest_run
from mlx_oss.store import ModelStore, resolve_model

from .chat_view import ChatView, MessageView
from .file_errors import os_error_words, sentence
from .models_view import ModelsView
from .settings import AppSettings, data_dir, load_for_window, work_dir
from .settings_view import SettingsView
from .storage import DEFAULT_TITLE, StorageError, open_conversations
from .workers import ModelHost, ToolCheck, ToolFactory, ToolRequest

TITLE_LENGTH = 48


def conversation_for(messages, settings: AppSettings) -> Conversation:
    """What the model sees: the finished turns (reasoning included; harmony drops what the format says to). A turn
    with built-in tool calls is sent as the model saw it (its calls and their results), as stored with it."""
    turns: list[Message] = []
    for m in messages:
        if m.role == "user":
            turns.append(Message.user(m.content))
        elif m.harmony and m.state in ("done", "stopped", "interrupted"):
            turns.extend(m.harmony)
        elif m.state in ("done", "stopped", "interrupted") and m.content:
            if m.reasoning:
                turns.append(Message.reasoning(m.reasoning))
            turns.append(Message.answer(m.content))
    return Conversation(
        turns,
        reasoning_effort=settings.reasoning_effort,
        instructions=settings.system_prompt or None,
        current_date=datetime.date.today().isoformat(),
    )


class MainWindow(QMainWindow):
    def __init__(
        self, store: ModelStore | None = None, database: Path | None = None, tool_factory: ToolFactory | None = None
    ):
        super().__init__()
        self.setWindowTitle("mlx-oss")
        self.resize(1100, 720)
        self.settings, settings_notice = load_for_window()
        self.store = store or ModelStore()
        self.conversations = open_conversations(database or data_dir() / "conversations.db")
        # openai-harmony holds the GIL while it reads the vocabulary (a visible pause): do it before the window shows,
        # not on the model's thread while the user waits for an answer.
        encoding()
        self.tool_factory = tool_factory  # None: the real python and browser tools (tests pass their own)
        self.host = ModelHost(self.store, tool_factory)
        self.tool_check: ToolCheck | None = None  # the latest availability check
        self.tool_checks: list[ToolCheck] = []  # the checks whose threads still run
        self.tool_call = None  # (stored id, view) of the built-in tool call running now
        self.context_used: int | None = None  # what a turn of several steps left in the context
        QApplication.instance().aboutToQuit.connect(self.shut_down)
        self.loaded_key: tuple | None = None  # (model, backend, context) the engine holds
        self.loading = False
        self.load_number = 0  # of the latest load request: answers to earlier ones are stale
        self.model_ok = False
        self.pending = False  # a generation waits for the model to load
        self.current: int | None = None
        self.streaming: tuple[int, MessageView] | None = None
        self.cancel: CancelToken | None = None
        self.save_failed = False  # a streamed piece could not be saved: the answer ends there

        self.search = QLineEdit(placeholderText="Search conversations")
        self.list = QListWidget()
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.new_button = QPushButton("New chat")
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.addWidget(self.new_button)
        side_layout.addWidget(self.search)
        side_layout.addWidget(self.list, 1)

        self.chat = ChatView()
        self.models = ModelsView(self.store)
        self.models.set_context(self.settings.context_length, self.settings.backend)
        self.settings_view = SettingsView(self.settings, [m.name for m in self.store.list()])
        self.tabs = QTabWidget()
        self.tabs.addTab(self.chat, "Chat")
        self.tabs.addTab(self.models, "Models")
        self.tabs.addTab(self.settings_view, "Settings")
        splitter = QSplitter()
        splitter.addWidget(side)
        splitter.addWidget(self.tabs)
        splitter.setSizes([260, 840])
        self.setCentralWidget(splitter)

        self.model_label, self.speed_label, self.context_label = QLabel(), QLabel(), QLabel()
        for label in (self.model_label, self.speed_label, self.context_label):
            self.statusBar().addPermanentWidget(label)

        self.new_button.clicked.connect(self.new_conversation)
        self.search.textChanged.connect(self.refresh_list)
        self.list.currentItemChanged.connect(self._conversation_chosen)
        self.list.customContextMenuRequested.connect(self._list_menu)
        self.chat.send_requested.connect(self.send)
        self.chat.stop_requested.connect(self.stop)
        self.chat.regenerate_requested.connect(self.regenerate)
        self.models.use_requested.connect(self.use_model)
        self.models.changed.connect(self._store_changed)
        self.settings_view.saved.connect(self._settings_saved)
        self.host.loaded.connect(self._loaded)
        self.host.load_failed.connect(self._load_failed)
        self.host.reasoning.connect(self._reasoning)
        self.host.answer.connect(self._answer)
        self.host.finished.connect(self._finished)
        self.host.failed.connect(self._failed)
        self.host.tool_started.connect(self._tool_started)
        self.host.tool_finished.connect(self._tool_finished)
        self.host.turn_messages.connect(self._turn_messages)
        self.host.context_used.connect(self._context_used)
        self.chat.tool_bar.tools_changed.connect(self._tools_changed)
        self.chat.tool_bar.open_folder_requested.connect(self.open_work_dir)

        self.chat.show_notice("\n\n".join(filter(None, [self.conversations.notice, settings_notice])))
        self.new_button.setEnabled(self.writable)
        self.refresh_list()
        if self.list.count():
            self.list.setCurrentRow(0)
        self.check_model()
        self.check_tools()

    # -- model -----------------------------------------------------------------------------------------------

    def check_model(self) -> bool:
        """Say in the window, not in a crash, when the chosen model is not there; lead to the Models tab."""
        try:
            resolve_model(self.settings.model, self.settings.backend, self.store)
        except MlxOssError as e:
            self.model_label.setText("no model")
            self.chat.show_banner(
                f"{e}. Open Models to download it (about 13 GB for gpt-oss-20b), or choose another model in Settings."
            )
            self.tabs.setCurrentWidget(self.models)
            self.model_ok = False
            self.chat.set_busy(self.streaming is not None, can_send=False)
            return False
        if self.loaded_key != self._wanted_key():
            self.model_label.setText(self.settings.model)
        self.model_ok = True
        self.chat.set_busy(self.streaming is not None, can_send=self.writable)
        return True

    @property
    def writable(self) -> bool:
        """False for a conversation file shown read-only (made by a newer mlx-oss, or not writable)."""
        return not self.conversations.read_only

    def _storage_failed(self, error: StorageError, then: str = "") -> None:
        self.chat.show_banner(f"{sentence(str(error))} {then}".strip())

    def _wanted_key(self) -> tuple:
        return (self.settings.model, self.settings.backend, self.settings.context_length)

    def _loaded(self, number: int, description: str) -> None:
        if number != self.load_number:
            return
        self.loading = False
        self.model_label.setText(description)
        if self.pending:
            self.pending = False
            self._generate()

    def _load_failed(self, number: int, message: str) -> None:
        if number != self.load_number:
            return
        self.loading = self.pending = False
        self.loaded_key = None
        self.chat.show_banner(f"The model could not be loaded: {message}")
        self.model_label.setText("no model")
        if self.streaming is not None:
            self._end_stream("failed")

    # -- conversations ---------------------------------------------------------------------------------------

    def refresh_list(self) -> None:
        try:
            found = self.conversations.list(self.search.text().strip())
        except StorageError as e:
            self._storage_failed(e)
            return
        self.list.blockSignals(True)
        self.list.clear()
        for summary in found:
            item = QListWidgetItem(summary.title)
            item.setData(Qt.ItemDataRole.UserRole, summary.id)
            self.list.addItem(item)
            if summary.id == self.current:
                self.list.setCurrentItem(item)
        self.list.blockSignals(False)

    def new_conversation(self) -> None:
        if self.streaming is None and self.writable:
            try:
                conversation = self.conversations.new()
            except StorageError as e:
                self._storage_failed(e)
                return
            self.open_conversation(conversation)
            self.refresh_list()

    def _conversation_chosen(self, item: QListWidgetItem | None) -> None:
        if item is not None and self.streaming is None:
            self.open_conversation(item.data(Qt.ItemDataRole.UserRole))

    def open_conversation(self, conversation: int | None) -> None:
        self.current = conversation
        self.chat.clear()
        if conversation is not None:
            try:
                messages = self.conversations.messages(conversation)
            except StorageError as e:
                self._storage_failed(e)
                messages = []
            self._show_messages(messages)
            try:
                self.chat.tool_bar.set_tools(self.conversations.tools(conversation))
            except StorageError as e:
                self._storage_failed(e)
        self.chat.tool_bar.folder_button.setEnabled(conversation is not None)
        if self.check_model():
            self.tabs.setCurrentWidget(self.chat)

    def _show_messages(self, messages) -> None:
        """The stored messages, each answer with its tool calls; a citation links to a page any call so far opened
        (the browser's cursors go on from turn to turn)."""
        citations: dict = {}
        for m in messages:
            for call in m.tool_calls:
                citations.update({c.cursor: c for c in call.citations})
            view = self.chat.add(m.role, m.content, m.reasoning, m.state, citations=dict(citations))
            for call in m.tool_calls:
                block = view.add_tool_call(call.recipient, call.content)
                output = call.display or call.output
                block.finish(output, call.error, call.seconds, call.files, call.citations, call.state)

    def rename_conversation(self, conversation: int, title: str) -> None:
        try:
            self.conversations.rename(conversation, title)
        except StorageError as e:
            self._storage_failed(e)
        self.refresh_list()

    def delete_conversation(self, conversation: int) -> None:
        try:
            self.conversations.delete(conversation)
        except StorageError as e:
            self._storage_failed(e)
            return
        self.host.close_tools_requested.emit(conversation)  # its python process ends (its folder stays)
        if conversation == self.current:
            self.open_conversation(None)
        self.refresh_list()

    def export_conversation(self, conversation: int, path: Path) -> None:
        """Raises `MlxOssError` (a `StorageError` when the conversation cannot be read) naming what went wrong."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            text = json.dumps(self.conversations.export_json(conversation), indent=2, ensure_ascii=False) + "\n"
        else:
            text = self.conversations.export_markdown(conversation)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise MlxOssError(f"could not export to {path}: {os_error_words(e)}") from None

    def _list_menu(self, position) -> None:
        item = self.list.itemAt(position)
        if item is None or self.streaming is not None:
            return
        conversation = item.data(Qt.ItemDataRole.UserRole)
        menu = QMenu(self)
        rename = menu.addAction("Rename…") if self.writable else None
        export_md = menu.addAction("Export as Markdown…")
        export_json = menu.addAction("Export as JSON…")
        delete = menu.addAction("Delete…") if self.writable else None
        chosen = menu.exec(self.list.mapToGlobal(position))
        if chosen is None:
            return
        if chosen is rename:
            title, ok = QInputDialog.getText(self, "Rename", "Title:", text=item.text())
            if ok:
                self.rename_conversation(conversation, title)
        elif chosen in (export_md, export_json):
            suffix = ".md" if chosen is export_md else ".json"
            path, _ = QFileDialog.getSaveFileName(self, "Export", str(Path.home() / f"{item.text()}{suffix}"))
            if path:
                try:
                    self.export_conversation(conversation, Path(path))
                except MlxOssError as e:
                    QMessageBox.warning(self, "Export", str(e))
        elif chosen is delete:
            answer = QMessageBox.question(self, "Delete", f"Delete the conversation “{item.text()}”?")
            if answer == QMessageBox.StandardButton.Yes:
                self.delete_conversation(conversation)

    # -- chatting --------------------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        if self.streaming is not None or not self.writable or not self.check_model():
            return
        if longest_run(text) > MAX_RUN:  # the tokenizer would hold the interpreter lock, and so the window, minutes
            self.chat.input.setPlainText(text)
            self.chat.show_banner(
                f"The message has more than {MAX_RUN} letters, symbols or spaces in a row, which the model's "
                "tokenizer cannot take; break the run up. It is back in the box."
            )
            return
        conversation = self.current
        try:
            with self.conversations.transaction():  # the question and its answer's row, or neither
                if conversation is None:
                    conversation = self.conversations.new()
                    self.conversations.set_tools(conversation, self.chat.tool_bar.chosen())
                if self.conversations.title(conversation) == DEFAULT_TITLE:
                    title = " ".join(text.split())
                    self.conversations.rename(
                        conversation, title[:TITLE_LENGTH] + ("…" if len(title) > TITLE_LENGTH else "")
                    )
                self.conversations.add(conversation, "user", text)
                message = self.conversations.add(conversation, "assistant", state="streaming")
        except StorageError as e:
            self.chat.input.setPlainText(text)  # what was typed is not lost: send it again once this is fixed
            self._storage_failed(e, "Your message was not sent; it is back in the box.")
            return
        self.current = conversation
        self.chat.tool_bar.folder_button.setEnabled(True)
        self.chat.add("user", text)
        self.refresh_list()
        self._start_answer(message)

    def regenerate(self) -> None:
        if self.streaming is not None or self.current is None or not self.writable:
            return
        try:
            messages = self.conversations.messages(self.current)
            if not messages or messages[-1].role != "assistant":
                return
            with self.conversations.transaction():  # the old answer goes only if the new one can be written
                self.conversations.delete_message(messages[-1].id)
                message = self.conversations.add(self.current, "assistant", state="streaming")
        except StorageError as e:
            self._storage_failed(e, "The answer is kept as it was.")
            return
        self.chat.remove_last()
        self._start_answer(message)

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel.cancel()
        if self.pending:  # still loading: the answer never started
            self.pending = False
            self._end_stream("stopped")

    def _start_answer(self, message: int) -> None:
        """Stream the answer into `message`, the assistant row just written (state `streaming`)."""
        self.save_failed = False
        self.streaming = (message, self.chat.add("assistant", state="streaming"))
        self.chat.set_busy(True)
        self.list.setEnabled(False)
        self.new_button.setEnabled(False)
        if self.loaded_key != self._wanted_key():
            self.loaded_key = self._wanted_key()
            self.loading = self.pending = True
            self.load_number += 1
            self.model_label.setText(f"loading {self.settings.model}…")
            self.host.load_requested.emit(self.load_number, *self.loaded_key)
        elif self.loading:
            self.pending = True
        else:
            self._generate()

    def _generate(self) -> None:
        try:
            history = [m for m in self.conversations.messages(self.current) if m.state != "streaming"]
        except StorageError as e:
            self._storage_failed(e)
            self._end_stream("failed")
            return
        self.cancel = CancelToken()
        conversation = conversation_for(history, self.settings)
        if self.streaming is not None:  # the answer's citations: the pages the conversation opened so far
            self.streaming[1].citations.update(
                {c.cursor: c for m in history for call in m.tool_calls for c in call.citations}
            )
        self.host.generate_requested.emit(conversation, self.settings.sampling(), self.cancel, self._tool_request())

    def _tool_request(self) -> ToolRequest | None:
        """The conversation's tools that can run here, each built with the settings of now."""
        try:
            chosen = self.conversations.tools(self.current)
        except StorageError as e:
            self._storage_failed(e)
            return None
        names = tuple(n for n in chosen if self.chat.tool_bar.reasons.get(n, "not checked") is None)
        if not names:
            return None
        return ToolRequest(self.current, names, self.settings.tool_settings(names, work_dir(self.current)))

    def _reasoning(self, text: str) -> None:
        self._piece(reasoning=text)

    def _answer(self, text: str) -> None:
        self._piece(content=text)

    def _piece(self, content: str = "", reasoning: str = "") -> None:
        """Save a streamed piece, then show it. One that cannot be saved stops the answer there: the model is
        cancelled, the pieces still on their way are dropped, and the answer ends as failed when the model
        confirms (so a late piece can never land in the next answer)."""
        if self.streaming is None or self.save_failed:
            return
        try:
            self.conversations.append(self.streaming[0], content=content, reasoning=reasoning)
        except StorageError as e:
            self._save_failed_mid_answer(e)
            return
        self.chat.stream(self.streaming[1], content=content, reasoning=reasoning)

    def _tool_started(self, recipient: str, content: str) -> None:
        """The model called a tool: the call is saved (a crash shows it cut off), then shown, open, while it runs."""
        if self.streaming is None or self.save_failed:
            return
        try:
            call = self.conversations.add_tool_call(self.streaming[0], recipient, content)
        except StorageError as e:
            self._save_failed_mid_answer(e)
            return
        self.chat._flush()
        view = self.streaming[1].add_tool_call(recipient, content)
        view.toggle.setChecked(True)
        self.tool_call = (call, view)

    def _tool_finished(self, finished, files) -> None:
        if self.streaming is None or self.save_failed or self.tool_call is None:
            return
        call, view = self.tool_call
        self.tool_call = None
        output = finished.output
        try:
            self.conversations.finish_tool_call(call, output, finished.seconds, files)
        except StorageError as e:
            self._save_failed_mid_answer(e)
            return
        view.finish(output.display or output.text, output.error, finished.seconds, files, output.citations)
        view.toggle.setChecked(False)  # done: folded, one click opens it again
        if output.citations:
            self.streaming[1].cite(output.citations)

    def _turn_messages(self, messages: list) -> None:
        """The turn's messages as the model saw them, stored with the answer: the next turns send them again."""
        if self.streaming is None or self.save_failed or not messages:
            return
        try:
            self.conversations.set_harmony(self.streaming[0], messages)
        except StorageError as e:
            self._save_failed_mid_answer(e)

    def _context_used(self, tokens: int) -> None:
        if self.streaming is not None:
            self.context_used = tokens

    def _save_failed_mid_answer(self, error: StorageError) -> None:
        self.save_failed = True
        if self.cancel is not None:
            self.cancel.cancel()
        self._storage_failed(
            error, "The answer was stopped there; what was saved before is kept. Send again once this is fixed."
        )

    def _tools_changed(self, _enabled: tuple) -> None:
        """A toggle of the input bar: the conversation keeps it (a chat not yet started takes it when it starts)."""
        if self.current is not None and self.writable:
            try:
                self.conversations.set_tools(self.current, self.chat.tool_bar.chosen())
            except StorageError as e:
                self._storage_failed(e)

    def open_work_dir(self) -> None:
        """The conversation's working folder in the system's file manager (made if python has not yet run)."""
        if self.current is None:
            return
        folder = work_dir(self.current)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.chat.show_banner(f"The working folder {folder} cannot be made: {os_error_words(e)}.")
            return
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def check_tools(self) -> None:
        """Ask, off this thread, whether each tool can run here with the settings of now. An earlier check still
        running is not waited for: it finishes on its own and only the latest one's answer is shown."""
        check = ToolCheck(self.settings.tool_settings(work_dir=data_dir() / "work"), self.tool_factory)
        self.tool_check = check
        self.tool_checks.append(check)
        check.checked.connect(lambda reasons: self._tools_checked(check, reasons))
        check.thread.finished.connect(lambda: self.tool_checks.remove(check))
        check.start()

    def _tools_checked(self, check: ToolCheck, reasons: dict) -> None:
        if check is self.tool_check:
            self.chat.tool_bar.set_reasons(reasons)

    def _finished(self, done: Done) -> None:
        if self.streaming is None:  # a late answer to a request that was stopped or closed
            return
        if self.save_failed:
            self._end_stream("failed")
            return
        s = done.stats
        stats = {
            "stop_reason": done.stop_reason,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 2),
            "time_to_first_token_s": round(s.time_to_first_token_s, 3),
        }
        speed = f"{s.decode_tokens_per_s:.1f} tokens/s"
        if s.acceptance_rate is not None:  # speculative decoding: the share of drafted tokens the model accepted
            stats["draft_acceptance"] = round(s.acceptance_rate, 3)
            speed += f", {s.acceptance_rate:.0%} of drafts accepted"
        self.speed_label.setText(speed)
        used = self.context_used if self.context_used is not None else s.prompt_tokens + s.generated_tokens
        self.context_label.setText(f"context {used} of {self.settings.context_length} tokens")
        if done.stop_reason == "context_limit":
            self.chat.show_banner("The context is full: start a new chat, or raise the context length in Settings.")
        self._end_stream("stopped" if done.stop_reason == "cancelled" else "done", stats)

    def _failed(self, message: str) -> None:
        if self.streaming is None:
            return
        if not self.save_failed:  # that message says more than the model's reaction to being stopped
            self.chat.show_banner(message)
        self._end_stream("failed")

    def _end_stream(self, state: str, stats: dict | None = None) -> None:
        """The answer is over: the window is usable again, whatever the file says."""
        message, view = self.streaming
        try:
            self.conversations.finish(message, state, stats)
        except StorageError as e:  # its text is saved; the file will show it as cut off
            if not self.save_failed:
                self._storage_failed(e, "The answer is kept; it will show as cut off.")
        self.chat.finish(view, state)
        self.streaming = None
        self.tool_call = None
        self.context_used = None
        self.cancel = None
        self.save_failed = False
        self.list.setEnabled(True)
        self.new_button.setEnabled(self.writable)
        self.chat.set_busy(False, can_send=self.model_ok and self.writable)
        self.refresh_list()

    # -- models and settings ---------------------------------------------------------------------------------

    def use_model(self, name: str) -> None:
        self.settings.model = name
        self._settings_saved(self.settings)
        try:
            self.settings.save()
        except MlxOssError as e:
            self.chat.show_banner(sentence(f"{e}; {name} is used until the app closes"))

    def _store_changed(self) -> None:
        self.settings_view.update_models([m.name for m in self.store.list()])
        if self.check_model():
            self.chat.show_banner(None)

    def _settings_saved(self, settings: AppSettings) -> None:
        tools_changed = settings.tool_settings() != self.settings.tool_settings()
        self.settings = settings
        self.models.set_context(settings.context_length, settings.backend)
        if tools_changed:
            self.check_tools()
        self.settings_view.show_settings(settings, [m.name for m in self.store.list()])
        if self.check_model():
            self.chat.show_banner(None)
            self.tabs.setCurrentWidget(self.chat)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.shut_down()
        super().closeEvent(event)

    def shut_down(self) -> None:
        """Stop the work threads and close the file; what streamed so far is on disk already."""
        if self.host is None:
            return
        if self.cancel is not None:
            self.cancel.cancel()
        if self.streaming is not None:
            with contextlib.suppress(StorageError):  # its text is saved; the next start shows it as cut off
                self.conversations.finish(self.streaming[0], "stopped")
            self.streaming = None
        if self.models.task is not None:
            self.models.task.cancel.cancel()
            self.models.task.thread.wait()
        self.settings_view.server.stop()
        for check in list(self.tool_checks):
            check.thread.wait()
        self.host.blockSignals(True)
        self.host.stop()
        self.host = None
        self.conversations.close()

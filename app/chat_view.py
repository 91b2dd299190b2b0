"""The chat: messages rendered as Markdown, the reasoning in a section that folds away, the built-in tool calls in
blocks that fold open, citations as links, and the input bar with the conversation's tool toggles."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from mlx_oss.tools import Citation

from .citations import link_citations, linkable
from .tool_view import ToolBar, ToolCallView

STATE_NOTES = {
    "stopped": "stopped",
    "interrupted": "cut off (the app was closed or crashed while answering)",
    "failed": "failed",
}


def _text_label(markdown: bool) -> QLabel:
    label = QLabel()
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.MarkdownText if markdown else Qt.TextFormat.PlainText)
    label.setTextInteractionFlags(
        Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.LinksAccessibleByMouse
    )
    label.setOpenExternalLinks(False)
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    return label


def open_link(url: str) -> None:
    """A cited page opens in the system's browser; nothing but web pages is opened from an answer."""
    if linkable(url):
        QDesktopServices.openUrl(QUrl(url))


def _message_area(name: str, colours: str) -> QLabel:
    """A hidden, word-wrapped message strip above the conversation (`notice` or `banner`)."""
    label = QLabel()
    label.setWordWrap(True)
    label.setObjectName(name)
    label.setStyleSheet(f"{colours} padding: 8px;")
    label.hide()
    return label


def _show(label: QLabel, text: str | None) -> None:
    """`text` in `label`; none hides it."""
    label.setText(text or "")
    label.setVisible(bool(text))


class MessageView(QFrame):
    """One message. An assistant message has a folding reasoning section above its answer and a Copy button."""

    def __init__(
        self,
        role: str,
        content: str = "",
        reasoning: str = "",
        state: str = "done",
        show_reasoning=False,
        citations: dict[int, Citation] | None = None,
    ):
        super().__init__()
        self.role = role
        self.content, self.reasoning_text, self.state = content, reasoning, state
        self.citations = citations if citations is not None else {}  # the pages the conversation opened, by cursor
        self.tool_calls: list[ToolCallView] = []
        self.setObjectName("userMessage" if role == "user" else "assistantMessage")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        layout = QVBoxLayout(self)
        header = QHBoxLayout()
        self.author = QLabel("<b>You</b>" if role == "user" else "<b>gpt-oss</b>")
        header.addWidget(self.author)
        header.addStretch()
        self.note = QLabel()
        self.note.setStyleSheet("color: gray;")
        header.addWidget(self.note)
        self.copy_button = QToolButton(text="Copy")
        self.copy_button.setToolTip("Copy the answer as Markdown")
        self.copy_button.clicked.connect(self.copy)
        header.addWidget(self.copy_button)
        layout.addLayout(header)

        self.reasoning_toggle = QToolButton(text="Reasoning")
        self.reasoning_toggle.setCheckable(True)
        self.reasoning_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.reasoning_toggle.toggled.connect(self._fold)
        self.reasoning_label = _text_label(markdown=False)
        self.reasoning_label.setStyleSheet("color: #666; font-style: italic; padding-left: 12px;")
        layout.addWidget(self.reasoning_toggle)
        layout.addWidget(self.reasoning_label)
        self.tools_layout = QVBoxLayout()
        layout.addLayout(self.tools_layout)
        self.answer_label = _text_label(markdown=True)
        self.answer_label.linkActivated.connect(open_link)
        layout.addWidget(self.answer_label)
        self.reasoning_toggle.setChecked(show_reasoning)
        self._fold(show_reasoning)
        self.refresh()

    def _fold(self, open_: bool) -> None:
        self.reasoning_toggle.setArrowType(Qt.ArrowType.DownArrow if open_ else Qt.ArrowType.RightArrow)
        self.reasoning_label.setVisible(open_ and bool(self.reasoning_text))

    def refresh(self) -> None:
        has_reasoning = self.role == "assistant" and bool(self.reasoning_text)
        self.reasoning_toggle.setVisible(has_reasoning)
        self.reasoning_label.setText(self.reasoning_text)
        self.reasoning_label.setVisible(has_reasoning and self.reasoning_toggle.isChecked())
        text = link_citations(self.content, self.citations) if self.citations else self.content
        self.answer_label.setText(text or ("…" if self.state == "streaming" else ""))
        self.copy_button.setVisible(self.role == "assistant" and self.state != "streaming" and bool(self.content))
        self.note.setText(STATE_NOTES.get(self.state, ""))

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(self.content)

    def add_tool_call(self, recipient: str, content: str) -> ToolCallView:
        view = ToolCallView(recipient, content)
        self.tools_layout.addWidget(view)
        self.tool_calls.append(view)
        return view

    def cite(self, citations) -> None:
        """Pages a call of this answer opened: their citations become links."""
        for citation in citations:
            self.citations[citation.cursor] = citation
        self.refresh()


class ChatView(QWidget):
    """Messages in a scrolling column above the input bar. Streamed text is shown at most every 50 ms."""

    send_requested = Signal(str)
    stop_requested = Signal()
    regenerate_requested = Signal()

    def __init__(self):
        super().__init__()
        layout = QVBoxLayout(self)
        # Two message areas: `notice` for what holds for the whole session (the conversation file is read-only or
        # not saved, the settings file was set aside), which no other message may hide; `banner` for the latest
        # event (a model that failed to load, an answer that could not be saved).
        self.notice = _message_area("notice", "background: #fde2e1; border: 1px solid #d99a97;")
        self.banner = _message_area("banner", "background: #fff4d6; border: 1px solid #e0c070;")
        layout.addWidget(self.notice)
        layout.addWidget(self.banner)

        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.column = QWidget()
        self.column_layout = QVBoxLayout(self.column)
        self.column_layout.addStretch()
        self.scroll.setWidget(self.column)
        layout.addWidget(self.scroll, 1)

        self.tool_bar = ToolBar()
        layout.addWidget(self.tool_bar)
        bar = QHBoxLayout()
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message gpt-oss (Ctrl+Enter sends)")
        self.input.setMaximumHeight(90)
        bar.addWidget(self.input, 1)
        buttons = QVBoxLayout()
        self.send_button = QPushButton("Send")
        self.stop_button = QPushButton("Stop")
        self.regenerate_button = QPushButton("Regenerate")
        for button in (self.send_button, self.stop_button, self.regenerate_button):
            buttons.addWidget(button)
        bar.addLayout(buttons)
        layout.addLayout(bar)
        self.send_button.clicked.connect(self._send)
        self.stop_button.clicked.connect(self.stop_requested)
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        QShortcut(QKeySequence("Ctrl+Return"), self.input, activated=self._send)

        self.show_reasoning = True
        self.messages: list[MessageView] = []
        self._dirty: MessageView | None = None
        self._timer = QTimer(self, interval=50, singleShot=True)
        self._timer.timeout.connect(self._flush)
        self.set_busy(False)

    def _send(self) -> None:
        text = self.input.toPlainText().strip()
        if text and self.send_button.isEnabled():
            self.input.clear()
            self.send_requested.emit(text)

    def set_busy(self, busy: bool, can_send: bool = True) -> None:
        self.send_button.setEnabled(not busy and can_send)
        self.stop_button.setEnabled(busy)
        self.regenerate_button.setEnabled(not busy and can_send and any(m.role == "assistant" for m in self.messages))

    def show_notice(self, text: str | None) -> None:
        _show(self.notice, text)

    def show_banner(self, text: str | None) -> None:
        _show(self.banner, text)

    def clear(self) -> None:
        for view in self.messages:  # gone from the column now, not when the event loop gets to deleting it
            view.hide()
            self.column_layout.removeWidget(view)
            view.deleteLater()
        self.messages = []

    def add(
        self,
        role: str,
        content: str = "",
        reasoning: str = "",
        state: str = "done",
        citations: dict[int, Citation] | None = None,
    ) -> MessageView:
        view = MessageView(role, content, reasoning, state, show_reasoning=self.show_reasoning, citations=citations)
        self.column_layout.insertWidget(self.column_layout.count() - 1, view)
        self.messages.append(view)
        QTimer.singleShot(0, self, self._scroll_to_end)  # dropped if this view is gone by then
        return view

    def remove_last(self) -> None:
        view = self.messages.pop()
        view.hide()
        self.column_layout.removeWidget(view)
        view.deleteLater()

    def stream(self, view: MessageView, content: str = "", reasoning: str = "") -> None:
        view.content += content
        view.reasoning_text += reasoning
        self._dirty = view
        if not self._timer.isActive():
            self._timer.start()

    def finish(self, view: MessageView, state: str) -> None:
        view.state = state
        self._flush()
        view.refresh()

    def _flush(self) -> None:
        if self._dirty is not None:
            self._dirty.refresh()
            self._dirty = None
            self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        bar = self.scroll.verticalScrollBar()
        bar.setValue(bar.maximum())

"""A built-in tool call in the chat: a block that folds open to show what the model sent (the code, the search) and
everything that came back (the full output, a plot as a picture), and the tool toggles of the input bar."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QToolButton, QVBoxLayout, QWidget

from mlx_oss.tools import BROWSER, PYTHON, Citation

PICTURE_WIDTH = 520  # pixels a plot is shown at, at most (the file keeps its size)
TOOL_NAMES = {PYTHON: "Python", BROWSER: "Browser"}
TOOL_TIPS = {
    PYTHON: "Let the model run Python in a sandbox, in this conversation's working folder",
    BROWSER: "Let the model search the web and open pages (the search backend is in Settings)",
}


def _mono(text: str) -> QLabel:
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.setStyleSheet("font-family: monospace; background: #f4f4f4; padding: 6px;")
    return label


class ToolCallView(QFrame):
    """One call: a header (the tool, its time, whether it failed) that opens the code and its output."""

    def __init__(self, recipient: str, content: str, open_: bool = False):
        super().__init__()
        self.setObjectName("toolCall")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.recipient, self.content = recipient, content
        self.output, self.error, self.seconds, self.state = "", False, None, "running"
        self.citations: tuple[Citation, ...] = ()
        self.pictures: list[QLabel] = []
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        self.toggle = QToolButton()
        self.toggle.setCheckable(True)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.toggled.connect(self._fold)
        layout.addWidget(self.toggle)
        self.body = QWidget()
        body = QVBoxLayout(self.body)
        body.setContentsMargins(12, 0, 0, 0)
        self.code = _mono(content)
        self.output_label = _mono("")
        body.addWidget(self.code)
        body.addWidget(self.output_label)
        self.pictures_layout = QVBoxLayout()
        body.addLayout(self.pictures_layout)
        layout.addWidget(self.body)
        self.toggle.setChecked(open_)
        self._fold(open_)
        self.refresh()

    def _fold(self, open_: bool) -> None:
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if open_ else Qt.ArrowType.RightArrow)
        self.body.setVisible(open_)

    def finish(
        self,
        output: str,
        error: bool,
        seconds: float | None,
        files: list[tuple[str, bytes | None]] = (),
        citations: tuple[Citation, ...] = (),
        state: str = "done",
    ) -> None:
        """The call's result: `files` are (path, the picture's bytes, or None for a file not shown)."""
        self.output, self.error, self.seconds, self.state, self.citations = output, error, seconds, state, citations
        for path, data in files:
            picture = QPixmap()
            # Only the bytes the model's thread read: a file is never read here (it may be large, on a slow disk).
            if not (data and picture.loadFromData(data)):
                continue  # not a picture (a CSV the code wrote), or too large to keep: it is in the working folder
            label = QLabel()
            label.setObjectName("toolPicture")
            label.setToolTip(path)
            if picture.width() > PICTURE_WIDTH:
                picture = picture.scaledToWidth(PICTURE_WIDTH, Qt.TransformationMode.SmoothTransformation)
            label.setPixmap(picture)
            self.pictures_layout.addWidget(label)
            self.pictures.append(label)
        self.refresh()

    def refresh(self) -> None:
        name = self.recipient
        if self.state == "running":
            status = "running…"
        elif self.state == "interrupted":
            status = "cut off"
        else:
            status = f"{self.seconds:.1f} s" if self.seconds is not None else ""
        if self.error:
            status = f"error · {status}" if status else "error"
        self.toggle.setText(f"{name} · {status}" if status else name)
        self.toggle.setStyleSheet("color: #b00020; font-weight: bold;" if self.error else "")
        self.output_label.setText(self.output)
        self.output_label.setVisible(bool(self.output))
        self.output_label.setStyleSheet(
            "font-family: monospace; padding: 6px; "
            + ("background: #fde2e1; color: #8a0015;" if self.error else "background: #eef3ee;")
        )


class ToolBar(QWidget):
    """The input bar's tool toggles (this conversation's) and the working-folder button."""

    tools_changed = Signal(tuple)
    open_folder_requested = Signal()

    def __init__(self):
        super().__init__()
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Tools:"))
        self.toggles: dict[str, QToolButton] = {}
        for name in TOOL_NAMES:
            button = QToolButton(text=TOOL_NAMES[name])
            button.setObjectName(f"toggle_{name}")
            button.setCheckable(True)
            button.setEnabled(False)
            button.setToolTip("checking whether it can run here…")
            button.toggled.connect(self._changed)
            layout.addWidget(button)
            self.toggles[name] = button
        self.folder_button = QToolButton(text="Working folder")
        self.folder_button.setToolTip("Open the folder where this conversation's Python keeps its files")
        self.folder_button.clicked.connect(self.open_folder_requested)
        self.folder_button.setEnabled(False)  # until there is a conversation
        layout.addWidget(self.folder_button)
        layout.addStretch()
        self.reasons: dict[str, str | None] = {}

    def _changed(self) -> None:
        self.tools_changed.emit(self.enabled())

    def enabled(self) -> tuple[str, ...]:
        """The tools switched on that can run here."""
        return tuple(n for n, b in self.toggles.items() if b.isChecked() and b.isEnabled())

    def chosen(self) -> tuple[str, ...]:
        """The tools switched on, whether they can run here or not (what the conversation keeps)."""
        return tuple(n for n, b in self.toggles.items() if b.isChecked())

    def set_tools(self, tools: tuple[str, ...]) -> None:
        for name, button in self.toggles.items():
            button.blockSignals(True)
            button.setChecked(name in tools)
            button.blockSignals(False)

    def set_reasons(self, reasons: dict[str, str | None]) -> None:
        """Whether each tool can run here: one that cannot is disabled, and its tooltip says why."""
        self.reasons = dict(reasons)
        for name, button in self.toggles.items():
            reason = reasons.get(name, "not checked")
            button.setEnabled(reason is None)
            button.setToolTip(TOOL_TIPS[name] if reason is None else f"Unavailable: {reason}")

"""Settings: model, backend, reasoning effort, sampling, context, system prompt and the built-in tools' backend and
limits; saved, used from the next message on."""

from __future__ import annotations

import dataclasses

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import REASONING_EFFORTS
from mlx_oss.loading import BACKENDS

from .server_control import ServerControl
from .settings import MAX_CONTEXT, MAX_PYTHON_MEMORY, MAX_PYTHON_TIMEOUT, MAX_TOKENS, SEARCH_BACKENDS, AppSettings


class SettingsView(QWidget):
    saved = Signal(object)  # AppSettings

    def __init__(self, settings: AppSettings, model_names: list[str]):
        super().__init__()
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.model = QComboBox(editable=True)
        self.model.setToolTip("a model in the store (see Models) or the path of a model directory")
        self.backend = QComboBox()
        self.backend.addItems(BACKENDS)
        self.effort = QComboBox()
        self.effort.addItems(REASONING_EFFORTS)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=10.0, singleStep=0.1, decimals=2)
        self.top_p = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, decimals=2)
        self.max_tokens = QSpinBox(minimum=0, maximum=MAX_TOKENS, singleStep=256, specialValueText="no limit")
        self.context = QSpinBox(minimum=256, maximum=MAX_CONTEXT, singleStep=1024, suffix=" tokens")
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("Instructions for the model, e.g. “Answer briefly, in French.”")
        form.addRow("Model", self.model)
        form.addRow("Backend", self.backend)
        form.addRow("Reasoning effort", self.effort)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max tokens per answer", self.max_tokens)
        self.context_fit = QLabel()  # fits / tight / does not fit, for the model, backend and context above
        self.context_fit.setWordWrap(True)
        context_row = QHBoxLayout()
        context_row.addWidget(self.context)
        context_row.addWidget(self.context_fit, 1)
        form.addRow("Context length", context_row)
        form.addRow("System prompt", self.system_prompt)
        layout.addLayout(form)
        tools = QGroupBox("Built-in tools (switched on per conversation, under the message box)")
        tools_form = QFormLayout(tools)
        self.search_backend = QComboBox()
        self.search_backend.addItems(SEARCH_BACKENDS)
        self.search_backend.setToolTip("duckduckgo needs no key; searxng is an instance you run or trust")
        self.search_url = QLineEdit(placeholderText="https://searx.example.org (SearXNG only)")
        self.python_timeout = QDoubleSpinBox(minimum=1, maximum=MAX_PYTHON_TIMEOUT, decimals=0, suffix=" s")
        self.python_memory = QSpinBox(minimum=128, maximum=MAX_PYTHON_MEMORY, singleStep=256, suffix=" MB")
        tools_form.addRow("Search backend", self.search_backend)
        tools_form.addRow("SearXNG address", self.search_url)
        tools_form.addRow("Python time limit per call", self.python_timeout)
        tools_form.addRow("Python memory", self.python_memory)
        self.search_backend.currentTextChanged.connect(lambda b: self.search_url.setEnabled(b == "searxng"))
        layout.addWidget(tools)
        self.save_button = QPushButton("Save")
        self.save_button.clicked.connect(self.save)
        self.message = QLabel()
        layout.addWidget(self.save_button)
        layout.addWidget(self.message)
        self.server = ServerControl()
        layout.addWidget(self.server)
        layout.addStretch()
        self.show_settings(settings, model_names)
        self.context.valueChanged.connect(self.update_fit)
        self.model.currentTextChanged.connect(self.update_fit)
        self.backend.currentTextChanged.connect(self.update_fit)
        self.update_fit()

    def update_fit(self) -> None:
        """Say whether the model fits this computer's memory at the context set: cheap (its config and files'
        sizes), so it follows every change of the form."""
        from mlx_oss.memory_estimate import fit_for_directory
        from mlx_oss.store import resolve_model

        try:
            directory = resolve_model(self.model.currentText().strip(), self.backend.currentText())
        except MlxOssError:
            self.context_fit.setText("")
            return
        status, why = fit_for_directory(directory, self.backend.currentText(), self.context.value())
        self.context_fit.setText(f"{status}: {why}" if status else why)

    def show_settings(self, settings: AppSettings, model_names: list[str]) -> None:
        self.settings = settings
        self.server.configure(settings.model, settings.backend)
        self.update_models(model_names)
        self.model.setCurrentText(settings.model)
        self.backend.setCurrentText(settings.backend)
        self.effort.setCurrentText(settings.reasoning_effort)
        self.temperature.setValue(settings.temperature)
        self.top_p.setValue(settings.top_p)
        self.max_tokens.setValue(settings.max_tokens)
        self.context.setValue(settings.context_length)
        self.system_prompt.setPlainText(settings.system_prompt)
        self.search_backend.setCurrentText(settings.search_backend)
        self.search_url.setText(settings.search_url)
        self.search_url.setEnabled(settings.search_backend == "searxng")
        self.python_timeout.setValue(settings.python_timeout_s)
        self.python_memory.setValue(settings.python_memory_mb)

    def update_models(self, model_names: list[str]) -> None:
        """New choices for the model box (after a download or a deletion), leaving the rest of the form as typed."""
        typed = self.model.currentText()
        self.model.clear()
        self.model.addItems(sorted(set(model_names) | {self.settings.model}))
        self.model.setCurrentText(typed)

    def current(self) -> AppSettings:
        return dataclasses.replace(
            self.settings,
            model=self.model.currentText().strip(),
            backend=self.backend.currentText(),
            reasoning_effort=self.effort.currentText(),
            temperature=round(self.temperature.value(), 4),
            top_p=round(self.top_p.value(), 4),
            max_tokens=self.max_tokens.value(),
            context_length=self.context.value(),
            system_prompt=self.system_prompt.toPlainText().strip(),
            search_backend=self.search_backend.currentText(),
            search_url=self.search_url.text().strip(),
            python_timeout_s=float(self.python_timeout.value()),
            python_memory_mb=self.python_memory.value(),
        )

    def save(self) -> None:
        settings = self.current()
        problems = settings.problems()
        if problems:
            self.message.setText("Not saved: " + "; ".join(problems))
            return
        try:
            settings.save()
        except MlxOssError as e:  # a full disk, a read-only folder: the form keeps what was typed
            self.message.setText(f"Not saved: {e}")
            return
        self.settings = settings
        self.message.setText("Saved; used from the next message on.")
        self.saved.emit(settings)

"""The model manager: what the model store holds, and downloads, conversions and deletions with progress.

Built on the same pieces as `python -m mlx_oss.models` (`ModelStore`, `hub.download`, the layout converter); the
work runs in a `Task` off the GUI thread, one at a time, with Cancel. A cancelled or failed download keeps what
arrived; starting it again resumes.
"""

from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from mlx_oss.cli import format_bytes
from mlx_oss.layouts import MLX, MXFP4, NUMPY, PACKED
from mlx_oss.memory_estimate import fit_for_directory
from mlx_oss.store import DEFAULT_MODEL, ModelStore

from .workers import Task

COLUMNS = ("Model", "Layouts", "Size on disk", "Status", "Memory")
MEMORY_COLUMN = COLUMNS.index("Memory")
DEFAULT_CONTEXT = 8192  # the app's own default context length (`AppSettings.context_length`)


class ModelsView(QWidget):
    use_requested = Signal(str)  # a model name to chat with
    changed = Signal()  # the store's contents changed

    def __init__(self, store: ModelStore):
        super().__init__()
        self.store = store
        self.task: Task | None = None
        self.context_length, self.backend = DEFAULT_CONTEXT, "auto"  # what the Memory column is estimated for
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel(f"Models on this computer (in {store.root})"))
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        layout.addWidget(self.table, 1)

        actions = QHBoxLayout()
        self.use_button = QPushButton("Chat with it")
        self.convert_mlx_button = QPushButton("Convert to MLX")
        self.convert_numpy_button = QPushButton("Convert to NumPy")
        self.pack_button = QPushButton("Pack for CPU")
        self.pack_button.setToolTip(
            "Lossless: 0.6 GB less for each token to read, so faster decoding with the compiled CPU kernels"
        )
        self.quantize_button = QPushButton("Quantize to MXFP4")
        self.quantize_button.setToolTip("Needed to run a model whose experts are stored unquantized (a fine-tune)")
        self.delete_button = QPushButton("Delete…")
        for button in (
            self.use_button,
            self.convert_mlx_button,
            self.convert_numpy_button,
            self.pack_button,
            self.quantize_button,
            self.delete_button,
        ):
            actions.addWidget(button)
        actions.addStretch()
        layout.addLayout(actions)
        self.use_button.clicked.connect(lambda: self.use_requested.emit(self.selected()))
        self.convert_mlx_button.clicked.connect(lambda: self.convert(self.selected(), MLX))
        self.convert_numpy_button.clicked.connect(lambda: self.convert(self.selected(), NUMPY))
        self.pack_button.clicked.connect(lambda: self.convert(self.selected(), PACKED))
        self.quantize_button.clicked.connect(lambda: self.convert(self.selected(), MXFP4))
        self.delete_button.clicked.connect(lambda: self.delete(self.selected()))

        fetch = QHBoxLayout()
        fetch.addWidget(QLabel("Download from the hub:"))
        self.name_edit = QLineEdit(DEFAULT_MODEL)
        fetch.addWidget(self.name_edit, 1)
        self.download_button = QPushButton("Download")
        self.download_button.clicked.connect(lambda: self.download(self.name_edit.text().strip()))
        fetch.addWidget(self.download_button)
        layout.addLayout(fetch)

        work = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        work.addWidget(self.progress, 1)
        work.addWidget(self.status, 2)
        work.addWidget(self.cancel_button)
        layout.addLayout(work)
        self.refresh()
        self._set_working(False)

    # -- table ---------------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        selected = self.selected()
        models = self.store.list()
        self.table.setRowCount(len(models))
        for row, m in enumerate(models):
            size = sum(m.size(layout) for layout in m.layouts)
            status = "ready" if m.downloaded else "partial download: Download resumes it" if m.partial else ""
            if m.needs_quantizing:
                status = "experts unquantized: Quantize to MXFP4 to run it"
            fit, why = self._fit(m)
            for column, text in enumerate(
                (m.name, ", ".join(m.layouts) or "-", format_bytes(size) if size else "-", status, fit)
            ):
                item = QTableWidgetItem(text)
                if column == MEMORY_COLUMN and why:
                    item.setToolTip(why)
                self.table.setItem(row, column, item)
            if m.name == selected:
                self.table.selectRow(row)
        self._update_buttons()

    def set_context(self, context_length: int, backend: str) -> None:
        """Estimate the Memory column for this context and backend (the chat's settings)."""
        if (context_length, backend) != (self.context_length, self.backend):
            self.context_length, self.backend = context_length, backend
            self.refresh()

    def _fit(self, m) -> tuple[str, str]:
        """fits / tight / does not fit at the chat's context length: from the config and the files' sizes, as
        cheap as the size column beside it, so it runs as the table is drawn."""
        layout = m.layout_for(self.backend)
        if layout is None or m.needs_quantizing:
            return "-", ""
        status, why = fit_for_directory(m.layouts[layout], self.backend, self.context_length)
        return (f"{status} at {self.context_length // 1024}k" if status else "?"), why

    def selected(self) -> str:
        rows = self.table.selectionModel().selectedRows()
        return self.table.item(rows[0].row(), 0).text() if rows else ""

    def select(self, name: str) -> None:
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).text() == name:
                self.table.selectRow(row)

    def _update_buttons(self) -> None:
        name = self.selected()
        model = self.store.get(name) if name else None
        idle = self.task is None
        ready = bool(model and model.downloaded)
        unquantized = ready and model.needs_quantizing  # nothing runs or converts it until it is quantized
        self.use_button.setEnabled(bool(model and model.layouts) and not unquantized)
        self.convert_mlx_button.setEnabled(idle and ready and not unquantized and MLX not in model.layouts)
        self.convert_numpy_button.setEnabled(idle and ready and not unquantized and NUMPY not in model.layouts)
        self.pack_button.setEnabled(idle and ready and not unquantized and PACKED not in model.layouts)
        self.quantize_button.setEnabled(idle and unquantized)
        self.delete_button.setEnabled(idle and model is not None)
        self.download_button.setEnabled(idle)

    # -- work ----------------------------------------------------------------------------------------------------

    def download(self, name: str) -> None:
        from mlx_oss import hub

        def work(report, cancel) -> str:
            path = hub.download(
                name,
                self.store,
                on_progress=lambda p: report(p.done_bytes, p.total_bytes, f"{p.bytes_per_s / 1e6:.1f} MB/s"),
                cancel=cancel,
            )
            return f"{name} downloaded to {path}"

        self._start(f"Downloading {name}", work)

    def convert(self, name: str, target: str) -> None:
        from mlx_oss.converters.layout import convert

        source = self.store.get(name).source_for(target)

        def work(report, cancel) -> str:
            total = done = 0
            started = time.monotonic()

            def on_start(size: int) -> None:
                nonlocal total
                total = size

            def on_bytes(count: int) -> None:
                nonlocal done
                done += count
                report(done, total, f"{done / max(time.monotonic() - started, 1e-6) / 1e6:.0f} MB/s")

            target_dir = self.store.converted(name, target)
            convert(source, target_dir, target, on_bytes=on_bytes, cancel=cancel, on_start=on_start)
            return f"{name} converted to the {target} layout"

        self._start(f"Converting {name} to {target}", work)

    def delete(self, name: str) -> None:
        model = self.store.get(name)
        size = sum(model.size(layout) for layout in model.layouts)
        answer = QMessageBox.question(
            self,
            "Delete model",
            f"Delete {name} and every layout of it ({format_bytes(size)}) from this computer?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        if answer != QMessageBox.StandardButton.Yes:
            return
        self.store.delete(name)
        self.status.setText(f"{name} deleted")
        self.refresh()
        self.changed.emit()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel.cancel()
            self.status.setText("cancelling…")

    def _start(self, label: str, work) -> None:
        self.task = Task(work)
        self.task_label = label
        # bound methods of this widget: Qt queues the calls onto the GUI thread (a bare lambda would run them on
        # the worker's thread)
        self.task.progress.connect(self._progress)
        self.task.succeeded.connect(self._finished)
        self.task.failed.connect(self._finished)
        self.progress.setValue(0)
        self.status.setText(f"{label}…")
        self._set_working(True)
        self.task.start()

    def _progress(self, done: int, total: int, note: str) -> None:
        self.progress.setValue(int(1000 * done / max(total, 1)))
        self.status.setText(f"{self.task_label}: {format_bytes(done)} of {format_bytes(total)}, {note}")

    def _finished(self, message: str) -> None:
        self.task.thread.wait()
        self.task = None
        self.status.setText(message)
        self._set_working(False)
        self.refresh()
        self.changed.emit()

    def _set_working(self, working: bool) -> None:
        self.cancel_button.setEnabled(working)
        self.progress.setVisible(working)
        self._update_buttons()

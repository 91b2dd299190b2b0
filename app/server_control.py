"""Start and stop the OpenAI-compatible server (`python -m mlx_oss.serve`) from the app, as a child process.

The server loads its own copy of the model, so editors and agents can use it while the app chats; it listens on
127.0.0.1 only. Its state is read from its own output ("serving ... at URL") and exit, never by polling.
"""

from __future__ import annotations

import sys

from PySide6.QtCore import QProcess
from PySide6.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QLabel, QSpinBox

from mlx_oss.serve import DEFAULT_PORT


class ServerControl(QGroupBox):
    def __init__(self):
        super().__init__("Local server for editors and agents (OpenAI API)")
        layout = QHBoxLayout(self)
        self.toggle = QCheckBox("Serve the model")
        self.port = QSpinBox(minimum=1024, maximum=65535, value=DEFAULT_PORT, prefix="port ")
        self.status = QLabel("off")
        for widget in (self.toggle, self.port, self.status):
            layout.addWidget(widget)
        layout.addStretch()
        self.process: QProcess | None = None
        self.output = ""
        self.model, self.backend = "", "auto"
        self.toggle.toggled.connect(self._toggled)

    def configure(self, model: str, backend: str) -> None:
        """The model to serve from the next start on."""
        self.model, self.backend = model, backend

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.value()}/v1"

    def _toggled(self, on: bool) -> None:
        if on:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        if self.process is not None:
            return
        self.output = ""
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.finished.connect(self._finished)
        args = ["--model", self.model, "--backend", self.backend, "--port", str(self.port.value())]
        # a bundled app is one executable that serves when asked (see packaging/launcher.py)
        command = ["--serve"] if getattr(sys, "frozen", False) else ["-m", "mlx_oss.serve"]
        self.status.setText(f"starting {self.model}…")
        self.port.setEnabled(False)
        self.process.start(sys.executable, command + args)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        if not self.process.waitForFinished(10_000):
            self.process.kill()
            self.process.waitForFinished(5_000)

    def _read(self) -> None:
        self.output += bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        if "serving " in self.output and " at http" in self.output:
            self.status.setText(f"serving {self.model} at {self.url}")

    def _finished(self, code: int, status) -> None:
        last = self.output.strip().splitlines()[-1] if self.output.strip() else ""
        crashed = self.toggle.isChecked() and code != 0
        self.process.deleteLater()
        self.process = None
        self.port.setEnabled(True)
        self.status.setText(f"stopped: {last}" if crashed else "off")
        self.toggle.blockSignals(True)
        self.toggle.setChecked(False)
        self.toggle.blockSignals(False)

    @property
    def running(self) -> bool:
        return self.process is not None and self.status.text().startswith("serving")

"""Runs the real app window and sends one message (argv[1]) as a user would; used by tests as a subprocess."""

import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from mlx_oss.app.main_window import MainWindow

app = QApplication(sys.argv[:1])
window = MainWindow()
window.show()


def send() -> None:
    window.chat.input.setPlainText(sys.argv[1])
    window.chat.send_button.click()


QTimer.singleShot(0, send)
sys.exit(app.exec())

"""Runs the real app window as a user would; used by tests as a subprocess.

`app_runner.py MESSAGE` sends MESSAGE and keeps running (until killed). `app_runner.py --report` prints what the
window says at the top (its notice and banner, one line each) once it is shown, and quits.
"""

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


def report() -> None:
    print(f"notice: {window.chat.notice.text()!r}")
    print(f"banner: {window.chat.banner.text()!r}")
    window.close()
    app.quit()


QTimer.singleShot(0, report if sys.argv[1] == "--report" else send)
sys.exit(app.exec())

"""`python -m mlx_oss.app`: the desktop app. `--self-check` proves the installation works and exits."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from PySide6.QtWidgets import QApplication
    except ImportError:
        print(
            "python -m mlx_oss.app: error: the desktop app needs Qt: pip install 'mlx-oss[app]' "
            "(or use the terminal chat: python -m mlx_oss.chat)",
            file=sys.stderr,
        )
        return 1
    if "--self-check" in argv:
        from .self_check import self_check

        return self_check()
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QMessageBox

    from mlx_oss.errors import MlxOssError

    from .main_window import MainWindow

    app = QApplication(sys.argv[:1] + argv)
    app.setApplicationName("mlx-oss")
    app.setApplicationDisplayName("mlx-oss")
    app.setWindowIcon(QIcon(str(icon_path())))
    try:
        window = MainWindow()
    except MlxOssError as e:  # what stops the window from opening at all (a conversation file it cannot use
        # does not: the window opens and says so)
        QMessageBox.critical(None, "mlx-oss", str(e))
        return 1
    window.show()
    return app.exec()


def icon_path():
    from pathlib import Path

    return Path(__file__).with_name("icon.png")


if __name__ == "__main__":
    sys.exit(main())

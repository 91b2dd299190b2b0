"""`python -m mlx_oss.app`: the desktop app."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from PySide6.QtWidgets import QApplication
    except ImportError:
        print(
            "python -m mlx_oss.app: error: the desktop app needs Qt: pip install 'mlx-oss[app]' "
            "(or use the terminal chat: python -m mlx_oss.chat)",
            file=sys.stderr,
        )
        return 1
    from .main_window import MainWindow

    app = QApplication(sys.argv[:1] + list(argv or []))
    app.setApplicationName("mlx-oss")
    window = MainWindow()
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

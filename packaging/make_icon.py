"""Draw the app icon (app/icon.png, 512 px): run again after changing the design.

.venv/bin/python packaging/make_icon.py
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QRectF, Qt  # noqa: E402
from PySide6.QtGui import QColor, QFont, QGuiApplication, QImage, QLinearGradient, QPainter, QPen  # noqa: E402

SIZE = 512


def draw() -> QImage:
    image = QImage(SIZE, SIZE, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    p = QPainter(image)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    gradient = QLinearGradient(0, 0, SIZE, SIZE)
    gradient.setColorAt(0, QColor("#1f3b57"))
    gradient.setColorAt(1, QColor("#0e1a26"))
    p.setBrush(gradient)
    p.setPen(Qt.PenStyle.NoPen)
    p.drawRoundedRect(QRectF(16, 16, SIZE - 32, SIZE - 32), 96, 96)
    p.setPen(QPen(QColor("#f2c14e"), 18))
    p.setBrush(Qt.BrushStyle.NoBrush)
    p.drawEllipse(QRectF(112, 96, 288, 288))  # a thought bubble: the model thinking on your own machine
    p.drawEllipse(QRectF(118, 380, 56, 56))
    font = QFont("DejaVu Sans", 88, QFont.Weight.Bold)
    p.setFont(font)
    p.setPen(QColor("#ffffff"))
    p.drawText(QRectF(112, 96, 288, 288), Qt.AlignmentFlag.AlignCenter, "oss")
    p.end()
    return image


if __name__ == "__main__":
    app = QGuiApplication(sys.argv[:1])
    target = Path(__file__).resolve().parent.parent / "app" / "icon.png"
    draw().save(str(target))
    print(target)

"""Runs the real app window as a user would; used by tests as a subprocess.

`app_runner.py MESSAGE` sends MESSAGE and keeps running (until killed). `app_runner.py --report` prints what the
window says at the top (its notice and banner, one line each) once it is shown, and quits.
`app_runner.py --screenshots DIR` renders the built-in tools in the chat to DIR/app-python-call.png and
DIR/app-cited-page.png (see `screenshots`).
"""

import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication


def run_window() -> None:
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


# -- screenshots of the built-in tools -----------------------------------------------------------------------------
#
# The real window, the real agent loop and the real storage; the model is scripted (the tiny test model answers
# gibberish) and the tools are stand-ins that answer what the real ones would (this machine may have no sandbox or
# network, and no matplotlib): the plot is drawn here, standing in for the one the code would save.

QUESTION = "At what temperature does water boil on top of Mont Blanc? Plot it against altitude."
CODE = """import numpy as np
import matplotlib.pyplot as plt

def boiling_point(h):  # °C at altitude h (m): barometric pressure, then Clausius-Clapeyron
    p = 101.325 * np.exp(-h / 8434)
    return 1 / (1 / 373.15 - 8.314 / 40660 * np.log(p / 101.325)) - 273.15

h = np.linspace(0, 8849, 200)
plt.plot(h, boiling_point(h))
plt.scatter([4808], [boiling_point(4808)], color="red")
plt.xlabel("altitude (m)"); plt.ylabel("boiling point (°C)")
plt.savefig("boiling.png")
print(f"Mont Blanc (4808 m): {boiling_point(4808):.1f} °C")"""
SEARCH = '{"query": "Mont Blanc height survey"}'
OPEN = '{"cursor": 0, "id": 1}'
PAGE_URL = "https://en.wikipedia.org/wiki/Mont_Blanc"
CITED_QUESTION = "How high is Mont Blanc now? Its height changes, doesn't it?"


def boiling_point(h: float) -> float:
    import math

    p = 101.325 * math.exp(-h / 8434)
    return 1 / (1 / 373.15 - 8.314 / 40660 * math.log(p / 101.325)) - 273.15


def plot_png(path) -> None:
    """A plot of the boiling point against altitude, drawn with Qt as matplotlib would have drawn it."""
    from PySide6.QtCore import QPointF, QRectF, Qt
    from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPainterPath, QPen

    width, height, left, right, top, bottom = 560, 340, 60, 20, 20, 50
    image = QImage(width, height, QImage.Format.Format_RGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setFont(QFont("DejaVu Sans", 9))
    plot = QRectF(left, top, width - left - right, height - top - bottom)
    t_low, t_high = 70.0, 100.0

    def at(h: float, t: float) -> QPointF:
        return QPointF(
            plot.left() + h / 9000 * plot.width(), plot.bottom() - (t - t_low) / (t_high - t_low) * plot.height()
        )

    painter.setPen(QPen(QColor("black"), 1))
    painter.drawRect(plot)
    for h in range(0, 9001, 1500):
        x = at(h, t_low).x()
        painter.drawLine(QPointF(x, plot.bottom()), QPointF(x, plot.bottom() + 4))
        painter.drawText(QRectF(x - 30, plot.bottom() + 6, 60, 14), Qt.AlignmentFlag.AlignCenter, str(h))
    for t in range(70, 101, 5):
        y = at(0, t).y()
        painter.drawLine(QPointF(plot.left() - 4, y), QPointF(plot.left(), y))
        painter.drawText(QRectF(plot.left() - 40, y - 7, 34, 14), Qt.AlignmentFlag.AlignRight, str(t))
    painter.drawText(QRectF(plot.left(), height - 22, plot.width(), 16), Qt.AlignmentFlag.AlignCenter, "altitude (m)")
    painter.save()
    painter.translate(14, plot.center().y())
    painter.rotate(-90)
    painter.drawText(QRectF(-80, -8, 160, 16), Qt.AlignmentFlag.AlignCenter, "boiling point (°C)")
    painter.restore()
    line = QPainterPath(at(0, boiling_point(0)))
    for i in range(1, 200):
        h = 8849 * i / 199
        line.lineTo(at(h, boiling_point(h)))
    painter.setPen(QPen(QColor("#1f77b4"), 2))
    painter.drawPath(line)
    painter.setPen(Qt.PenStyle.NoPen)
    painter.setBrush(QColor("red"))
    painter.drawEllipse(at(4808, boiling_point(4808)), 5, 5)
    painter.end()
    image.save(str(path))


def python_output(settings):
    from mlx_oss.tools import ToolOutput

    folder = settings.work_dir
    folder.mkdir(parents=True, exist_ok=True)
    plot_png(folder / "boiling.png")
    text = f"Mont Blanc (4808 m): {boiling_point(4808):.1f} °C\n"
    return ToolOutput(text, display=text + "[image: boiling.png]", files=(folder / "boiling.png",))


SEARCH_RESULTS = """[0] Mont Blanc height survey (Search_Results)
**viewing lines [0 - 5] of 5**

L0:
L1: URL: Search_Results/Mont Blanc height survey
L2: # 【1†Mont Blanc - Wikipedia†en.wikipedia.org】
L3: Mont Blanc is the highest mountain in the Alps. Its summit is a thick ice dome whose height varies
L4: from year to year; surveys every two years measure it.
L5: # 【2†Mont Blanc loses two metres†www.example-news.org】"""
PAGE = f"""[1] Mont Blanc - Wikipedia ({PAGE_URL})
**viewing lines [10 - 17] of 120**

L10: Mont Blanc is the highest mountain in the Alps and Western Europe. The summit is a thick, perennial
L11: ice and snow dome whose thickness varies, so no exact and permanent summit elevation can be given.
L12: Precise surveys are made every two years: the summit was measured at 4,807.81 m in 2021 and at
L13: 4,805.59 m in September 2023, 2.22 m lower.
L14: The rock summit lies beneath the ice, about 40 m west of the snow summit, at 4,792 m.
L15: Surveyors attribute the changes to wind and precipitation at the summit, rather than to climate
L16: change alone.
L17: """


def browser_output(settings):
    from mlx_oss.tools import Citation, ToolOutput

    return lambda recipient: (
        ToolOutput(SEARCH_RESULTS, citations=(Citation(0, "", "Search results"),))
        if recipient.endswith("search")
        else ToolOutput(PAGE, citations=(Citation(1, PAGE_URL, "Mont Blanc - Wikipedia"),))
    )


class StandIn:
    """A built-in tool that answers what the real one would for this script's questions."""

    def __init__(self, name, settings):
        self.name, self.settings = name, settings

    def unavailable(self):
        return None

    def run(self, recipient, content, cancel):
        return python_output(self.settings) if self.name == "python" else browser_output(self.settings)(recipient)

    def close(self):
        pass


def scripted_reply(prompt: str) -> str:
    turn = prompt.rsplit("<|start|>user", 1)[-1]
    if "Mont Blanc? Plot" in turn:
        if "<|start|>python" not in turn:
            return (
                "<|channel|>analysis<|message|>Pressure falls with altitude (scale height about 8.4 km); water boils "
                "where its vapour pressure equals the air's, which Clausius-Clapeyron gives. Compute it and plot "
                "it.<|end|><|start|>assistant<|channel|>analysis to=python code<|message|>" + CODE + "<|call|>"
            )
        return (
            "<|channel|>final<|message|>**About 84 °C.** At 4,808 m the air pressure is about 57 kPa, a little "
            f"over half of sea level's, and water boils at **{boiling_point(4808):.1f} °C** there.\n\n"
            "The plot shows the boiling point falling by roughly 1 °C every 300 m; it is saved as `boiling.png` in "
            "this chat's working folder.<|return|>"
        )
    calls = turn.count("<|start|>browser")
    if calls == 0:
        return "<|channel|>analysis to=browser.search code<|message|>" + SEARCH + "<|call|>"
    if calls == 1:
        return "<|channel|>analysis to=browser.open code<|message|>" + OPEN + "<|call|>"
    return (
        "<|channel|>final<|message|>Yes, it changes. Mont Blanc's summit is an ice dome, so its height is measured "
        "again every two years: **4,805.59 m** in September 2023, 2.22 m lower than the 4,807.81 m of "
        "2021【1†L12-L13】. The rock beneath the ice is lower, at about 4,792 m【1†L14-L14】, and the surveyors put "
        "the changes down to wind and snowfall more than to climate change alone【1†L15-L16】.<|return|>"
    )


def screenshots(out_dir: str) -> None:
    """Render a Python call (code, output, plot) and an answer citing a page, through the real window."""
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    work = Path(tempfile.mkdtemp(prefix="mlx-oss-tool-screenshots-"))
    os.environ["MLX_OSS_APP_DIR"] = str(work / "app")
    os.environ["MLX_OSS_MODELS"] = str(work / "store")
    from harmony_helpers import PromptScriptedModel
    from PySide6.QtCore import QEventLoop

    from mlx_oss.app.main_window import MainWindow
    from mlx_oss.app.settings import AppSettings
    from mlx_oss.converters.synthetic import preset_config, write_synthetic
    from mlx_oss.engine import Engine
    from mlx_oss.store import ModelStore

    store = ModelStore()
    name = "openai/gpt-oss-20b"  # what the window names; the scripted model below answers
    snapshot = store.folder(name) / "snapshots" / ("0" * 40)
    write_synthetic(snapshot, preset_config("tiny"))
    store.record_download(name, "0" * 40, {p.name: p.stat().st_size for p in snapshot.iterdir()})
    AppSettings(model=name).save()

    app = QApplication(sys.argv[:1])
    window = MainWindow(tool_factory=StandIn)
    window.resize(1180, 1040)
    window.show()
    window.host.engine = Engine(PromptScriptedModel(scripted_reply), context_length=8192)
    window.loaded_key = window._wanted_key()
    window.chat.show_reasoning = False

    def wait(done) -> None:
        deadline = time.monotonic() + 120
        while not done():
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            if time.monotonic() > deadline:
                raise SystemExit("the window did not finish in time")

    def ask(question: str, tool: str) -> None:
        window.new_conversation()
        window.chat.tool_bar.toggles[tool].setChecked(True)
        window.chat.input.setPlainText(question)
        window.chat.send_button.click()
        wait(lambda: window.streaming is None)

    def save(filename: str) -> None:
        wait(lambda: (app.processEvents(), True)[1])
        question = window.chat.messages[-2]  # the question at the top, the answer below
        window.chat.scroll.verticalScrollBar().setValue(question.y() - 8)
        app.processEvents()
        window.grab().save(str(Path(out_dir) / filename))

    wait(lambda: bool(window.chat.tool_bar.reasons))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ask(QUESTION, "python")
    window.chat.messages[-1].tool_calls[0].toggle.setChecked(True)
    save("app-python-call.png")
    ask(CITED_QUESTION, "browser")
    window.chat.messages[-1].tool_calls[-1].toggle.setChecked(True)
    save("app-cited-page.png")
    window.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "--screenshots":
        screenshots(sys.argv[2])
    else:
        run_window()

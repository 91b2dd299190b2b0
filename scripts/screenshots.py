"""Render the desktop app's main window to PNG: chat (reasoning open), model manager, settings.

    .venv/bin/python scripts/screenshots.py [OUT_DIR]     (default docs/screenshots)

Runs offscreen with a throwaway app folder and model store. The chat shows an example conversation written
into the conversation file (the tiny test model answers gibberish); the model manager shows a tiny synthetic
model written into the store; every widget is the app's own.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

EXAMPLE = [
    ("user", "What is the boiling point of water at the top of Mont Blanc?", "", "done"),
    (
        "assistant",
        "**About 84 °C.**\n\nAt 4,808 m the air pressure is roughly 55 kPa, a little over half of sea level, and "
        "water boils where its vapour pressure matches the air's:\n\n"
        "| altitude | pressure | boiling point |\n|---|---|---|\n| sea level | 101 kPa | 100 °C |\n"
        "| 4,808 m | ~55 kPa | ~84 °C |\n\n"
        "```python\nimport math\n# Clausius-Clapeyron, from 100 °C at 101.3 kPa\n"
        "T = 1 / (1 / 373.15 - 8.314 / 40660 * math.log(55 / 101.3))\nprint(round(T - 273.15))  # 84\n```",
        "The user asks for the boiling point at Mont Blanc's summit, 4,808 m. Pressure there is about 55 kPa. "
        "Using Clausius-Clapeyron with a heat of vaporisation of 40.66 kJ/mol gives about 357 K, so 84 °C. "
        "Give the number first, then the reason and a small calculation.",
        "done",
    ),
]


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="mlx-oss-screenshots-"))
    os.environ["MLX_OSS_APP_DIR"] = str(work / "app")
    os.environ["MLX_OSS_MODELS"] = str(work / "store")

    from PySide6.QtWidgets import QApplication

    from mlx_oss.app.main_window import MainWindow
    from mlx_oss.app.settings import AppSettings
    from mlx_oss.app.storage import ConversationStore
    from mlx_oss.converters.synthetic import preset_config, write_synthetic
    from mlx_oss.store import ModelStore

    store = ModelStore()
    name = "openai/gpt-oss-tiny"
    revision = "0" * 40
    snapshot = store.folder(name) / "snapshots" / revision
    write_synthetic(snapshot, preset_config("tiny"))
    store.record_download(name, revision, {p.name: p.stat().st_size for p in snapshot.iterdir()})
    AppSettings(model=name, system_prompt="Answer precisely; show the physics.").save()
    conversations = ConversationStore(work / "app" / "conversations.db")
    for title in ("Packing list for Iceland", "Regex for ISO dates"):
        conversations.add(conversations.new(title), "user", title)
    chat = conversations.new("Boiling water on Mont Blanc")
    for role, content, reasoning, state in EXAMPLE:
        message = conversations.add(chat, role, content, state)
        conversations.append(message, reasoning=reasoning)
    conversations.close()

    app = QApplication(sys.argv[:1])
    window = MainWindow()
    window.resize(1180, 760)
    window.show()
    window.chat.messages[-1].reasoning_toggle.setChecked(True)
    out.mkdir(parents=True, exist_ok=True)
    for tab, filename in (
        (window.chat, "chat.png"),
        (window.models, "models.png"),
        (window.settings_view, "settings.png"),
    ):
        window.tabs.setCurrentWidget(tab)
        if tab is window.models:
            window.models.select(name)
        for _ in range(5):
            app.processEvents()
        window.grab().save(str(out / filename))
        print(out / filename)
    window.close()
    shutil.rmtree(work, ignore_errors=True)  # a tiny model and its store, 50 MB a run


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "screenshots")

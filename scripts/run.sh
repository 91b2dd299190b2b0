#!/usr/bin/env bash
# Set up .venv and start mlx-oss.
#   scripts/run.sh                  the desktop app where there is a display; else the terminal chat with a tiny
#                                   synthetic model (random weights: its answers are gibberish)
#   scripts/run.sh MODEL [options]  the terminal chat with MODEL (a model directory or a hub name)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ $# -gt 0 ]; then
    "${pip[@]}" -e '.[fast]'
    exec .venv/bin/python -m mlx_oss.chat --model "$1" "${@:2}"
fi
if [ "$(uname -s)" = Darwin ] || [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    "${pip[@]}" -e '.[app,fast]'
    # Qt needs a few system libraries (on Linux: libxcb-cursor0, libegl1); say so instead of failing obscurely.
    if .venv/bin/python -c "from PySide6.QtWidgets import QApplication; QApplication([])" >/dev/null 2>&1; then
        exec .venv/bin/python -m mlx_oss.app
    fi
    echo "The desktop app cannot open a window here (Qt's platform libraries are missing; on Debian/Ubuntu:" \
        "sudo apt-get install libxcb-cursor0 libegl1). Starting the terminal chat instead." >&2
else
    "${pip[@]}" -e '.[fast]'
fi
model=models/tiny
if [ ! -e "$model" ]; then
    .venv/bin/python -m mlx_oss.converters synth "$model" --preset tiny >&2
fi
echo "Chatting in the terminal with $model, a tiny synthetic model with random weights (expect gibberish)." >&2
echo "For a real model: scripts/run.sh openai/gpt-oss-20b (python -m mlx_oss.models download openai/gpt-oss-20b first)." >&2
exec .venv/bin/python -m mlx_oss.chat --model "$model" --max-tokens 200
